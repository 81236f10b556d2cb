"""Stored chat completions (`store: true` on the platform) -> captures, as if the proxy had seen them.

    result = import_completions_file(store, "stored.jsonl")                     # a download
    result = import_completions_api(store, metadata={"usecase": "triage"})      # $OPENAI_BASE_URL, the SDK

The list endpoint (`GET /v1/chat/completions`) gives each completion (`chat.completion`: id,
created, model, choices, usage, metadata) but not its request; the request's messages come from
`GET /v1/chat/completions/{id}/messages`. A download file therefore holds, one per line, a
`chat.completion` object with an extra `input_messages` field (the messages list's `data`), or
list pages of such objects; `import_completions_api(..., save=PATH)` writes exactly that file.

Each becomes one capture (flywheel.store captures): its date (`created`), model, metadata, usage,
the request `{"model", "messages", "metadata"}` and the completion as the response, `response_id`
= the platform's id, and `upstream` = where it came from. With a redaction policy
(flywheel.privacy) request and reply are redacted together before anything is written. All rows
are written in one transaction after every check passed: a wrong shape, a duplicate id (in the
download or already imported) or a truncated download stores nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import PlatformImportError
from flywheel.importers.pages import check_fields, dump_line, read_download, sdk_client, sdk_error, walk_pages
from flywheel.models.openai_backend import resolve_base_url
from flywheel.store import Store, timestamp_from_unix

ENDPOINT = "/v1/chat/completions"
COMPLETION_FIELDS = {"id": (str,), "created": (int,), "model": (str,), "choices": (list,)}
COMPLETION_OPTIONAL = {"metadata": (dict,), "usage": (dict,)}
MESSAGE_FIELDS = {"role": (str,)}
MESSAGE_OPTIONAL = {"content": (str, list), "content_parts": (list,), "name": (str,), "tool_calls": (list,)}
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class CompletionImport:
    """What an import stored: capture ids, the date range and models it covers."""

    source: str
    capture_ids: list[int]
    first_created: str | None
    last_created: str | None
    models: dict[str, int] = field(default_factory=dict)
    metadata_keys: list[str] = field(default_factory=list)
    redaction: dict[str, Any] | None = None

    @property
    def imported(self) -> int:
        return len(self.capture_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "imported": self.imported, "capture_ids": self.capture_ids,
                "first_created": self.first_created, "last_created": self.last_created, "models": self.models,
                "metadata_keys": self.metadata_keys, "redaction": self.redaction}


def _message(raw: Any, where: str) -> dict[str, Any]:
    """A stored message (`chat.completion.store.message` minus id) as a chat request message."""
    check_fields(raw, MESSAGE_FIELDS, where, optional=MESSAGE_OPTIONAL)
    if raw["role"] not in ROLES:
        raise PlatformImportError(f"{where}: role: {raw['role']!r} is not one of {', '.join(ROLES)}")
    content = raw.get("content")
    if content is None and raw.get("content_parts"):
        content = raw["content_parts"]
    message = {"role": raw["role"], "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if raw.get(key) is not None:
            message[key] = raw[key]
    return message


def capture_row(completion: dict[str, Any], messages: list[dict[str, Any]], where: str, upstream: str) -> dict[str, Any]:
    """One checked stored completion and its request messages as a capture row (not yet stored)."""
    check_fields(completion, COMPLETION_FIELDS, where, object_name="chat.completion", optional=COMPLETION_OPTIONAL)
    if not completion["id"].strip():
        raise PlatformImportError(f"{where}: id: empty")
    for index, choice in enumerate(completion["choices"]):
        check_fields(choice, {"message": (dict,)}, f"{where}: choices[{index}]")
    if not completion["choices"]:
        raise PlatformImportError(f"{where}: choices: empty (a stored completion has its reply)")
    if not messages:
        raise PlatformImportError(f"{where}: input_messages: missing or empty (the request's messages, from "
                                  f"GET /v1/chat/completions/{completion['id']}/messages)")
    metadata = completion.get("metadata") or {}
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise PlatformImportError(f"{where}: metadata.{bad}: values are strings on the platform")
    usage = completion.get("usage") or {}
    response = {k: v for k, v in completion.items() if k != "input_messages"}
    request = {"model": completion["model"], "messages": messages, "store": True, "metadata": metadata}
    request_json = json.dumps(request, ensure_ascii=False)
    return {"created_at": timestamp_from_unix(completion["created"]), "endpoint": ENDPOINT, "upstream": upstream,
            "model": completion["model"], "stream": 0, "status": 200, "latency_s": None,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"), "metadata_json": json.dumps(metadata, ensure_ascii=False),
            "request_json": request_json, "request_bytes": len(request_json.encode()),
            "response_json": json.dumps(response, ensure_ascii=False), "response_id": completion["id"],
            "error": None, "api_project": None}


def store_completions(store: Store, rows: Iterable[tuple[str, dict[str, Any]]], *, source: str,
                      redact: Any = None) -> CompletionImport:
    """Check (where, capture row) pairs for duplicates, redact them, and store them all in one
    transaction. `redact`: a flywheel.privacy RedactionPolicy (None keeps text verbatim)."""
    seen: dict[str, str] = {}
    checked: list[tuple[str, dict[str, Any]]] = []
    for where, row in rows:
        first = seen.setdefault(row["response_id"], where)
        if first != where:
            raise PlatformImportError(f"{where}: id: {row['response_id']} appears twice (first at {first})")
        checked.append((where, row))
    if not checked:
        raise PlatformImportError(f"{source}: no stored completions in it")
    known = store.captured_response_ids([row["response_id"] for _, row in checked])
    if known:
        where, row = next((w, r) for w, r in checked if r["response_id"] in known)
        raise PlatformImportError(f"{where}: id: {row['response_id']} is already imported in {store.path} "
                                  f"({len(known)} of these are); nothing was stored")
    report = None
    stored = [row for _, row in checked]
    if redact is not None and redact.enabled:
        from flywheel.privacy.redact import Redactor

        redactor = Redactor(redact)
        stored = []
        for _, row in checked:
            redactor.new_conversation()
            stored.append(redactor.redact_capture(row))
        report = redactor.report()
    ids = store.insert_captures(stored)
    models: dict[str, int] = {}
    keys: set[str] = set()
    for row in stored:
        models[row["model"]] = models.get(row["model"], 0) + 1
        keys.update(json.loads(row["metadata_json"]))
    dates = sorted(row["created_at"] for row in stored)
    return CompletionImport(source=source, capture_ids=ids, first_created=dates[0], last_created=dates[-1],
                            models=models, metadata_keys=sorted(keys), redaction=report)


def read_completions_file(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, capture row) of every stored completion in a download (see the module docstring)."""
    upstream = f"import:{Path(path).name}"
    for where, obj in read_download(path, object_name="chat.completion"):
        raw = obj.get("input_messages")
        if not isinstance(raw, list):
            raise PlatformImportError(f"{where}: input_messages: missing (a list of the request's messages: the "
                                      f"data of GET /v1/chat/completions/{obj.get('id')}/messages)")
        messages = [_message(m, f"{where}: input_messages[{i}]") for i, m in enumerate(raw)]
        yield where, capture_row(obj, messages, where, upstream)


