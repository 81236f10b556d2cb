"""Delete captured traffic and every copy Flywheel made of it; mark what was trained on it.

    result = delete_captures(store, metadata={"user": "u-123"})       # a data subject's request
    result = delete_captures(store, before=parse_when("90d"), reason="retention")
    result.checkpoints   # ids of checkpoints trained on a set that held deleted rows

Steps, in this order (a crash between them leaves the captures in place, so re-running finishes):

1. the matching capture ids (every given filter must hold; no filter is refused);
2. the row hashes of their recorded copies (`capture_copies`, see `lineage`) and the eval items
   made from them: items of `dataset.captures` evals (`capture_items`) and items stored from a
   recorded file (an API run's items) whose fields hash to a copy;
3. every recorded training set (.flywheel/sets/...) and recorded export file is rewritten without
   the rows with those hashes (a JSON list file, an API run's recorded outputs, gets `null` in
   their place); a set's row gets its new content hash and row count; reports of the runs that
   evaluated those items are deleted;
4. checkpoints trained on a rewritten set, and those trained on top of them, are marked
   `trained_on_deleted` with the deletion id (they stay: retraining is the user's decision);
5. in one transaction, the capture rows, their lineage rows, the eval items with their samples,
   grades, reviews and completion-cache entries go, and a `deletions` row records ids and places
   (never text); freed space is zeroed (secure_delete), the WAL is checkpointed and truncated and
   the file vacuumed, so the text is in none of the database files afterwards (`Store.delete_captures`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.privacy.lineage import JSON_LIST, blank_entries, drop_rows, row_hash
from flywheel.privacy.redact import PrivacyError
from flywheel.store import Store, new_id


@dataclass
class DeletionResult:
    id: str | None
    reason: str
    captures: list[int]
    training_sets: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    eval_items: int = 0
    reports: list[str] = field(default_factory=list)
    rows_deleted: dict[str, int] = field(default_factory=dict)
    wal_busy: bool = False
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"{verb} {len(self.captures)} captures" + (f" ({self.id})" if self.id else "")]
        for ts in self.training_sets:
            lines.append(f"  training set {ts['id']}: {ts['rows_removed']} rows removed, {ts['rows_left']} left ({ts['path']})")
        for ex in self.exports:
            lines.append(f"  export {ex['path']}: {ex['rows_removed']} rows removed, {ex['rows_left']} left")
        if self.eval_items:
            rows = ", ".join(f"{n} {table}" for table, n in self.rows_deleted.items() if n)
            lines.append(f"  eval items made from them: {self.eval_items}" + (f" ({rows})" if rows else ""))
        for path in self.reports:
            lines.append(f"  report {'to be ' if self.dry_run else ''}deleted (it showed those items): {path}")
        if self.wal_busy:
            lines.append("  warning: another process reads the store, so the -wal file may still hold deleted text;"
                         " stop it and run the deletion again")
        for path in self.missing_files:
            lines.append(f"  not found (moved or deleted outside Flywheel): {path}")
        if self.checkpoints:
            lines.append(f"  checkpoints trained on deleted data ({'to be ' if self.dry_run else ''}marked): "
                         + ", ".join(self.checkpoints))
        return lines


def delete_captures(store: Store, *, ids: list[int] | tuple[int, ...] = (), metadata: dict[str, str] | None = None,
                    before: str | None = None, reason: str = "request", dry_run: bool = False) -> DeletionResult:
    """Delete the captures matching every given filter (`before`: a store timestamp, as
    `captures.parse_when` gives) and their copies; see the module docstring for the steps."""
    if not ids and not metadata and not before:
        raise PrivacyError("captures delete: give --id, --metadata or --before (refusing to delete everything)")
    capture_ids = store.match_capture_ids(ids=ids, metadata=metadata, before=before)
    result = DeletionResult(id=None, reason=reason, captures=capture_ids, dry_run=dry_run)
    if not capture_ids:
        return result
    hashes = store.capture_copy_hashes(capture_ids)
    exports = store.list_exports()
    items = store.capture_items(capture_ids)
    if hashes:  # items stored from a recorded file (an API run's items) are the file's rows
        items.update((row["dataset_id"], row["key"]) for row in store.items_of_datasets_at(
            e["path"] for e in exports if e["kind"] != "report")
            if row_hash(json.loads(row["fields_json"])) in hashes)
    result.eval_items = len(items)
    runs = store.runs_of_datasets(dataset_id for dataset_id, _ in items)
    reports = [e for e in exports if e["kind"] == "report"
               and runs.intersection(json.loads(e["source_json"] or "{}").get("runs") or [])]
    result.reports = [e["path"] for e in reports]
    affected_sets: list[str] = []
    if hashes:
        for row in store.list_training_sets():
            outcome = _count(row["path"], hashes) if dry_run else drop_rows(row["path"], hashes)
            if outcome is None:
                result.missing_files.append(row["path"])
                continue
            removed, left = outcome
            if removed:
                affected_sets.append(row["id"])
                result.training_sets.append({"id": row["id"], "path": row["path"], "rows_removed": removed,
                                             "rows_left": left})
                if not dry_run:
                    store.update_training_set(row["id"], content_hash=_content_hash(row["kind"], row["path"]),
                                              n_rows=left, deleted_rows=(row.get("deleted_rows") or 0) + removed)
        for row in exports:
            if row["kind"] == "report":
                continue
            if json.loads(row["source_json"] or "{}").get("format") == JSON_LIST:
                outcome = blank_entries(row["path"], hashes, dry_run=dry_run)
            else:
                outcome = _count(row["path"], hashes) if dry_run else drop_rows(row["path"], hashes)
            if outcome is None:
                result.missing_files.append(row["path"])
                continue
            removed, left = outcome
            if removed:
                result.exports.append({"id": row["id"], "path": row["path"], "rows_removed": removed, "rows_left": left})
                if not dry_run:
                    store.update_export(row["id"], n_rows=left)
    result.checkpoints = [c["id"] for c in store.checkpoints_trained_on(affected_sets)]
    if dry_run:
        return result
    for report in reports:
        Path(report["path"]).unlink(missing_ok=True)
        store.delete_export(report["id"])
    result.id = new_id("del")
    counts = store.delete_captures(capture_ids, {
        "id": result.id, "reason": reason,
        "filters_json": json.dumps({"ids": list(ids), "metadata": metadata, "before": before}),
        "n_captures": len(capture_ids), "capture_ids_json": json.dumps(capture_ids),
        "training_sets_json": json.dumps(result.training_sets), "exports_json": json.dumps(result.exports),
        "checkpoints_json": json.dumps(result.checkpoints)}, result.checkpoints, items)
    result.wal_busy = bool(counts.pop("wal_busy", 0))
    result.rows_deleted = counts
    return result


def _count(path: str, hashes: set[str]) -> tuple[int, int] | None:
    try:
        # "\n" only: rows written with ensure_ascii=False may hold U+2028 (flywheel.data.read_jsonl)
        lines = [line for line in Path(path).read_bytes().decode("utf-8").split("\n") if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    removed = 0
    for line in lines:
        try:
            removed += row_hash(json.loads(line)) in hashes
        except ValueError:
            pass
    return removed, len(lines) - removed


def _content_hash(kind: str, path: str) -> str:
    """The training set's content hash after a rewrite (as `TrainingSet.content_hash` computes it)."""
    from flywheel.data import read_jsonl
    from flywheel.train.formats import TrainingSet

    return TrainingSet(kind, [row for _, row in read_jsonl(path)]).content_hash
