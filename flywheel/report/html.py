"""`flywheel report`: one self-contained HTML file per run (or several runs side by side).

Everything the page needs is inside it: CSS, the script, the SVG chart and the data (a JSON block
read with `JSON.parse`, so nothing in it is ever parsed as HTML). A Content-Security-Policy allows
only the page's own script (by hash) and no request of any kind, so a report can be mailed around
and opened offline. Tables that need no interaction are rendered here with Jinja2 autoescaping; the
comparison of any two iterations is rendered in the browser, a page of rows at a time, from the
embedded data.

    write_report(store, ["run-2026..."], "report.html")
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

from flywheel.errors import FlywheelError
from flywheel.images import Thumbnails, describe_content
from flywheel.report.compare import RunView, default_pair, item_fields, iteration_samples, load_run_view
from flywheel.report.training_view import training_section
from flywheel.report.render import (TEMPLATES, fmt_cost, fmt_delta, fmt_duration, fmt_num, fmt_pct,
                                    fmt_score, fmt_tokens, is_missing, templates_env)
from flywheel.report.search_view import search_tables
from flywheel.report.wheel_view import anchor_href, wheel_section
from flywheel.store import Store
from flywheel.summaries import RunSummary

PAGE_SIZE = 50


def iteration_score(it: dict[str, Any], objective: dict[str, str]) -> float | None:
    """The stored score, or (for an unfinished iteration) the objective from its grades."""
    if not is_missing(it.get("score")):
        return it["score"]
    stats = it.get("grader_stats", {}).get(objective["grader"])
    if not stats:
        return None
    return stats.mean if objective["metric"] == "mean_score" else stats.pass_rate


def parent_of(view: RunView, index: int) -> dict[str, Any] | None:
    """The iteration this one is compared with ("Δ parent"), measured on the same split, or None.

    Its `parent_id` (else the iteration before it) when that is on the same split. A report on
    another split of a selected iteration (the wheel's test report of a valid iteration) is
    compared with the report on that split of the selected iteration's own parent, if there is one:
    test with test, never test with valid.
    """
    it = view.iterations[index]
    by_id = {other["id"]: other for other in view.iterations}
    parent = by_id.get(it.get("parent_id") or "") or (view.iterations[index - 1] if index > 0 else None)
    if parent is None or parent.get("split") == it.get("split"):
        return parent
    if it.get("parent_id") != parent["id"] or not parent.get("parent_id"):
        return None
    grandparent = parent["parent_id"]
    for other in view.iterations:
        if other.get("parent_id") == grandparent and other.get("split") == it.get("split") and other is not it:
            return other
    return None


def run_wall_time(view: RunView) -> float | None:
    """Wall time of the view's runs: what each run's summary says (the wheel's `elapsed_s`, an eval's
    `wall_s`), else finished_at − started_at; None while a run has neither."""
    total = 0.0
    for run in view.runs:
        seconds = RunSummary.of_run(run).wall_time
        if seconds is None and run.started_at and run.finished_at:
            seconds = (datetime.fromisoformat(run.finished_at) - datetime.fromisoformat(run.started_at)).total_seconds()
        if seconds is None:
            return None
        total += seconds
    return total


def trajectory_svg(iterations: Sequence[dict[str, Any]], metric: str, width: int = 1000, height: int = 230) -> Markup:
    """Objective per iteration with its CI as whiskers; promoted points filled, rejected hollow."""
    pad_l, pad_r, pad_t, pad_b = 48, 16, 14, 42
    points = [(i, it) for i, it in enumerate(iterations) if not is_missing(it.get("score_value"))]
    if not points:
        return Markup('<p class="muted">No scored iterations yet.</p>')
    values = [v for _, it in points for v in (it["score_value"], it.get("ci_low"), it.get("ci_high")) if not is_missing(v)]
    low, high = (0.0, 1.0) if metric != "mean_score" or (min(values) >= 0 and max(values) <= 1) else (min(values), max(values))
    if high - low < 1e-9:
        high = low + 1

    def x(i: int) -> float:
        return pad_l + (width - pad_l - pad_r) * ((i + 0.5) / max(1, len(iterations)))

    def y(v: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - (v - low) / (high - low))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="score per iteration" preserveAspectRatio="xMidYMid meet">']
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eef1f4"/>'
                     f'<text x="{pad_l - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{escape(fmt_score(v, metric))}</text>')
    # The line follows selection (train/valid); test scores are reported points, not a step of it.
    line = [(i, it) for i, it in points if it.get("split") != "test"] or points
    path = " ".join(f"{'M' if n == 0 else 'L'}{x(i):.1f},{y(it['score_value']):.1f}" for n, (i, it) in enumerate(line))
    parts.append(f'<path d="{path}" fill="none" stroke="#4f46e5" stroke-width="2" stroke-linejoin="round"/>')
    best = max(it["score_value"] for _, it in points)
    for i, it in points:
        cx, cy = x(i), y(it["score_value"])
        if not is_missing(it.get("ci_low")) and not is_missing(it.get("ci_high")):
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(it["ci_low"]):.1f}" y2="{y(it["ci_high"]):.1f}" '
                         'stroke="#a5b4fc" stroke-width="6" stroke-linecap="round" opacity=".55"/>')
        rejected = (it.get("decision") or "") == "rejected"
        fill = "#fff" if rejected else ("#1a7f37" if it["score_value"] == best and len(points) > 1 else "#4f46e5")
        stroke = "#8c959f" if rejected else fill if fill != "#fff" else "#4f46e5"
        title = f'{it["label"]}: {fmt_score(it["score_value"], metric)} ({it.get("decision") or "–"})'
        if it.get("split") == "test" and len(line) < len(points):
            parts.append(f'<rect x="{cx - 5.5:.1f}" y="{cy - 5.5:.1f}" width="11" height="11" fill="#fff" '
                         f'stroke="{stroke if fill == "#fff" else fill}" stroke-width="2"><title>{escape(title)} · test'
                         '</title></rect>')
        else:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5.5" fill="{fill}" stroke="{stroke}" stroke-width="2">'
                         f'<title>{escape(title)}</title></circle>')
        parts.append(f'<text x="{cx:.1f}" y="{cy - 10:.1f}" text-anchor="middle" style="fill:#1f2328;font-weight:600">'
                     f'{escape(fmt_score(it["score_value"], metric))}</text>')
        parts.append(f'<text x="{cx:.1f}" y="{height - pad_b + 18}" text-anchor="middle">{escape(it["label"])}</text>')
        if it.get("decision"):
            parts.append(f'<text x="{cx:.1f}" y="{height - pad_b + 32}" text-anchor="middle">{escape(it["decision"])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def story_sections(store: Store, view: RunView, *, app: bool) -> dict[str, Any]:
    """What the report and the review app's run page both show beyond the iteration tables: the
    wheel (milestones, score-vs-cost chart with every candidate measured on valid, laps, rewrites),
    training curves, hyper-parameter searches, and the `ft:` names of models the API fine-tuned.
    `app`: links go to the app's pages (a search run's page) instead of anchors in the report."""
    run_href = (lambda run_id: f"/runs/{quote(run_id, safe='')}") if app else anchor_href
    return {"app": app, "wheel": wheel_section(store, view, run_href), "training": training_section(store, view),
            "searches": search_tables(store, store.training_searches([r.id for r in view.runs])),
            "ft_names": store.fine_tuned_names()}


def decorate_iterations(view: RunView) -> list[dict[str, Any]]:
    """Iteration rows with formatted cells, for the report and the server's run page."""
    metric = view.objective["metric"]
    rows = []
    for index, it in enumerate(view.iterations):
        it["score_value"] = iteration_score(it, view.objective)
    for index, it in enumerate(view.iterations):
        parent = parent_of(view, index)
        delta = None
        if parent is not None and not is_missing(parent.get("score_value")) and not is_missing(it["score_value"]):
            delta = it["score_value"] - parent["score_value"]
        score = it["score_value"]
        rows.append({
            **it,
            "run_short": it["run_id"][-6:] if len(view.runs) > 1 else "",
            "score_fmt": fmt_score(score, metric),
            "score_width": 0 if is_missing(score) else max(0.0, min(100.0, 100 * score)),
            "ci_fmt": "–" if is_missing(it.get("ci_low")) else
            f"{fmt_score(it['ci_low'], metric)} – {fmt_score(it['ci_high'], metric)}",
            "delta_fmt": fmt_delta(delta, metric) if delta is not None else "–",
            "delta_cls": "" if delta is None or abs(delta) < 1e-12 else ("pos" if delta > 0 else "neg"),
            "tokens_fmt": fmt_tokens(it.get("tokens")),
            "cost_fmt": fmt_cost(it.get("cost")),
            "wall_fmt": fmt_duration(it.get("wall_s")),
        })
    return rows


