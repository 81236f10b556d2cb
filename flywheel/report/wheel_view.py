"""The wheel's part of a report: laps, milestones with score and cost, a score-vs-cost chart, and
every kept prompt rewrite as a diff against its parent.

    section = wheel_section(store, view)   # None for runs that are not `flywheel run`
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from markupsafe import Markup, escape

from flywheel.cost import CostPerItem
from flywheel.report.compare import RunView, prompt_diff
from flywheel.store import Store
from flywheel.summaries import RunSummary

_COLOURS = {"promoted": "#1a7f37", "incumbent": "#4f46e5", "rejected": "#8c959f", "passed over": "#bf8700"}
# A search finalist that was measured on all of valid and not chosen (lower, or no better than a cheaper one).
PASSED_OVER = ("rejected", "not significant")


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cost_chart_svg(points: list[dict[str, Any]], minimise: str, width: int = 1000, height: int = 260) -> Markup:
    """Valid score (y) against cost per item (x) of each measured candidate; milestones labelled."""
    points = [p for p in points if not _nan(p["x"]) and not _nan(p["y"])]
    if not points:
        return Markup('<p class="muted">No candidate with a cost yet.</p>')
    pad_l, pad_r, pad_t, pad_b = 52, 24, 16, 44
    xs = [p["x"] for p in points]
    low_x, high_x = 0.0, max(xs) * 1.08 or 1.0

    def x(v: float) -> float:
        return pad_l + (width - pad_l - pad_r) * (v - low_x) / (high_x - low_x)

    def y(v: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - v)

    unit = CostPerItem().describe(minimise).replace("– ", "")
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="valid score against {escape(unit)}" preserveAspectRatio="xMidYMid meet">']
    for k in range(5):
        v = k / 4
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eef1f4"/>'
                     f'<text x="{pad_l - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{100 * v:.0f}%</text>')
        cx = low_x + (high_x - low_x) * k / 4
        parts.append(f'<text x="{x(cx):.1f}" y="{height - pad_b + 16}" text-anchor="middle">{cx:.3g}</text>')
    parts.append(f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 6}" text-anchor="middle">{escape(unit)} '
                 '(valid) — lower is cheaper</text>')
    for p in points:
        colour = _COLOURS.get(p["decision"] or "", "#4f46e5")
        filled = p["decision"] in ("promoted", "incumbent")
        title = f'{p["label"]}: {100 * p["y"]:.1f}% at {p["x"]:.3g} {unit} ({p["decision"] or "–"})'
        if p.get("run_id"):
            title += f' · prompt search {p["run_id"]}'
        dash = ' stroke-dasharray="3 2"' if p["decision"] == "passed over" else ""
        kind = escape((p["decision"] or "").replace(" ", "-"))
        circle = (f'<circle cx="{x(p["x"]):.1f}" cy="{y(p["y"]):.1f}" r="6" fill="{colour if filled else "#fff"}" '
                  f'stroke="{colour}" stroke-width="2"{dash} class="point {kind}"><title>{escape(title)}</title></circle>')
        parts.append(f'<a href="{escape(p["href"])}">{circle}</a>' if p.get("href") else circle)
        if p["decision"] == "passed over":
            parts.append(f'<text x="{x(p["x"]) - 9:.1f}" y="{y(p["y"]) + 4:.1f}" text-anchor="end">passed over</text>')
        if p.get("milestone"):
            parts.append(f'<text x="{x(p["x"]) + 9:.1f}" y="{y(p["y"]) - 8:.1f}" style="fill:#1f2328;font-weight:600">'
                         f'{escape(p["milestone"])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _rewrites(store: Store, search_runs: list[str]) -> list[dict[str, Any]]:
    """Kept rewrites of the wheel's prompt searches (not dropped, not invalid), each diffed with its parent."""
    out, seen = [], set()
    for run_id in search_runs:
        for it in store.iterations(run_id):
            prompt = store.prompt_row(it.prompt_id) if it.prompt_id else None
            if (not prompt or not (prompt["origin"] or "").startswith("proposer") or prompt["id"] in seen
                    or it.decision in ("dropped", "invalid") or not prompt["parent_id"]):
                continue
            seen.add(prompt["id"])
            parent = store.get_prompt(prompt["parent_id"])["messages"]
            mine = store.get_prompt(prompt["id"])["messages"]
            out.append({"prompt_id": prompt["id"], "parent_id": prompt["parent_id"], "origin": prompt["origin"],
                        "rationale": prompt["rationale"] or "", "decision": it.decision or "",
                        "diff": prompt_diff(parent, mine)})
    return out


