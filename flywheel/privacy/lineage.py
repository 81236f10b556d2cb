"""Where captured rows were copied: recorded exports and row-level lineage, found again by hash.

    export_id = record_export(store, "train.jsonl", "sft", rows, capture_ids=ids, redaction=report)
    record_copies(store, "training_set", training_set.id, ids, training_set.rows)
    record_list(store, "run.outputs.json", "api_eval_run_outputs", outputs, capture_ids=ids)
    store.record_report(".flywheel/reports/run-1.html", ["run-1"])   # (a report: the store records it)

A copy is identified by the sha256 of its canonical JSON (`row_hash`: sorted keys, the form
`TrainingSet.jsonl` writes), so a deletion finds a captured row in any recorded file, whichever
way it got there: an export, a training set built from captures, or a set loaded from an export
file (`flywheel train sft --data export.jsonl`) — the row is the same JSON, so the same hash.
An API run's items file is such an export; the eval items stored from it are found by the same
hash. Items of a `dataset.captures` eval are recorded by key (`capture_items`, written by
`Store.save_dataset`), samples carry their completion-cache key, and reports record their runs.
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


JSON_LIST = "json_list"  # an export's `source_json` format: one JSON list, rows are [index, entry]


def record_list(store: Store, path: str | Path, kind: str, entries: Sequence[Any],
                capture_ids: Sequence[int | None]) -> str | None:
    """Record a JSON list file whose entry `i` came from capture `capture_ids[i]` (e.g. an API run's
    recorded outputs, read by position): a deletion blanks those entries, keeping the positions."""
    if all(c is None for c in capture_ids):
        return None
    return record_export(store, path, kind, [[i, e] for i, e in enumerate(entries)], capture_ids=capture_ids,
                         source={"format": JSON_LIST})


def blank_entries(path: str | Path, hashes: set[str], *, dry_run: bool = False) -> tuple[int, int] | None:
    """Rewrite a JSON list file (`record_list`) with `None` in place of the entries whose [index,
    entry] hash is in `hashes` (atomically). Returns (blanked, left), or None if the file is gone."""
    path = Path(path)
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, list):
        return None
    hit = [i for i, e in enumerate(entries) if e is not None and row_hash([i, e]) in hashes]
    if hit and not dry_run:
        for i in hit:
            entries[i] = None
        staging = path.with_name(path.name + ".deleting")
        staging.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
        staging.replace(path)
    return len(hit), sum(1 for e in entries if e is not None) - (len(hit) if dry_run else 0)


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
