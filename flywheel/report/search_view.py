"""Hyper-parameter searches in reports: a table of every configuration a search tried (params,
valid score, loss, state, steps, wall time, checkpoint), the winner and why.

    searches = search_tables(store, store.training_searches([run_id]))   # inside a run's report
    write_search_report(store, "search-sft-...", "search.html")           # one search on its own page
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.report.render import TEMPLATES, templates_env
from flywheel.store import Store


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_distribution(dist: dict[str, Any]) -> str:
    """`8, 16, 32` for choices; `0.0001 .. 0.005 log` or `1 .. 3 step 1` for a range."""
    if dist.get("choices") is not None:
        return "choices " + ", ".join(_cell(v) for v in dist["choices"])
    text = f"{_cell(dist.get('low'))} .. {_cell(dist.get('high'))}"
    return text + (" log" if dist.get("log") else "") + (f" step {_cell(dist['step'])}" if dist.get("step") else "")


def search_tables(store: Store, searches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the report shows of each search row: its settings, its trials as table rows, the winner."""
    out = []
    for search in searches:
        trials = store.search_trials(search["id"])
        params = [json.loads(t["params_json"] or "{}") for t in trials]
        keys = sorted({k for p in params for k in p})
        settings = json.loads(search["settings_json"] or "{}")
        rows = [{"number": t["number"], "state": t["state"], "params": [_cell(p.get(k)) for k in keys],
                 "valid": t["valid_score"], "loss": _cell(t["loss"]), "steps": _cell(t["steps"]),
                 "wall_s": t["wall_s"], "checkpoint": t["checkpoint_id"], "error": t["error"],
                 "best": t["number"] == search["best_trial"]} for t, p in zip(trials, params)]
        out.append({"id": search["id"], "method": search["method"], "sampler": search["sampler"],
                    "signal": search["signal"] or "loss", "status": search["status"],
                    "stopped_by": search["stopped_by"], "wall_s": search["wall_s"],
                    "budget_s": settings.get("wall_s"), "columns": keys, "rows": rows, "reason": search["reason"],
                    "base_model": search["base_model"], "training_set_id": search["training_set_id"],
                    "space": {k: describe_distribution(d) for k, d in (settings.get("space") or {}).items()}})
    return out


def render_search_report(store: Store, search_id: str) -> str:
    """A self-contained HTML page (no script, no request) of one search."""
    searches = search_tables(store, [store.get_training_search(search_id)])
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8")
    return templates_env().get_template("training_search.html.j2").render(
        title=f"search {search_id}", searches=searches, css=css,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_search_report(store: Store, search_id: str, path: str | Path) -> Path:
    """Write the page of one search to `path`."""
    html = render_search_report(store, search_id)
    target = Path(path)
    try:
        target.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise FlywheelError(f"{target}: cannot write the report: {exc.strerror or exc}") from None
    return target