def grader_rows(view: RunView) -> list[dict[str, Any]]:
    rows = []
    for g in view.graders:
        cells = []
        for it in view.iterations:
            s = it["grader_stats"].get(g.name)
            cells.append({"mean": fmt_num(s.mean) if s else "–", "pass": fmt_pct(s.pass_rate) if s else "–",
                          "errors": s.errors if s else 0})
        rows.append({"name": g.name, "type": g.type, "is_model": g.is_model,
                     "is_objective": g.name == view.objective["grader"], "cells": cells})
    return rows


def is_minibatch(iteration: dict[str, Any], searches: set[str]) -> bool:
    """A prompt search's candidate scored on its valid minibatch (stage `prompt` of a run in `searches`, the
    ids of `optimize` runs), not on all of valid (`prompt-valid`)."""
    return iteration.get("stage") == "prompt" and iteration.get("run_id") in searches


def scope_label(iteration: dict[str, Any], searches: set[str]) -> str:
    """What a score was measured on: `minibatch of valid (15)`, `all of valid`, `test`."""
    split = iteration.get("split") or "all"
    if is_minibatch(iteration, searches):
        return f"minibatch of {split}" + (f" ({iteration['n']})" if iteration.get("n") else "")
    return f"all of {split}" if split in ("valid", "train") else split


