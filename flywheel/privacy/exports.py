"""Proxy captures out of the store, redacted by default: SFT JSONL exports and training sets.

    result = export_captures(store, "train.jsonl", metadata={"usecase": "triage"})   # redacted
    result = export_captures(store, "raw.jsonl", redact=None)                          # verbatim, on request
    result = export_captures(store, "train.jsonl", record_set=True)  # also a training set (ts-sft-...)

Each capture is redacted as one conversation (request messages and reply share pseudonyms). The
export is recorded in `exports`, each row's lineage in `capture_copies`, and the redaction report
(policy, entities replaced per kind) beside the file's row; a recorded training set carries the
same report in `training_sets.redaction_json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flywheel.proxy.captures import parse_when, sft_example
from flywheel.errors import FlywheelError
from flywheel.privacy.lineage import record_copies, record_export
from flywheel.privacy.redact import RedactionPolicy, Redactor
from flywheel.store import Store


@dataclass
class CaptureExport:
    path: str
    written: int
    skipped: int
    export_id: str
    redaction: dict[str, Any] | None
    training_set_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def capture_rows(store: Store, *, metadata: dict[str, str] | None = None, since: str | None = None,
                 until: str | None = None, model: str | None = None,
                 redact: RedactionPolicy | None = RedactionPolicy()) -> tuple[list[dict[str, Any]], list[int], int,
                                                                            dict[str, Any] | None]:
    """SFT rows from the successful matching captures, oldest first, redacted unless `redact` is None.
    Returns (rows, their capture ids, captures skipped, redaction report)."""
    captures = store.query_captures(
        metadata=metadata, since=parse_when(since), until=parse_when(until, end=True, option="--until"),
        model=model, outcome="ok")
    redactor = Redactor(redact) if redact is not None else None
    rows, ids = [], []
    for capture in captures:
        example = sft_example(capture)
        if example is None:
            continue
        rows.append(redactor.redact_json(example) if redactor else example)
        ids.append(capture.id)
    return rows, ids, len(captures) - len(rows), redactor.report() if redactor else None


def export_captures(store: Store, path: str | Path, *, metadata: dict[str, str] | None = None,
                    since: str | None = None, until: str | None = None, model: str | None = None,
                    redact: RedactionPolicy | None = RedactionPolicy(), record_set: bool = False) -> CaptureExport:
    """Write successful captures as SFT JSONL (redacted unless `redact` is None) and record the
    file and each row's lineage; with `record_set`, also record the rows as an SFT training set."""
    rows, ids, skipped, report = capture_rows(store, metadata=metadata, since=since, until=until, model=model,
                                              redact=redact)
    path = Path(path)
    try:
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise FlywheelError(f"{path}: cannot write export: {exc.strerror}") from None
    filters = {"metadata": metadata, "since": since, "until": until, "model": model}
    export_id = record_export(store, path, "sft", rows, capture_ids=ids, redaction=report,
                              source={"proxy_captures": filters})
    result = CaptureExport(path=str(path), written=len(rows), skipped=skipped, export_id=export_id, redaction=report)
    if record_set:
        if not rows:
            raise FlywheelError("no successful captures match: nothing to record as a training set")
        result.training_set_id = record_capture_set(store, rows, ids, report, filters)
    return result


def record_capture_set(store: Store, rows: list[dict[str, Any]], capture_ids: list[int],
                       redaction: dict[str, Any] | None, filters: dict[str, Any]) -> str:
    """Record captured SFT rows as a training set (under .flywheel/sets), with the redaction
    report and each row's lineage; returns the set id."""
    from flywheel.train.formats import TrainingSet
    from flywheel.train.sets import record_training_set

    training_set = record_training_set(store, TrainingSet("sft", rows, {
        "method": "sft", "proxy_captures": filters, "n_captures": len(capture_ids),
        "redacted": redaction is not None}))
    store.update_training_set(training_set.id, redaction_json=json.dumps(redaction, ensure_ascii=False)
                              if redaction else None)
    record_copies(store, "training_set", training_set.id, capture_ids, rows)  # type: ignore[arg-type]
    return training_set.id  # type: ignore[return-value]