def import_completions_file(store: Store, path: str | Path, *, redact: Any = None) -> CompletionImport:
    """Import a download of stored completions (JSONL; module docstring) as captures."""
    return store_completions(store, read_completions_file(path), source=str(path), redact=redact)


def _page(result: Any) -> dict[str, Any]:
    """An SDK cursor page back as the platform's JSON page (the walker checks the JSON, not the SDK)."""
    return {"object": "list", "data": [item.model_dump(mode="json") for item in result.data],
            "has_more": bool(getattr(result, "has_more", False)), "last_id": getattr(result, "last_id", None)}


def fetch_completions_api(*, base_url: str | None = None, metadata: dict[str, str] | None = None,
                          model: str | None = None, limit: int | None = None,
                          api_key_env: str = "OPENAI_API_KEY") -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(where, completion JSON, its messages' JSON) of the stored completions the list endpoint
    gives, every page, through the openai SDK against `base_url` (else $OPENAI_BASE_URL)."""
    client = sdk_client(base_url, api_key_env)
    source = f"{client.base_url}chat/completions".replace("//chat", "/chat")
    filters: dict[str, Any] = {"limit": 100, "order": "asc"}
    if metadata:
        filters["metadata"] = metadata
    if model:
        filters["model"] = model

    def fetch(after: str | None) -> dict[str, Any]:
        return _page(client.chat.completions.list(**filters, **({"after": after} if after else {})))

    count = 0
    for where, obj in walk_pages(fetch, source=source):
        check_fields(obj, COMPLETION_FIELDS, where, object_name="chat.completion", optional=COMPLETION_OPTIONAL)
        completion_id = obj["id"]

        def fetch_messages(after: str | None, completion_id: str = completion_id) -> dict[str, Any]:
            return _page(client.chat.completions.messages.list(completion_id, limit=100,
                                                               **({"after": after} if after else {})))

        messages = [m for _, m in walk_pages(fetch_messages, source=f"{source}/{completion_id}/messages")]
        yield where, obj, messages
        count += 1
        if limit is not None and count >= limit:
            return


def import_completions_api(store: Store, *, base_url: str | None = None, metadata: dict[str, str] | None = None,
                           model: str | None = None, limit: int | None = None, redact: Any = None,
                           save: str | Path | None = None, api_key_env: str = "OPENAI_API_KEY") -> CompletionImport:
    """Import stored completions straight from the platform (or any server with its list endpoints).
    Every page is read and checked before anything is stored; `save` also writes them as a
    download file `import_completions_file` reads back."""
    upstream = resolve_base_url(base_url)
    rows, lines = [], []
    try:
        for where, obj, raw_messages in fetch_completions_api(base_url=base_url, metadata=metadata, model=model,
                                                              limit=limit, api_key_env=api_key_env):
            messages = [_message({k: v for k, v in m.items() if k != "id"} if isinstance(m, dict) else m,
                                 f"{where}: messages[{i}]") for i, m in enumerate(raw_messages)]
            rows.append((where, capture_row(obj, messages, where, upstream)))
            lines.append(dump_line({**obj, "input_messages": raw_messages}))
    except Exception as exc:
        raise sdk_error(exc, upstream) from None
    result = store_completions(store, rows, source=upstream, redact=redact)
    if save is not None:
        Path(save).write_text("".join(lines), encoding="utf-8")
    return result
