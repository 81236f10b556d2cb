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
from typing import Any

from flywheel.api.errors import check_metadata, invalid
from flywheel.store import CompletionFilter, Store, timestamp_from_unix
from flywheel.web import bounded_int

STORED_SOURCES = ("stored_completions", "responses")
UNSUPPORTED_FILTERS = ("tools", "reasoning_effort")
PARAM = "data_source.source"


LAST_UNIX_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last second a timestamp column can hold


def _when(source: dict[str, Any], name: str) -> str | None:
    value = source.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= LAST_UNIX_SECOND:
        raise invalid(f"{PARAM}.{name} must be a unix timestamp (0 to {LAST_UNIX_SECOND}).", f"{PARAM}.{name}")
    return timestamp_from_unix(value)


def completion_filter(source: dict[str, Any], project: str,
                      config_metadata: dict[str, str] | None = None) -> CompletionFilter:
    """The stored completions a stored source selects (400 naming a bad or unsupported filter)."""
    kind = source.get("type")
    for name in UNSUPPORTED_FILTERS:
        if kind == "responses" and source.get(name) not in (None, [], ""):
            raise invalid(f"{PARAM}.{name}: this server stores chat completions, which have no {name} to "
                          "filter on; drop the filter.", f"{PARAM}.{name}")
    metadata = {**(config_metadata or {}), **(check_metadata(source.get("metadata"), f"{PARAM}.metadata") or {})}
    since, until = _when(source, "created_after"), _when(source, "created_before")
    model = _string(source, "model") if source.get("model") is not None else None
    limit = source.get("limit")
    if limit is not None:
        bounded_int(limit, f"{PARAM}.limit", low=1)
    instructions, users, sampling = None, None, {}
    if kind == "responses":
        if source.get("instructions_search") is not None:
            instructions = _string(source, "instructions_search")
        users = source.get("users")
        if users is not None:
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users) or not users:
                raise invalid(f"{PARAM}.users must be a non-empty list of user ids.", f"{PARAM}.users")
            users = tuple(users)
        for name in ("temperature", "top_p"):
            value = source.get(name)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise invalid(f"{PARAM}.{name} must be a number.", f"{PARAM}.{name}")
                sampling[name] = float(value)
    return CompletionFilter(project=project, metadata=metadata, since=since, until=until, model=model,
                            instructions_search=instructions,
                            users=users, sampling=sampling, limit=limit)


def _string(source: dict[str, Any], name: str) -> str:
    value = source.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(f"{PARAM}.{name} must be a non-empty string.", f"{PARAM}.{name}")
    return value


def stored_rows(store: Store, source: dict[str, Any], project: str,
                config_metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The `{item, sample, capture_id}` rows of the stored completions a source selects, oldest
    first; a 400 when none match."""
    rows = []
    for capture in store.stored_completions(completion_filter(source, project, config_metadata)):
        request, response = json.loads(capture["request_json"]), json.loads(capture["response_json"] or "{}")
        choices = response.get("choices") or [{}]
        rows.append({"item": {"input": request.get("messages", []), "model": capture["model"],
                              "metadata": json.loads(capture["metadata_json"] or "{}"),
                              "completion_id": capture["response_id"]},
                     "sample": {"output_text": (choices[0].get("message") or {}).get("content") or ""},
                     "capture_id": capture["id"]})  # lineage (flywheel.privacy), not part of the item
    if not rows:
        raise invalid(f"{PARAM}: no stored completions match (store them with `store: true`).", PARAM)
    return rows


def store_completion(store: Store, capture: dict[str, Any], project: str) -> int:
    """Record a chat completion made with `store: true` as a capture of `project`; its id."""
    return store.insert_captures([{**capture, "api_project": project}])[0]