def _search_points(store: Store, search_runs: list[str], minimise: str, measured: set[tuple[Any, Any]],
                   run_href: Callable[[str], str]) -> list[dict[str, Any]]:
    """Every candidate the wheel's prompt searches measured on all of valid, linked to its search;
    a finalist not chosen is "passed over". One the wheel measured itself (same model and prompt)
    is not `on_chart`: the wheel's own point stands for it."""
    out = []
    for run_id in search_runs:
        for it in store.iterations(run_id):
            if it.split != "valid" or _nan(it.score):
                continue
            prompt = store.prompt_row(it.prompt_id) if it.prompt_id else None
            decision = "passed over" if it.decision in PASSED_OVER else it.decision
            cost = store.iteration_cost(it.id)
            out.append({"x": cost.value(minimise), "cost_goal": cost.describe(minimise), "y": it.score, "run_id": run_id,
                        "label": (prompt or {}).get("origin") or it.stage or it.id, "decision": decision,
                        "reason": it.reason or "", "milestone": None, "href": run_href(run_id),
                        "prompt_id": it.prompt_id, "iteration_id": it.id,
                        "on_chart": (it.model_ref, it.prompt_id) not in measured})
    return out


def anchor_href(run_id: str) -> str:
    """The static report's link to a search run: its table in the wheel section."""
    return f"#search-{run_id}"


def wheel_section(store: Store, view: RunView, run_href: Callable[[str], str] = anchor_href) -> dict[str, Any] | None:
    """Laps, milestones and chart of a `flywheel run` (the first wheel run of the view), else None.

    `run_href(run_id)`: where a search's candidates link (the report: an anchor on the page; the
    review app: the search run's page)."""
    run = next((r for r in view.runs if r.kind == "wheel"), None)
    summary = RunSummary.of_run(run).model_dump() if run else {}
    if not run or "stages" not in summary:
        return None
    # A finished run keeps its result beside the stage records (flywheel.wheel.WheelState); a run
    # finished before that kept it at the top.
    records = summary["stages"]
    summary = summary.get("result") or summary
    minimise = summary.get("minimise") or "prompt_tokens"
    milestones = summary.get("milestones") or []
    named = {m["iteration_id"]: m["label"] for m in milestones}
    points = []
    for it in view.iterations:
        if it["run_id"] != run.id or it.get("split") != "valid" or _nan(it.get("score")):
            continue
        cost = store.iteration_cost(it["id"])
        points.append({"x": cost.value(minimise), "y": it["score"], "label": it["label"],
                       "decision": it.get("decision"), "milestone": named.get(it["id"])})
    laps: dict[int, list[dict[str, Any]]] = {}
    for outcome in summary.get("stages") or records or []:
        outcome = outcome.get("outcome", outcome)
        laps.setdefault(int(outcome.get("lap") or 1), []).append(outcome)
    rows = []
    for m in milestones:
        cost = CostPerItem.from_dict(m.get("cost"))
        rows.append({**m, "cost_goal": cost.describe(minimise), "cost_tokens": cost.describe("tokens"),
                     "cost_latency": cost.describe("latency_s")})
    search_runs = list(dict.fromkeys(o["search_run"] for lap in laps.values() for o in lap if o.get("search_run")))
    measured = {(it.get("model_ref"), it.get("prompt_id")) for it in view.iterations
                if it["run_id"] == run.id and it.get("split") == "valid"}
    found = _search_points(store, search_runs, minimise, measured, run_href)
    searches = [{"run_id": r, "href": run_href(r), "candidates": [p for p in found if p["run_id"] == r]}
                for r in search_runs]
    return {"milestones": rows, "laps": sorted(laps.items()), "stopped": summary.get("stopped"),
            "lap_wall_s": summary.get("lap_wall_s") or {}, "minimise": minimise, "searches": searches,
            "n_points": len([p for p in points + found if p.get("on_chart", True) and not _nan(p["x"])]),
            # The search's points first: the wheel's own (filled) ones are drawn on top of them.
            "chart": cost_chart_svg([p for p in found if p["on_chart"]] + points, minimise), "rewrites": _rewrites(store, search_runs),
            "wall_s": summary.get("wall_s") or summary.get("elapsed_s")}
