"""`flywheel serve`: a local web app over the store for browsing runs and recording reviews.

Starlette + Jinja2 (autoescape on) + uvicorn, bound to 127.0.0.1 unless told otherwise. Pages:

    /                      runs, newest first
    /runs/{run}            trajectory, iterations, graders, judge-vs-human agreement
    /compare?a=IT&b=IT     any two iterations side by side (a == b browses one), regressions first
    /samples/{id}          one sample: input, output, grades, review history and form
    /search?q=...          items and outputs containing a text
    /service               the service's dashboard (flywheel.report.service_view)
    /service/pairs?...     the shadow/canary pairs behind a dashboard point: model=M, phase=, switch=,
                           first=&last= (pair ids: a window), since=&until=; newest first, before=ID pages
    /service/captures/{id} one live request as stored, its reply and its pairs

It is read-only unless started with `review=True`; then POST /reviews records a verdict, a
preference, a correction or a note. Writes need the page's token (a cross-site form cannot know
it) and a Host header naming this machine (against DNS rebinding).

    serve_reports("flywheel.db", review=True, reviewer="ana")
"""

from __future__ import annotations

import difflib
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from flywheel.errors import FlywheelError, StoreError
from flywheel.report.compare import Comparison, PairRow, RunView, compare_iterations, item_fields, load_run_view
from flywheel.report.html import (decorate_iterations, fmt_delta, fmt_pct, fmt_score, grader_rows, kpis,
                                  story_sections, templates_env, trajectory_svg)
from flywheel.reviews import add_review, judge_agreement, preferences, sample_reviews
from flywheel.store import Store
from flywheel.web import HostGuard, is_loopback

PAGE_SIZE = 50
PAIR_FILTERS = ("model", "phase", "switch", "first", "last", "since", "until")  # /service/pairs's query
FILTERS = [("all", "All"), ("regression", "Regressions"), ("improvement", "Improvements"),
           ("changed", "Changed output"), ("failing", "Failing"), ("errors", "Errors"), ("unreviewed", "Unreviewed")]


class PageQueryError(FlywheelError):
    """A page's query parameter that cannot be read: a 400 page naming it."""


def _whole_number(params: Any, name: str) -> int | None:
    """The query parameter `name` as a non-negative integer; None when absent or empty."""
    value = (params.get(name) or "").strip()
    if not value:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise PageQueryError(f"{name}: not a whole number: {value[:40]!r}")
    return int(value)


def _when(params: Any, name: str, *, end: bool = False) -> str | None:
    """The query parameter `name` (a date, timestamp or age) as a stored timestamp; None when absent."""
    from flywheel.capture_rows import parse_when

    try:
        return parse_when(params.get(name) or None, end=end, option=name)
    except FlywheelError as exc:
        raise PageQueryError(str(exc)) from None


def pair_filters(params: Any) -> dict[str, Any]:
    """`/service/pairs`'s query (PAIR_FILTERS) as `Store.shadow_pairs` filters; PageQueryError names a bad one."""
    phase = params.get("phase") or None
    if phase not in (None, "shadow", "canary"):
        raise PageQueryError(f"phase: shadow or canary, not {phase[:40]!r}")
    return {"model": params.get("model") or None, "phase": phase, "switch_id": _whole_number(params, "switch"),
            "first_id": _whole_number(params, "first"), "last_id": _whole_number(params, "last"),
            "since": _when(params, "since"), "until": _when(params, "until", end=True)}


