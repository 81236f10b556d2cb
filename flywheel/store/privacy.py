"""Privacy: exports, capture lineage and deletions (flywheel.privacy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, new_id, now


class PrivacyStore(StoreBase):
    """Exports, capture lineage and deletions."""

    def record_export(self, row: dict[str, Any]) -> str:
        """Record a file Flywheel wrote (so a deletion can find the copies in it); returns its id."""
        export_id = row.get("id") or new_id("export")
        with self.transaction():
            self.db["exports"].insert({"created_at": now(), **row, "id": export_id}, replace=True)
        return export_id

    def record_report(self, path: str | Path, run_ids: Sequence[str]) -> str:
        """Record a report written for `run_ids`: a deletion that removes any of those runs' items
        deletes it (an HTML page is not rewritten row by row; `flywheel report` writes it again)."""
        resolved = str(Path(path).resolve())
        return self.record_export({"id": "report-" + hashlib.sha256(resolved.encode()).hexdigest()[:16],
                                   "kind": "report", "path": resolved, "n_rows": 0,
                                   "source_json": json.dumps({"runs": list(run_ids)})})

    def list_exports(self) -> list[dict[str, Any]]:
        return list(self.db["exports"].rows_where(order_by="created_at"))

    def update_export(self, export_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["exports"].update(export_id, fields)

    def add_capture_copies(self, artefact: str, artefact_id: str, copies: Iterable[tuple[int, str]]) -> None:
        """Lineage: capture `capture_id` became the row hashing to `row_hash` in this artefact."""
        with self.transaction():
            self.db.conn.executemany(
                "insert or ignore into capture_copies (capture_id, artefact, artefact_id, row_hash) values (?,?,?,?)",
                [(int(c), artefact, artefact_id, h) for c, h in copies])

    def capture_copy_hashes(self, capture_ids: Sequence[int]) -> set[str]:
        """Row hashes of every recorded copy of these captures."""
        found: set[str] = set()
        ids = list(capture_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(r[0] for r in self.db.execute(
                f"select row_hash from capture_copies where capture_id in ({','.join('?' * len(chunk))})", chunk))
        return found

    def capture_items(self, capture_ids: Sequence[int]) -> set[tuple[str, str]]:
        """(dataset id, item key) of every eval item recorded as made from these captures."""
        found: set[tuple[str, str]] = set()
        ids = [int(i) for i in capture_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update((d, k) for d, k in self.db.execute(
                f"select dataset_id, item_key from capture_items where capture_id in ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def items_of_datasets_at(self, paths: Iterable[str]) -> list[dict[str, Any]]:
        """Items (`dataset_id`, `key`, `fields_json`) of the stored datasets read from these files."""
        wanted = {str(Path(p).resolve()) for p in paths}
        ids = [r["id"] for r in self.db["datasets"].rows_where(select="id, path")
               if r["path"] and str(Path(r["path"]).resolve()) in wanted]
        if not ids:
            return []
        return list(self.db.query(f"select dataset_id, key, fields_json from items where dataset_id in "
                                  f"({','.join('?' * len(ids))})", ids))

    def runs_of_datasets(self, dataset_ids: Iterable[str]) -> set[str]:
        """Ids of the runs that evaluated any of these datasets."""
        ids = list(set(dataset_ids))
        if not ids:
            return set()
        return {r[0] for r in self.db.execute(f"select id from runs where dataset_id in ({','.join('?' * len(ids))})",
                                              ids)}

    def delete_export(self, export_id: str) -> None:
        with self.transaction():
            self.db.conn.execute("delete from exports where id = ?", [export_id])

    def match_capture_ids(self, *, ids: Sequence[int] = (), metadata: dict[str, str] | None = None,
                          before: str | None = None) -> list[int]:
        """Ids of captures matching every given filter (ids, metadata values, created before)."""
        where, params = [], []
        if ids:
            where.append(f"id in ({','.join('?' * len(ids))})")
            params += [int(i) for i in ids]
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if before:
            where.append("created_at < ?")
            params.append(before)
        if not where:
            raise StoreError("refusing to match every capture: give ids, metadata or a date")
        return [r[0] for r in self.db.execute(f"select id from captures where {' and '.join(where)} order by id",
                                              params)]

    def checkpoints_trained_on(self, set_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Checkpoints trained on any of these sets, and every checkpoint trained on top of them."""
        found: dict[str, dict[str, Any]] = {}
        frontier = list(self.db["checkpoints"].rows_where(
            f"training_set_id in ({','.join('?' * len(set_ids))})", list(set_ids))) if set_ids else []
        while frontier:
            for row in frontier:
                found[row["id"]] = row
            ids = [r["id"] for r in frontier]
            frontier = [r for r in self.db["checkpoints"].rows_where(
                f"parent_id in ({','.join('?' * len(ids))})", ids) if r["id"] not in found]
        return sorted(found.values(), key=lambda r: r["created_at"] or "")

    def delete_captures(self, capture_ids: Sequence[int], deletion: dict[str, Any],
                        checkpoint_ids: Sequence[str], items: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
        """Delete captures, their lineage rows and the eval items made from them (`items`: dataset id,
        key) with those items' samples, grades, reviews and completion-cache entries; mark checkpoints
        and record the deletion; in one transaction. Returns the count of rows deleted per table (and
        `wal_busy`: 1 when another connection kept the -wal file from being emptied).

        Freed space is zeroed (`secure_delete`, on for every connection: `Store.open`), the WAL is
        checkpointed and truncated, and the file is vacuumed: a deleted row's bytes can also sit in
        free space left by earlier writes (a replaced cache row, a store written before secure_delete
        was on), which only a rebuild of the file removes."""
        ids = [int(i) for i in capture_ids]
        counts = {"items": 0, "samples": 0, "grades": 0, "reviews": 0, "completion_cache": 0}
        with self.transaction():
            conn = self.db.conn
            for dataset_id, key in sorted(set(items)):
                samples = [r[0] for r in conn.execute(
                    "select s.id from samples s join iterations i on i.id = s.iteration_id join runs r on "
                    "r.id = i.run_id where r.dataset_id = ? and s.item_key = ?", [dataset_id, key])]
                for start in range(0, len(samples), 500):
                    chunk = samples[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    counts["completion_cache"] += conn.execute(
                        f"delete from completion_cache where key in (select cache_key from samples where id in "
                        f"({marks}) and cache_key is not null)", chunk).rowcount
                    counts["reviews"] += conn.execute(
                        f"delete from reviews where sample_id in ({marks}) or other_sample_id in ({marks})",
                        chunk + chunk).rowcount
                    counts["grades"] += conn.execute(f"delete from grades where sample_id in ({marks})", chunk).rowcount
                    counts["samples"] += conn.execute(f"delete from samples where id in ({marks})", chunk).rowcount
                counts["items"] += conn.execute("delete from items where dataset_id = ? and key = ?",
                                                [dataset_id, key]).rowcount
                conn.execute("delete from capture_items where dataset_id = ? and item_key = ?", [dataset_id, key])
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"delete from capture_copies where capture_id in ({marks})", chunk)
                conn.execute(f"delete from capture_items where capture_id in ({marks})", chunk)
                conn.execute(f"delete from captures where id in ({marks})", chunk)
            for checkpoint_id in checkpoint_ids:
                conn.execute(
                    "update checkpoints set trained_on_deleted = ? where id = ? and trained_on_deleted is null",
                    [deletion["id"], checkpoint_id])
            self.db["deletions"].insert({"created_at": now(), **deletion})
        self.db.execute("pragma wal_checkpoint(TRUNCATE)")
        self.db.execute("vacuum")
        # busy: another connection still reads an older snapshot, so the -wal file could not be emptied
        counts["wal_busy"] = self.db.execute("pragma wal_checkpoint(TRUNCATE)").fetchone()[0]
        return counts

    def list_deletions(self) -> list[dict[str, Any]]:
        return list(self.db["deletions"].rows_where(order_by="created_at"))