def kpis(view: RunView) -> list[dict[str, str]]:
    metric = view.objective["metric"]
    scored = [it for it in view.iterations if not is_missing(it.get("score_value"))]
    out = []
    # like with like: a search scores candidates on a valid minibatch, then its finalists on all of
    # valid; the best is chosen within the full-valid scores when there are any, and says which it is
    searches = {run.id for run in view.runs if run.kind == "optimize"}
    full = [it for it in scored if not is_minibatch(it, searches)]
    for group in ([full] if full else []) + [[it for it in scored if it not in full]]:
        if not group:
            continue
        base, scope = group[0], scope_label(group[0], searches)
        best = max((it for it in group if it.get("split") == base.get("split")), key=lambda it: it["score_value"])
        gain = best["score_value"] - base["score_value"]
        out.append({"label": f"baseline ({scope})", "value": fmt_score(base["score_value"], metric),
                    "detail": base["label"], "cls": "muted"})
        out.append({"label": f"best ({scope})", "value": fmt_score(best["score_value"], metric),
                    "detail": f"{fmt_delta(gain, metric)} · {best['label']}", "cls": "pos" if gain > 0 else "muted"})
        break
    tokens = sum(it.get("tokens") or 0 for it in view.iterations)
    paid = [p for p in (RunSummary.of_run(run).tokens_paid for run in view.runs) if p is not None]
    cost = sum(it.get("cost") or 0.0 for it in view.iterations)
    evals = sum(it.get("wall_s") or 0.0 for it in view.iterations)
    wall = run_wall_time(view)
    samples = sum(it.get("n") or 0 for it in view.iterations)
    out += [{"label": "iterations", "value": str(len(view.iterations)), "detail": f"{samples:,} samples", "cls": "muted"},
            {"label": "tokens measured", "value": fmt_tokens(tokens),
             "detail": (f"of the iterations · {fmt_tokens(sum(paid))} paid (all model calls) · " if paid else
                        "of the iterations · ") + f"cost {fmt_cost(cost)}", "cls": "muted"},
            {"label": "time", "value": fmt_duration(wall), "detail": f"{fmt_duration(evals)} evaluating", "cls": ""}]
    return out


