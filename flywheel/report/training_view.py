"""The training part of a report: for each checkpoint the report's iterations measured, the job
that trained it, drawn as train/valid loss curves and its checkpoints' valid scores (inline SVG).

    section = training_section(store, view)   # None when no iteration ran a trained checkpoint
"""

from __future__ import annotations

import json
import math
from typing import Any

from markupsafe import Markup, escape

from flywheel.report.compare import RunView
from flywheel.store import Store

TRAIN_COLOUR, VALID_COLOUR, SCORE_COLOUR = "#4f46e5", "#d97706", "#1a7f37"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def job_curves(store: Store, job_id: str) -> dict[str, Any]:
    """A job's train loss and valid loss by step (the last value logged at a step: a resumed job
    logs the steps after its saved one twice), its checkpoints, and why it stopped."""
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for event in store.training_events(job_id):
        if not event["data_json"]:
            continue
        data = json.loads(event["data_json"])
        step = data.get("step")
        if not isinstance(step, int):
            continue
        if event["type"] == "metrics" and _finite(data.get("loss")):
            train[step] = float(data["loss"])
        elif event["type"] == "validation" and _finite(data.get("valid_loss")):
            valid[step] = float(data["valid_loss"])
    job = store.get_training_job(job_id)
    checkpoints = []
    for checkpoint in store.job_checkpoints(job_id):
        metrics = checkpoint.metrics
        checkpoints.append({"id": checkpoint.id, "step": checkpoint.step, "train_loss": metrics.get("train_loss"),
                            "valid_loss": metrics.get("valid_loss"), "valid_score": metrics.get("valid_score"),
                            "pruned": bool(checkpoint.pruned_at), "best": checkpoint.id == job.checkpoint_id})
    return {"job_id": job_id, "method": job.method, "status": job.status, "stop_reason": job.stop_reason,
            "train": sorted(train.items()), "valid": sorted(valid.items()), "checkpoints": checkpoints}


def _polyline(points: list[tuple[float, float]], colour: str, dashed: bool = False) -> str:
    if not points:
        return ""
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'


def loss_curves_svg(curves: dict[str, Any], width: int = 1000, height: int = 240) -> Markup:
    """Train loss (solid) and valid loss (dashed, with dots) against the step; checkpoints as ticks,
    the best one labelled; each valid score as a green dot on a 0-100% right axis."""
    train, valid, checkpoints = curves["train"], curves["valid"], curves["checkpoints"]
    values = [v for _, v in train] + [v for _, v in valid]
    steps = [s for s, _ in train] + [s for s, _ in valid] + [c["step"] for c in checkpoints if c["step"]]
    if not values or not steps:
        return Markup('<p class="muted">No losses logged.</p>')
    pad_l, pad_r, pad_t, pad_b = 56, 56, 16, 40
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    max_step = max(steps) or 1

    def x(step: float) -> float:
        return pad_l + (width - pad_l - pad_r) * step / max_step

    def y(value: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - (value - low) / (high - low))

    def y_score(value: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - value)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="train and valid loss by step" preserveAspectRatio="xMidYMid meet">']
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eef1f4"/>'
                     f'<text x="{pad_l - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for k in range(5):
        s = max_step * k / 4
        parts.append(f'<text x="{x(s):.1f}" y="{height - pad_b + 16}" text-anchor="middle">{s:.0f}</text>')
    parts.append(f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 6}" text-anchor="middle">step · '
                 f'<tspan style="fill:{TRAIN_COLOUR}">train loss</tspan> · <tspan style="fill:{VALID_COLOUR}">'
                 f'valid loss</tspan> · <tspan style="fill:{SCORE_COLOUR}">valid score (right axis)</tspan></text>')
    for c in checkpoints:
        if not c["step"]:
            continue
        colour = SCORE_COLOUR if c["best"] else "#8c959f"
        title = escape(f"checkpoint {c['id']} at step {c['step']}" + (" (best)" if c["best"] else "")
                       + (" (folder pruned)" if c["pruned"] else ""))
        parts.append(f'<line x1="{x(c["step"]):.1f}" x2="{x(c["step"]):.1f}" y1="{pad_t}" y2="{height - pad_b}" '
                     f'stroke="{colour}" stroke-opacity="0.35"><title>{title}</title></line>')
        if c["best"]:
            parts.append(f'<text x="{x(c["step"]) + 4:.1f}" y="{pad_t + 10}" style="fill:{SCORE_COLOUR};'
                         f'font-weight:600">best</text>')
    parts.append(_polyline([(x(s), y(v)) for s, v in train], TRAIN_COLOUR))
    parts.append(_polyline([(x(s), y(v)) for s, v in valid], VALID_COLOUR, dashed=True))
    for s, v in valid:
        parts.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{VALID_COLOUR}">'
                     f'<title>{escape(f"valid loss {v:.4g} at step {s}")}</title></circle>')
    scored = [c for c in checkpoints if c["step"] and _finite(c["valid_score"])]
    if scored:
        for k in (0, 2, 4):
            parts.append(f'<text x="{width - pad_r + 8}" y="{y_score(k / 4) + 4:.1f}">{25 * k}%</text>')
        for c in scored:
            title = escape(f"{c['id']}: valid score {c['valid_score']:.3f} at step {c['step']}")
            parts.append(f'<circle cx="{x(c["step"]):.1f}" cy="{y_score(c["valid_score"]):.1f}" r="5" '
                         f'fill="{SCORE_COLOUR if c["best"] else "#fff"}" stroke="{SCORE_COLOUR}" stroke-width="2">'
                         f'<title>{title}</title></circle>')
    parts.append("</svg>")
    return Markup("".join(parts))


def training_section(store: Store, view: RunView) -> list[dict[str, Any]] | None:
    """One entry per training job whose checkpoint an iteration of the view measured: its curves
    (SVG) and checkpoint table; None when there is none."""
    jobs: list[str] = []
    for it in view.iterations:
        ref = it.get("model_ref") or ""
        if "+" not in ref:
            continue
        job_id = store.training_job_of(ref)
        if job_id and job_id not in jobs:
            jobs.append(job_id)
    out = []
    for job_id in jobs:
        curves = job_curves(store, job_id)
        if not curves["train"] and not curves["valid"]:
            continue
        out.append({**curves, "svg": loss_curves_svg(curves)})
    return out or None
