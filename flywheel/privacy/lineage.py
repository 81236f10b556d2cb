"""Where captured rows were copied: recorded exports and row-level lineage, found again by hash.

    export_id = record_export(store, "train.jsonl", "sft", rows, capture_ids=ids, redaction=report)
    record_copies(store, "training_set", training_set.id, ids, training_set.rows)

A copy is identified by the sha256 of its canonical JSON (`row_hash`: sorted keys, the form
`TrainingSet.jsonl` writes), so a deletion finds a captured row in any recorded file, whichever
way it got there: an export, a training set built from captures, or a set loaded from an export
file (`flywheel train sft --data export.jsonl`) — the row is the same JSON, so the same hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flywheel.store import Store


def row_hash(row: Any) -> str:
    """sha256 of a row's canonical JSON (sorted keys, unescaped unicode)."""
    return hashlib.sha256(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def record_copies(store: Store, artefact: str, artefact_id: str, capture_ids: Sequence[int | None],
                  rows: Sequence[Any]) -> None:
    """Record that `rows[i]` came from capture `capture_ids[i]` (None: not from a capture)."""
    store.add_capture_copies(artefact, artefact_id,
                             [(c, row_hash(r)) for c, r in zip(capture_ids, rows) if c is not None])


def record_export(store: Store, path: str | Path, kind: str, rows: Sequence[Any], *,
                  capture_ids: Sequence[int | None] | None = None, redaction: dict[str, Any] | None = None,
                  source: dict[str, Any] | None = None) -> str:
    """Record a JSONL file Flywheel wrote (and, for captured rows, their lineage); returns its id."""
    digest = hashlib.sha256("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                    for r in rows).encode("utf-8")).hexdigest()
    export_id = store.record_export({
        "kind": kind, "path": str(Path(path).resolve()), "n_rows": len(rows), "content_hash": digest,
        "redaction_json": json.dumps(redaction, ensure_ascii=False) if redaction else None,
        "source_json": json.dumps(source or {}, ensure_ascii=False, default=str)})
    if capture_ids is not None:
        record_copies(store, "export", export_id, capture_ids, rows)
    return export_id


def drop_rows(path: str | Path, hashes: set[str]) -> tuple[int, int] | None:
    """Rewrite a JSONL file without the rows whose hash is in `hashes` (other lines kept verbatim,
    atomically: a staging file renamed over it). Returns (removed, kept), or None if the file is gone."""
    path = Path(path)
    try:
        # lines end at "\n" only: a row may hold U+2028 or U+0085 (flywheel.data.read_jsonl)
        lines = path.read_bytes().decode("utf-8").split("\n")
        lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    except (OSError, UnicodeDecodeError):
        return None
    kept, removed = [], 0
    for line in lines:
        try:
            matched = bool(line.strip()) and row_hash(json.loads(line)) in hashes
        except ValueError:
            matched = False
        if matched:
            removed += 1
        else:
            kept.append(line)
    if removed:
        staging = path.with_name(path.name + ".deleting")
        staging.write_text("".join(kept), encoding="utf-8")
        staging.replace(path)
    return removed, sum(1 for line in kept if line.strip())
