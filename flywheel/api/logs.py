"""Eval runs over stored logs: the `stored_completions` and `responses` sources, read from captures.

Chat completions made with `store: true` on this server (and calls recorded by `flywheel proxy`)
are rows of the `captures` table. A run source selects them by filters and grades each reply as it
is (`{item, sample}` rows: the item holds the request's `input` messages, `model`, `metadata`,
`completion_id`; the sample the reply's text):

* `{"type": "stored_completions", metadata?, model?, created_after?, created_before?, limit?}` —
  the platform's filters, as they are.
* `{"type": "responses", metadata?, model?, created_after?, created_before?, instructions_search?,
  users?, temperature?, top_p?}` — the platform selects stored Responses; this server stores chat
  completions only, so these filters select among them: `instructions_search` is a case-blind
  substring of the request's system / developer messages (the Responses API's `instructions`),
  `users` its `user` field, `temperature` / `top_p` its sampling values. `tools` and
  `reasoning_effort` filters have nothing to match here and are a 400.

An eval whose `data_source_config` is `logs` / `stored_completions` with `metadata` adds that
filter to every stored source of its runs, as the platform scopes such evals. A project sees its
own stored completions; proxy captures (no project) belong to the `default` project.

    rows = stored_rows(store, {"type": "responses", "instructions_search": "support"}, project="default")
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from flywheel.api.errors import check_metadata, invalid
from flywheel.store import Store

STORED_SOURCES = ("stored_completions", "responses")
UNSUPPORTED_FILTERS = ("tools", "reasoning_effort")
PARAM = "data_source.source"


def _when(source: dict[str, Any], name: str) -> str | None:
    value = source.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"{PARAM}.{name} must be a unix timestamp.", f"{PARAM}.{name}")
    return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="milliseconds")


def capture_filters(source: dict[str, Any], project: str,
                    config_metadata: dict[str, str] | None = None) -> tuple[list[str], list[Any]]:
    """SQL conditions on `captures` for a stored source (400 naming an unsupported filter)."""
    kind = source.get("type")
    for name in UNSUPPORTED_FILTERS:
        if kind == "responses" and source.get(name) not in (None, [], ""):
            raise invalid(f"{PARAM}.{name}: this server stores chat completions, which have no {name} to "
                          "filter on; drop the filter.", f"{PARAM}.{name}")
    where = ["error is null", "status = 200", "endpoint = '/v1/chat/completions'"]
    params: list[Any] = []
    if project == "default":
        where.append("(api_project is null or api_project = 'default')")
    else:
        where.append("api_project = ?")
        params.append(project)
    metadata = {**(config_metadata or {}), **(check_metadata(source.get("metadata"), f"{PARAM}.metadata") or {})}
    for key, value in metadata.items():
        where.append("json_extract(metadata_json, ?) = ?")
        params += ['$."' + key.replace('"', '""') + '"', value]
    for name, op in (("created_after", ">="), ("created_before", "<")):
        if (at := _when(source, name)) is not None:
            where.append(f"created_at {op} ?")
            params.append(at)
    if source.get("model") is not None:
        where.append("model = ?")
        params.append(_string(source, "model"))
    if kind == "responses":
        if source.get("instructions_search") is not None:
            where.append("exists (select 1 from json_each(json_extract(request_json, '$.messages')) m"
                         " where json_extract(m.value, '$.role') in ('system', 'developer')"
                         " and instr(lower(json_extract(m.value, '$.content')), lower(?)) > 0)")
            params.append(_string(source, "instructions_search"))
        users = source.get("users")
        if users is not None:
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users) or not users:
                raise invalid(f"{PARAM}.users must be a non-empty list of user ids.", f"{PARAM}.users")
            where.append(f"json_extract(request_json, '$.user') in ({','.join('?' * len(users))})")
            params += users
        for name in ("temperature", "top_p"):
            value = source.get(name)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise invalid(f"{PARAM}.{name} must be a number.", f"{PARAM}.{name}")
                where.append(f"abs(coalesce(json_extract(request_json, '$.{name}'), 1.0) - ?) < 1e-9")
                params.append(float(value))
    return where, params


def _string(source: dict[str, Any], name: str) -> str:
    value = source.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(f"{PARAM}.{name} must be a non-empty string.", f"{PARAM}.{name}")
    return value


def stored_rows(store: Store, source: dict[str, Any], project: str,
                config_metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The `{item, sample}` rows of the stored completions a source selects, oldest first; a 400
    when none match."""
    where, params = capture_filters(source, project, config_metadata)
    limit = source.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise invalid(f"{PARAM}.limit must be a positive integer.", f"{PARAM}.limit")
    sql = ("select model, metadata_json, request_json, response_json, response_id from captures where "
           + " and ".join(where) + " order by created_at, id" + (f" limit {int(limit)}" if limit else ""))
    rows = []
    for capture in store.db.query(sql, params):
        request, response = json.loads(capture["request_json"]), json.loads(capture["response_json"] or "{}")
        choices = response.get("choices") or [{}]
        rows.append({"item": {"input": request.get("messages", []), "model": capture["model"],
                              "metadata": json.loads(capture["metadata_json"] or "{}"),
                              "completion_id": capture["response_id"]},
                     "sample": {"output_text": (choices[0].get("message") or {}).get("content") or ""}})
    if not rows:
        raise invalid(f"{PARAM}: no stored completions match (store them with `store: true`).", PARAM)
    return rows


def store_completion(store: Store, capture: dict[str, Any], project: str) -> int:
    """Record a chat completion made with `store: true` as a capture of `project`; its id."""
    capture_id = store.insert_captures([capture])[0]
    with store.db.conn:
        store.db.conn.execute("update captures set api_project = ? where id = ?", [project, capture_id])
    return capture_id
