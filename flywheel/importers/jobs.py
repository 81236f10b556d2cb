"""A fine-tuning job's result file (the platform's per-step metrics CSV) -> the job's metrics, kept
beside the job `import openai-job` queues here (flywheel.api.convert), for comparison.

    metrics = read_result_file("step_metrics.csv", job=job_json)
    metrics.final["train_loss"], metrics.to_dict()

The job's `result_files[0]` is a CSV with one row per training step. Its exact column set is not
in the SDK's types; ../shared/reference/openai-platform.md §5.8 records `step, train_loss,
train_accuracy, valid_loss, valid_mean_token_accuracy` (a third-party report) and the checkpoint
metrics `train_mean_token_accuracy`, `full_valid_loss`, `full_valid_mean_token_accuracy`. So: a
`step` column is required (whole numbers, increasing), every other column is kept by its name, and
each value is a finite number or empty (the platform leaves validation columns empty on steps it
did not validate). Anything else is one PlatformImportError `file:line: column: message`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import PlatformImportError

MAX_BYTES = 64 << 20  # a per-step CSV of a very long job is a few MB


@dataclass
class JobMetrics:
    """The per-step metrics of a platform job (its result file), and what they came from."""

    source: str  # the result file's name
    columns: list[str]
    steps: list[dict[str, float | None]]
    platform_job: dict[str, Any] = field(default_factory=dict)  # id, fine_tuned_model, trained_tokens, ...

    @property
    def final(self) -> dict[str, float]:
        """Each column's last value (the last step that has one)."""
        last: dict[str, float] = {}
        for row in self.steps:
            last.update({k: v for k, v in row.items() if v is not None})
        return last

    @property
    def best(self) -> dict[str, float]:
        """The lowest value of every `*loss` column."""
        return {c: min(vals) for c in self.columns if c.endswith("loss")
                for vals in [[r[c] for r in self.steps if r.get(c) is not None]] if vals}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "columns": self.columns, "steps": self.steps, "final": self.final,
                "best": self.best, "platform_job": self.platform_job}


def _number(text: str, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise PlatformImportError(f"{where}: {text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise PlatformImportError(f"{where}: {text!r} is not a finite number")
    return value


def read_result_file(path: str | Path, *, job: dict[str, Any] | None = None) -> JobMetrics:
    """Read and check a job's metrics CSV (module docstring); `job`: the platform job object, whose
    id, fine-tuned model, trained tokens and hyper-parameters are kept with the metrics."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise PlatformImportError(f"{path}: larger than {MAX_BYTES >> 20} MB; not a job's metrics file")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PlatformImportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PlatformImportError(f"{path}: not UTF-8 text (a metrics CSV is)") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise PlatformImportError(f"{path}:1: empty; a result file starts with a header row (step, train_loss, ...)")
    columns = [c.strip() for c in rows[0]]
    if "step" not in columns:
        raise PlatformImportError(f"{path}:1: step: missing from the header (got {', '.join(columns)[:200]})")
    blank = next((i for i, c in enumerate(columns) if not c), None)
    if blank is not None:
        raise PlatformImportError(f"{path}:1: column {blank + 1}: empty name")
    twice = next((c for i, c in enumerate(columns) if c in columns[:i]), None)
    if twice is not None:
        raise PlatformImportError(f"{path}:1: {twice}: appears twice in the header")
    steps: list[dict[str, float | None]] = []
    previous = None
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise PlatformImportError(f"{path}:{number}: {len(row)} values for {len(columns)} columns "
                                      "(a truncated or edited file)")
        values = {c: _number(v, f"{path}:{number}: {c}") for c, v in zip(columns, row)}
        step = values["step"]
        if step is None or step != int(step) or step < 0:
            raise PlatformImportError(f"{path}:{number}: step: expected a whole number, got {row[columns.index('step')]!r}")
        if previous is not None and step <= previous:
            raise PlatformImportError(f"{path}:{number}: step: {int(step)} after {int(previous)}; steps increase")
        previous = step
        values["step"] = int(step)
        steps.append(values)
    if not steps:
        raise PlatformImportError(f"{path}: no step rows under the header")
    kept = {k: job.get(k) for k in ("id", "model", "fine_tuned_model", "trained_tokens", "hyperparameters",
                                    "method", "status", "result_files")
            if job and job.get(k) is not None}
    return JobMetrics(source=path.name, columns=columns, steps=steps, platform_job=kept)
