"""Privacy: exports, capture lineage and deletions (flywheel.privacy)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
                        checkpoint_ids: Sequence[str]) -> None:
        """Delete captures and their lineage rows, mark checkpoints and record the deletion, in one
        transaction; freed pages are zeroed (secure_delete) and the WAL is checkpointed and
        truncated, so the deleted text is no longer in the database files."""
        ids = [int(i) for i in capture_ids]
        self.db.execute("pragma secure_delete=on")
        with self.transaction():
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                self.db.conn.execute(f"delete from capture_copies where capture_id in ({marks})", chunk)
                self.db.conn.execute(f"delete from captures where id in ({marks})", chunk)
            for checkpoint_id in checkpoint_ids:
                self.db.conn.execute(
                    "update checkpoints set trained_on_deleted = ? where id = ? and trained_on_deleted is null",
                    [deletion["id"], checkpoint_id])
            self.db["deletions"].insert({"created_at": now(), **deletion})
        self.db.execute("pragma wal_checkpoint(TRUNCATE)")

    def list_deletions(self) -> list[dict[str, Any]]:
        return list(self.db["deletions"].rows_where(order_by="created_at"))
