"""Captures: the calls the flywheel proxy recorded (flywheel.proxy, the API's logs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, now
from flywheel.store.rows import Capture


@dataclass(frozen=True)
class CompletionFilter:
    """Which stored chat completions (captures answered 200 without error) an API source selects;
    `flywheel.api.logs` checks the request and builds it, `CapturesStore.stored_completions` reads."""

    project: str = "default"  # proxy captures (no project) belong to `default`
    metadata: Mapping[str, str] = field(default_factory=dict)
    since: str | None = None  # ISO times, [since, until)
    until: str | None = None
    model: str | None = None
    instructions_search: str | None = None  # case-blind substring of system / developer messages
    users: tuple[str, ...] | None = None  # the request's `user` field, any of these
    sampling: Mapping[str, float] = field(default_factory=dict)  # temperature / top_p (absent reads as 1.0)
    limit: int | None = None


class CapturesStore(StoreBase):
    """Captured proxy calls."""

    CAPTURE_COLUMNS = ("created_at", "endpoint", "upstream", "model", "stream", "status", "latency_s",
                       "prompt_tokens", "completion_tokens", "total_tokens", "metadata_json",
                       "request_json", "request_bytes", "response_json", "response_id", "error", "api_project")

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

    def captured_response_ids(self, response_ids: Sequence[str]) -> set[str]:
        """Which of these response ids (a platform's `chatcmpl-...`) a capture already holds."""
        found: set[str] = set()
        ids = list(dict.fromkeys(response_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(r for (r,) in self.db.execute(
                f"select response_id from captures where response_id in ({','.join('?' * len(chunk))})", chunk))
        return found

    def query_captures(self, *, ids: Sequence[int] = (), metadata: dict[str, str] | None = None,
                       since: str | None = None, until: str | None = None, model: str | None = None,
                       outcome: str | None = None, limit: int | None = None,
                       newest_first: bool = False) -> list[Capture]:
        """Captures filtered by id (any of `ids`, when given), metadata values (all must match), time
        [since, until), model and outcome (`ok`: status 200 without error, `failed`: the others)."""
        where, params = [], []
        if ids:
            where.append(f"id in ({','.join('?' * len(ids))})")
            params += [int(i) for i in ids]
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
        return [Capture.from_row(row) for row in self.db.query(sql, params)]

    def stored_completions(self, selection: CompletionFilter) -> list[dict[str, Any]]:
        """The captured chat completions a `CompletionFilter` selects, oldest first: id, model,
        metadata_json, request_json, response_json and response_id."""
        where = ["error is null", "status = 200", "endpoint = '/v1/chat/completions'"]
        params: list[Any] = []
        if selection.project == "default":
            where.append("(api_project is null or api_project = 'default')")
        else:
            where.append("api_project = ?")
            params.append(selection.project)
        for key, value in selection.metadata.items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if selection.since is not None:
            where.append("created_at >= ?")
            params.append(selection.since)
        if selection.until is not None:
            where.append("created_at < ?")
            params.append(selection.until)
        if selection.model is not None:
            where.append("model = ?")
            params.append(selection.model)
        if selection.instructions_search is not None:
            where.append("exists (select 1 from json_each(json_extract(request_json, '$.messages')) m"
                         " where json_extract(m.value, '$.role') in ('system', 'developer')"
                         " and instr(lower(json_extract(m.value, '$.content')), lower(?)) > 0)")
            params.append(selection.instructions_search)
        if selection.users is not None:
            where.append(f"json_extract(request_json, '$.user') in ({','.join('?' * len(selection.users))})")
            params += list(selection.users)
        for name, value in selection.sampling.items():
            if name not in ("temperature", "top_p"):
                raise StoreError(f"not a sampling filter: {name}")
            where.append(f"abs(coalesce(json_extract(request_json, '$.{name}'), 1.0) - ?) < 1e-9")
            params.append(float(value))
        sql = ("select id, model, metadata_json, request_json, response_json, response_id from captures where "
               + " and ".join(where) + " order by created_at, id")
        if selection.limit is not None:
            sql += " limit ?"
            params.append(int(selection.limit))
        return list(self.db.query(sql, params))