class _Strings:
    """Interns repeated strings (labels, feedback) so large reports stay small."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.values: list[str] = []

    def __call__(self, value: str | None) -> int:
        if value is None:
            return -1
        found = self.index.get(value)
        if found is None:
            found = self.index[value] = len(self.values)
            self.values.append(value)
        return found


def _round(value: Any) -> float | None:
    return None if is_missing(value) else round(float(value), 4)


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def report_payload(store: Store, view: RunView, page_size: int = PAGE_SIZE,
                   a: str | None = None, b: str | None = None) -> dict[str, Any]:
    """The data the page's script renders: iterations, prompts, items and columnar samples."""
    strings = _Strings()
    fields = item_fields(store, view.runs)
    keys: list[str] = []
    key_index: dict[str, int] = {}
    item_rows: list[list[list[str]]] = []
    names = [g.name for g in view.graders]
    samples_out = []
    prompts: dict[str, list[list[str]]] = {}
    thumbs: list[list[int]] = []  # per item: its input images, as small inline JPEGs (string indexes)
    thumbnails = Thumbnails()
    for it in view.iterations:
        if it.get("prompt_id") and it["prompt_id"] not in prompts:
            prompts[it["prompt_id"]] = [[m.get("role", ""), describe_content(m.get("content", ""))] for m in it["messages"]]
        cols: dict[str, Any] = {"k": [], "r": [], "o": [], "e": [], "s": [], "p": [], "t": [], "l": [],
                                "gs": [[] for _ in names], "gp": [[] for _ in names], "gf": [[] for _ in names]}
        for s in iteration_samples(store, it["id"], view.objective):
            key = s["item_key"]
            if key not in key_index:
                key_index[key] = len(keys)
                keys.append(key)
                messages = json.loads(s["input_json"] or "null") or []
                if key in fields:
                    item_rows.append([[name, _field_text(v)] for name, v in fields[key].items()])
                else:  # no dataset row: show the last user message instead
                    user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
                    item_rows.append([["input", describe_content(user)]])
                thumbs.append([strings(t) for t in thumbnails.for_messages(messages)])
            cols["k"].append(key_index[key])
            cols["r"].append(s["repeat"])
            cols["o"].append(strings(s["output_text"]))
            cols["e"].append(strings(s["error"]))
            cols["s"].append(_round(s["score"]))
            cols["p"].append(int(s["passed"]))
            cols["t"].append((s["prompt_tokens"] or 0) + (s["completion_tokens"] or 0))
            cols["l"].append(_round(s["latency_s"]))
            for gi, name in enumerate(names):
                g = s["grades"].get(name)
                cols["gs"][gi].append(_round(g["score"]) if g else None)
                cols["gp"][gi].append(int(g["passed"]) if g else None)
                feedback = None
                if g:
                    feedback = g["feedback"] or None
                    if g.get("error"):
                        feedback = f"{g['error']}: {feedback}" if feedback else g["error"]
                cols["gf"][gi].append(strings(feedback))
        samples_out.append(cols)
    ids = [it["id"] for it in view.iterations]
    default_a, default_b = default_pair(view.iterations)
    a, b = a or default_a, b or default_b
    objective_index = names.index(view.objective["grader"]) if view.objective["grader"] in names else -1
    return {
        "S": strings.values,
        "metric": view.objective["metric"],
        "objective": objective_index,
        "graders": [{"name": g.name, "type": g.type, "model": g.is_model} for g in view.graders],
        "iterations": [{
            "id": it["id"], "label": it["label"], "seq": it["seq"], "stage": it.get("stage"),
            "model_ref": it.get("model_ref"), "model_fingerprint": it.get("model_fingerprint"),
            "prompt_id": it.get("prompt_id"), "split": it.get("split"), "parent_id": it.get("parent_id"),
            "decision": it.get("decision"), "score": _round(it.get("score_value")),
            "gstats": [[_round(st.mean), _round(st.pass_rate), st.errors] if (st := it["grader_stats"].get(n)) else None
                       for n in names],
        } for it in view.iterations],
        "prompts": prompts,
        "items": {"keys": keys, "fields": item_rows, "thumbs": thumbs, "thumbsOmitted": thumbnails.omitted},
        "samples": samples_out,
        "pageSize": page_size,
        "initial": {"a": ids.index(a) if a in ids else 0, "b": ids.index(b) if b in ids else 0},
    }


def script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>', '&' or line separators."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_report(store: Store, run_ids: Sequence[str], *, page_size: int = PAGE_SIZE,
                  a: str | None = None, b: str | None = None) -> str:
    """The report's HTML. `page_size=0` renders every row at once (for benchmarks only)."""
    view = load_run_view(store, run_ids)
    iterations = decorate_iterations(view)
    js = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode()
    objective = view.objective
    title = view.eval_name or view.runs[0].id
    return templates_env().get_template("report.html.j2").render(
        title=title, view=view, iterations=iterations, grader_rows=grader_rows(view), kpis=kpis(view),
        trajectory_svg=trajectory_svg(iterations, objective["metric"]),
        objective_label=f"{objective['grader']} {'mean score' if objective['metric'] == 'mean_score' else 'pass rate'}",
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data_json=Markup(script_json(report_payload(store, view, page_size, a, b))),
        js=Markup(js), css=Markup(css), script_hash=f"sha256-{digest}", **story_sections(store, view, app=False))


@dataclass
class ReportResult:
    path: str
    bytes: int
    iterations: int
    samples: int
    seconds: float


def write_report(store: Store, run_ids: Sequence[str], path: str | Path, **options: Any) -> ReportResult:
    """Render the report of `run_ids` into `path` (UTF-8); returns its size and contents."""
    started = time.perf_counter()
    html = render_report(store, run_ids, **options)
    target = Path(path)
    try:
        target.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise FlywheelError(f"{target}: cannot write the report: {exc.strerror or exc}") from None
    ids = [store.get_run(r).id for r in run_ids]
    iterations, samples = store.count_run_rows(ids)
    store.record_report(target, ids)  # a deletion of captures shown here deletes the page
    return ReportResult(path=str(target), bytes=target.stat().st_size, iterations=iterations, samples=samples,
                        seconds=time.perf_counter() - started)