class _Pages:
    """What every page needs: the store path, review mode, the write token and a small cache."""

    def __init__(self, db_path: str, review: bool, reviewer: str | None):
        self.db_path = db_path
        self.review = review
        self.reviewer = reviewer
        self.token = secrets.token_urlsafe(24)
        self.env = templates_env()
        self._comparisons: OrderedDict[tuple, Comparison] = OrderedDict()

    def store(self) -> Store:
        return Store.open(self.db_path)

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(
            request_path=request.url.path, review=self.review, reviewer=self.reviewer, token=self.token,
            query=request.query_params.get("q", ""), css=self.env.loader.get_source(self.env, "style.css")[0],
            pct=fmt_pct, **context)
        return HTMLResponse(html, status_code=status, headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    def comparison(self, store: Store, view: RunView, a: str, b: str, grader: str | None) -> Comparison:
        """Cached by the iterations and their sample and grade counts (a running wheel adds rows)."""
        counts = store.samples_version([a, b])
        key = (a, b, grader, *counts)
        if key not in self._comparisons:
            if grader:
                view.objective = {"grader": grader, "metric": view.objective["metric"]}
            self._comparisons[key] = compare_iterations(store, view, a, b)
            while len(self._comparisons) > 6:
                self._comparisons.popitem(last=False)
        self._comparisons.move_to_end(key)
        return self._comparisons[key]



def live_panel(stored: tuple[dict[str, Any], str] | None) -> dict[str, str] | None:
    """The run page's "in progress" panel from the run's latest `WheelEvent` (None when it is not running)."""
    from flywheel.events import WheelEvent, format_seconds
    from flywheel.report.live import where

    if stored is None:
        return None
    try:
        event = WheelEvent.model_validate(stored[0])
    except ValueError:
        return None
    step = event.step + (f" {event.done}/{event.total} {event.unit}" if event.done is not None and event.total else "")
    return {"where": where(event), "step": step or event.message,
            "loss": f"{event.loss:.4g}" if event.loss is not None else "",
            "elapsed": format_seconds(event.elapsed_s), "left": format_seconds(event.eta_s),
            "incumbent": (f"valid {event.incumbent_score:.3f}, {event.incumbent_cost}"
                          if event.incumbent_score is not None else "measuring the baseline"),
            "at": stored[1]}

def _tokens(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\s\w]", text)


def word_diff(a: str, b: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Segments of A (op '-' marks deleted) and of B (op '+' marks inserted), for highlighting."""
    ta, tb = _tokens(a), _tokens(b)
    if len(ta) * len(tb) > 250_000:
        return [("=", a)], [("=", b)]
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if op == "equal":
            left.append(("=", "".join(ta[i1:i2])))
            right.append(("=", "".join(tb[j1:j2])))
        else:
            if i2 > i1:
                left.append(("-", "".join(ta[i1:i2])))
            if j2 > j1:
                right.append(("+", "".join(tb[j1:j2])))
    return left, right


def _keep(row: PairRow, flt: str, reviewed: set[int]) -> bool:
    if flt == "all":
        return True
    if flt in ("regression", "improvement"):
        return row.status == flt
    if flt == "changed":
        return bool(row.a and row.b and ((row.a["output_text"] != row.b["output_text"]) or row.a["error"] != row.b["error"]))
    if flt == "failing":
        side = row.b or row.a
        return bool(side) and not side["passed"]
    if flt == "errors":
        return bool((row.a and row.a["error"]) or (row.b and row.b["error"]))
    if flt == "unreviewed":
        return not any(s and s["id"] in reviewed for s in (row.a, row.b))
    return True


def _matches(row: PairRow, q: str, fields: dict[str, dict[str, Any]]) -> bool:
    if not q:
        return True
    hay = [row.key, *(str(v) for v in fields.get(row.key, {}).values())]
    hay += [s["output_text"] or "" for s in (row.a, row.b) if s]
    return any(q in h.lower() for h in hay)


def _safe_next(value: str | None) -> str:
    """Only same-site relative paths: never an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else "/"


def create_app(db_path: str, *, review: bool = False, reviewer: str | None = None,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The review server's ASGI app over the store at `db_path`."""
    Store.open(db_path).close()  # fail now (and migrate) rather than on the first request
    pages = _Pages(db_path, review, reviewer)

    def runs_page(request: Request) -> Response:
        store = pages.store()
        try:
            rows = []
            recent = store.list_runs(200)
            shown = set(visible_run_ids(request, store, [run.id for run in recent]))
            listed = [run for run in recent if run.id in shown]
            api_names = store.api_run_names([run.id for run in listed])
            ft_names = store.fine_tuned_names()
            for run in listed:
                its = store.iterations(run.id)
                evaluation = store.get_eval(run.eval_id)
                scores = [it.score for it in its if it.score is not None]
                rows.append({**run.to_dict(), "eval_name": evaluation["name"] if evaluation else "",
                             "n_iterations": len(its), "api_name": api_names.get(run.id),
                             "ft_name": ft_names.get(run.model_ref or ""),
                             "best": max(scores) if scores else None, "n": sum(it.n or 0 for it in its)})
            reviews = store.count_reviews()
        finally:
            store.close()
        return pages.render(request, "runs.html.j2", runs=rows, n_reviews=reviews, title="Runs")

    def run_page(request: Request) -> Response:
        store = pages.store()
        try:
            view = load_run_view(store, [request.path_params["run_id"]])
            check_visible(request, store, view.runs[0].id,
                          f"{store.path}: no run matches {request.path_params['run_id']!r}")
            iterations = decorate_iterations(view)
            agreement = judge_agreement(store, run_ids=[view.runs[0].id])
            calibrations = store.latest_calibrations([g.name for g in view.graders])
            n_reviews = len(sample_reviews(store, run_ids=[view.runs[0].id]))
            story = story_sections(store, view, app=True)
            api_name = store.api_run_names([view.runs[0].id]).get(view.runs[0].id)
            live = live_panel(store.run_live(view.runs[0].id))
        finally:
            store.close()
        metric = view.objective["metric"]
        return pages.render(request, "run.html.j2", view=view, run=view.runs[0], iterations=iterations,
                            grader_rows=grader_rows(view), kpis=kpis(view), agreement=agreement,
                            calibrations=calibrations,
                            trajectory_svg=trajectory_svg(iterations, metric), n_reviews=n_reviews,
                            metric=metric, title=view.eval_name, api_name=api_name, live=live, **story)

    def compare_page(request: Request) -> Response:
        params = request.query_params
        a_id, b_id = params.get("a", ""), params.get("b", "") or params.get("a", "")
        flt = params.get("f", "all") if params.get("f") in dict(FILTERS) else "all"
        q = params.get("q", "").strip().lower()
        try:
            page = max(0, int(params.get("page", "0")))
        except ValueError:
            page = 0
        store = pages.store()
        try:
            a_it, b_it = store.get_iteration(a_id), store.get_iteration(b_id)
            for it in (a_it, b_it):
                check_visible(request, store, it.run_id, f"{store.path}: no iteration {it.id!r}")
            view = load_run_view(store, list(dict.fromkeys([a_it.run_id, b_it.run_id])))
            grader = params.get("g") if params.get("g") in {g.name for g in view.graders} else None
            cmp = pages.comparison(store, view, a_id, b_id, grader)
            fields = item_fields(store, view.runs)
            reviews = sample_reviews(store, iteration_ids=[a_id, b_id])
            prefs = {frozenset((p.sample_id, p.other_sample_id)): p
                     for p in preferences(store, iteration_ids=[a_id, b_id])}
            agreement = judge_agreement(store, iteration_ids=list(dict.fromkeys([a_id, b_id])))
            calibrations = store.latest_calibrations([g.name for g in view.graders])
            choices = [c for c in _iteration_choices(store) if visible_run_ids(request, store, [c["run"].id])]
        finally:
            store.close()
        rows = [r for r in cmp.rows if _keep(r, flt, set(reviews)) and _matches(r, q, fields)]
        pages_total = max(1, math.ceil(len(rows) / PAGE_SIZE))
        page = min(page, pages_total - 1)
        shown = []
        for r in rows[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]:
            out_a = (r.a or {}).get("output_text") or ""
            out_b = (r.b or {}).get("output_text") or ""
            left, right = word_diff(out_a, out_b) if r.a and r.b and out_a != out_b else ([("=", out_a)], [("=", out_b)])
            pref = prefs.get(frozenset((r.b["id"], r.a["id"]))) if r.a and r.b else None
            shown.append({"row": r, "fields": fields.get(r.key, {}), "diff_a": left, "diff_b": right,
                          "review_a": reviews.get(r.a["id"]) if r.a else None,
                          "review_b": reviews.get(r.b["id"]) if r.b else None,
                          "preferred": None if pref is None else ("tie" if pref.tie else "a" if pref.chosen == r.a["id"] else "b")})
        counts = {key: sum(1 for r in cmp.rows if _keep(r, key, set(reviews)) and _matches(r, q, fields)) for key, _ in FILTERS}
        base = {"a": a_id, "b": b_id, "f": flt, "q": params.get("q", ""), **({"g": grader} if grader else {})}
        metric = view.objective["metric"]
        return pages.render(
            request, "compare.html.j2", cmp=cmp, rows=shown, single=a_id == b_id, filters=FILTERS, flt=flt,
            counts=counts, page=page, pages_total=pages_total, n_rows=len(rows), view=view, grader=grader,
            choices=choices, base=base, urlencode=urlencode, agreement=agreement, calibrations=calibrations, metric=metric,
            score=lambda v: fmt_score(v, metric), delta=lambda v: fmt_delta(v, metric),
            ordered=lambda grades: [(g.name, grades[g.name]) for g in view.graders if g.name in grades],
            prompt_a=cmp.a["messages"], prompt_b=cmp.b["messages"], prompt_ops=_prompt_ops(cmp),
            this_url=str(request.url.path) + "?" + urlencode({**base, "page": page}),
            title=f"{cmp.b['label']} vs {cmp.a['label']}")

    def sample_page(request: Request) -> Response:
        sample_id = request.path_params["sample_id"]
        store = pages.store()
        try:
            sample = store.samples_by_id([sample_id]).get(sample_id)
            if sample is None:
                raise StoreError(f"no sample with id {sample_id}")
            grades = store.grades_of_samples([sample_id])
            iteration = store.get_iteration(sample["iteration_id"])
            check_visible(request, store, iteration.run_id, f"no sample with id {sample_id}")
            view = load_run_view(store, [iteration.run_id])
            fields = item_fields(store, view.runs).get(sample["item_key"], {})
            history = store.reviews_of_sample(sample_id)
            review = sample_reviews(store, iteration_ids=[sample["iteration_id"]]).get(sample_id)
            others = store.other_outputs(sample)
        finally:
            store.close()
        import json

        from flywheel.images import Thumbnails, describe_content

        # Text, and the input images as small inline copies beside it: the page fetches nothing.
        thumbnails = Thumbnails()
        messages = [{"role": m.get("role", ""), "content": describe_content(m.get("content")),
                     "thumbs": thumbnails.for_messages([m])}
                    for m in json.loads(sample["input_json"] or "null") or []]
        return pages.render(request, "sample.html.j2", sample=sample, grades=grades, iteration=iteration,
                            fields=fields, history=history, sample_review=review, messages=messages, others=others,
                            graders={g.name: g for g in view.graders}, run=view.runs[0],
                            this_url=request.url.path, title=f"{sample['item_key']} · {iteration.id}")

    def search_page(request: Request) -> Response:
        q = request.query_params.get("q", "").strip()
        results = []
        if q:
            store = pages.store()
            try:
                shown = set(visible_run_ids(request, store, [r["run_id"] for r in store.search_samples(q)]))
                results = [r for r in store.search_samples(q) if r["run_id"] in shown]
            finally:
                store.close()
        return pages.render(request, "search.html.j2", q=q, results=results, title=f"search {q}")

    async def post_review(request: Request) -> Response:
        if not pages.review:
            return pages.render(request, "error.html.j2", status=403, title="read-only",
                                message="This server is read-only: start it with `flywheel serve --review` to record reviews.")
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            return pages.render(request, "error.html.j2", status=403, title="forbidden",
                                message="Reviews can only be sent from this server's own pages.")
        form = await request.form()
        if not secrets.compare_digest(str(form.get("token", "")), pages.token):
            return pages.render(request, "error.html.j2", status=403, title="forbidden",
                                message="This form has expired (the server was restarted): reload the page.")

        def number(name: str) -> int | None:
            value = str(form.get(name) or "").strip()
            return int(value) if value.isdigit() else None

        sample_id = number("sample_id")
        if sample_id is None:
            return pages.render(request, "error.html.j2", status=400, title="bad review", message="sample_id is missing.")
        if request.scope.get("flywheel.role") == "reader":
            return pages.render(request, "error.html.j2", status=403, title="forbidden",
                                message="A reader key may read these pages; recording a review needs a member key.")
        store = pages.store()
        try:
            named = [sid for sid in (sample_id, number("other_sample_id")) if sid is not None]
            for sid, sample in store.samples_by_id(named).items():
                check_visible(request, store, store.get_iteration(sample["iteration_id"]).run_id,
                              f"{store.path}: no sample with id {sid}")
            add_review(store, sample_id, verdict=str(form.get("verdict") or "") or None,
                       preference=str(form.get("preference") or "") or None,
                       other_sample_id=number("other_sample_id"), correction=str(form.get("correction") or "") or None,
                       note=str(form.get("note") or "") or None, reviewer=pages.reviewer)
        except FlywheelError as exc:
            return pages.render(request, "error.html.j2", status=400, title="bad review", message=str(exc))
        finally:
            store.close()
        target = _safe_next(str(form.get("next") or ""))
        anchor = str(form.get("anchor") or "")
        if re.fullmatch(r"[\w.-]{1,200}", anchor):
            target += "#" + anchor
        return RedirectResponse(target, status_code=303)

    def service_refusal(request: Request) -> Response | None:
        """The service pages' door: the service's traffic spans every project, so on the API port only
        an admin key sees it (the report server alone shows it to whoever it lets in; docs/security.md)."""
        role = request.scope.get("flywheel.role")
        if role is not None and role != "admin":
            return pages.render(request, "error.html.j2", status=403, title="forbidden",
                                message="The service's pages show the live traffic of every project: "
                                        "viewing them needs an admin key.")
        return None

    def service_page(request: Request) -> Response:
        from flywheel.report.service_view import service_summary

        if (refused := service_refusal(request)) is not None:
            return refused
        store = pages.store()
        try:
            summary = service_summary(store)
        finally:
            store.close()
        return pages.render(request, "service.html.j2", s=summary, title="Service")

    def service_pairs_page(request: Request) -> Response:
        from flywheel.report.service_view import PAIRS_PAGE_SIZE, pairs_page

        if (refused := service_refusal(request)) is not None:
            return refused
        params = request.query_params
        filters, before = pair_filters(params), _whole_number(params, "before")
        store = pages.store()
        try:
            shown = pairs_page(store, before=before, **filters)
        finally:
            store.close()
        base = {name: params[name] for name in PAIR_FILTERS if params.get(name)}
        return pages.render(request, "service_pairs.html.j2", page=shown, base=base, before=before,
                            size=PAIRS_PAGE_SIZE, title="Service pairs")

    def service_capture_page(request: Request) -> Response:
        from flywheel.report.service_view import capture_view

        if (refused := service_refusal(request)) is not None:
            return refused
        store = pages.store()
        try:
            view = capture_view(store, request.path_params["capture_id"])
        finally:
            store.close()
        return pages.render(request, "service_capture.html.j2", v=view, c=view.capture,
                            title=f"capture {view.capture.id}")

    def wrap(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def page(request: Request) -> Response:
            try:
                return fn(request)
            except PageQueryError as exc:
                return pages.render(request, "error.html.j2", status=400, title="bad request", message=str(exc))
            except FlywheelError as exc:
                return pages.render(request, "error.html.j2", status=404, title="not found", message=str(exc))
        return page

    app = Starlette(
        routes=[Route("/", wrap(runs_page)), Route("/runs/{run_id}", wrap(run_page)),
                Route("/compare", wrap(compare_page)), Route("/samples/{sample_id:int}", wrap(sample_page)),
                Route("/search", wrap(search_page)), Route("/service", wrap(service_page)),
                Route("/service/pairs", wrap(service_pairs_page)),
                Route("/service/captures/{capture_id:int}", wrap(service_capture_page)),
                Route("/reviews", post_review, methods=["POST"])],
        middleware=[Middleware(HostGuard, allowed_hosts=allowed_hosts)])  # None: loopback names only
    app.state.pages = pages
    return app


def visible_run_ids(request: Request, store: Store, run_ids: list[str]) -> list[str]:
    """The runs (ids) the request's project may see (on the API port, `flywheel.api.access` sets the
    project; the report server alone shows every run to whoever it lets in)."""
    project = request.scope.get("flywheel.project")
    if project is None:
        return run_ids
    return [run_id for run_id in run_ids if store.run_project(run_id) == project]


def check_visible(request: Request, store: Store, run_id: str, missing: str) -> None:
    """A StoreError (a 404 page) when the run is another project's, saying `missing`: the words of
    the page for an object that does not exist."""
    if not visible_run_ids(request, store, [run_id]):
        raise StoreError(missing)


def _iteration_choices(store: Store, runs: int = 50) -> list[dict[str, Any]]:
    """Iterations of the most recent runs, grouped by run, for the A/B pickers."""
    out = []
    for run in store.list_runs(runs):
        its = store.iterations(run.id)
        if its:
            out.append({"run": run, "iterations": its})
    return out


def _prompt_ops(cmp: Comparison) -> list[tuple[str, str]]:
    from flywheel.report.compare import prompt_diff

    return prompt_diff(cmp.a["messages"], cmp.b["messages"])


def serve_reports(db_path: str, *, host: str = "127.0.0.1", port: int = 8765, review: bool = False,
                  reviewer: str | None = None, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the review server until interrupted. Any host but loopback accepts every Host header."""
    from flywheel.web import bind_socket, page_url, serve_forever

    allowed = None if is_loopback(host) else ["*"]
    app = create_app(db_path, review=review, reviewer=reviewer, allowed_hosts=allowed)
    sock = bind_socket(host, port)
    if on_ready is not None:
        on_ready(page_url(host, sock))
    serve_forever(app, sock)
