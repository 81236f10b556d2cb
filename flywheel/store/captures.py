"""Captures: the calls the flywheel proxy recorded (flywheel.proxy, the API's logs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flywheel.store.db import StoreBase, now


class CapturesStore(StoreBase):
    """Captured proxy calls."""

    CAPTURE_COLUMNS = ("created_at", "endpoint", "upstream", "model", "stream", "status", "latency_s",
                       "prompt_tokens", "completion_tokens", "total_tokens", "metadata_json",
                       "request_json", "request_bytes", "response_json", "response_id", "error")

    def insert_captures(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Record proxied calls in one transaction; returns their ids."""
        ids = []
        marks = ",".join("?" * len(self.CAPTURE_COLUMNS))
        with self.transaction():
            cursor = self.db.conn.cursor()
            for row in rows:
                values = [row.get(c) for c in self.CAPTURE_COLUMNS]
                values[0] = values[0] or now()
                cursor.execute(f"insert into captures ({', '.join(self.CAPTURE_COLUMNS)}) values ({marks})", values)
                ids.append(cursor.lastrowid)
        return ids

    def query_captures(self, *, metadata: dict[str, str] | None = None, since: str | None = None,
                       until: str | None = None, model: str | None = None, outcome: str | None = None,
                       limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        """Captures filtered by metadata values (all must match), time [since, until), model and
        outcome (`ok`: status 200 without error, `failed`: the others)."""
        where, params = [], []
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if since:
            where.append("created_at >= ?")
            params.append(since)
        if until:
            where.append("created_at < ?")
            params.append(until)
        if model:
            where.append("model = ?")
            params.append(model)
        if outcome == "ok":
            where.append("error is null and status = 200")
        elif outcome == "failed":
            where.append("(error is not null or status is not 200)")
        sql = "select * from captures" + (" where " + " and ".join(where) if where else "")
        sql += " order by created_at desc, id desc" if newest_first else " order by created_at, id"
        if limit:
            sql += f" limit {int(limit)}"
        return list(self.db.query(sql, params))
