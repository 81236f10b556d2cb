"""The page walker and the JSON-shape checker every platform importer shares.

The platform's list endpoints answer pages `{"object": "list", "data": [...], "first_id",
"last_id", "has_more"}`; the next page is asked for with `after=<last_id>`. A download is complete
only when its last page says `has_more: false`: anything else is a truncated download, refused.

    for where, obj in walk_pages(lambda after: client_page(after), source="https://.../v1/chat/completions"):
        check_fields(obj, COMPLETION_FIELDS, where, object_name="chat.completion")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flywheel.errors import PlatformImportError

MAX_PAGES = 100_000  # a server that never says has_more: false is refused, not followed forever

_KINDS: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
                           list: "a list", dict: "an object", type(None): "null"}


def _kind(types: tuple[type, ...]) -> str:
    return " or ".join(_KINDS.get(t, t.__name__) for t in types)


def check_fields(obj: Any, fields: Mapping[str, tuple[type, ...]], where: str, *,
                 object_name: str | tuple[str, ...] | None = None,
                 optional: Mapping[str, tuple[type, ...]] | None = None) -> dict[str, Any]:
    """Check one platform object: a JSON object whose `object` is `object_name` (when given; a tuple:
    one of them), with every field of `fields` present and of one of its types, and `optional`
    fields, when present, of theirs. Returns the object; raises PlatformImportError `where: field: message`."""
    if not isinstance(obj, dict):
        raise PlatformImportError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    names = (object_name,) if isinstance(object_name, str) else object_name
    if names is not None and obj.get("object") not in names:
        raise PlatformImportError(f"{where}: object: expected {' or '.join(map(repr, names))}, got {obj.get('object')!r}")
    for name, types in fields.items():
        if name not in obj:
            raise PlatformImportError(f"{where}: {name}: missing (a {names[0] if names else 'platform'} object has it)")
        _check_type(obj[name], types, f"{where}: {name}")
    for name, types in (optional or {}).items():
        if obj.get(name) is not None:
            _check_type(obj[name], types, f"{where}: {name}")
    return obj


def _check_type(value: Any, types: tuple[type, ...], where: str) -> None:
    if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
        raise PlatformImportError(f"{where}: expected {_kind(types)}, got true/false")
    if not isinstance(value, types):
        raise PlatformImportError(f"{where}: expected {_kind(types)}, got {_KINDS.get(type(value), type(value).__name__)}")


PAGE_FIELDS = {"data": (list,), "has_more": (bool,)}


def walk_pages(fetch: Callable[[str | None], Any], *, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of every page `fetch(after)` returns, following `last_id` while `has_more`.
    Yields (where, object) with `where` = `source page N item M`. A page of the wrong shape, or
    `has_more` without a `last_id` to continue from, is a PlatformImportError."""
    after: str | None = None
    for number in range(1, MAX_PAGES + 1):
        where = f"{source} page {number}"
        page = check_fields(fetch(after), PAGE_FIELDS, where, object_name="list", optional={"last_id": (str,)})
        for index, obj in enumerate(page["data"]):
            yield f"{where} item {index + 1}", obj
        if not page["has_more"]:
            return
        last = page.get("last_id") or (page["data"][-1].get("id") if page["data"] and isinstance(page["data"][-1], dict) else None)
        if not last or last == after:
            raise PlatformImportError(f"{where}: has_more is true but the page gives no new last_id to continue after")
        after = last
    raise PlatformImportError(f"{source}: more than {MAX_PAGES} pages; is the server paging in a loop?")


def read_download(path: str | Path, *, object_name: str | tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of a downloaded file: JSONL whose lines are either objects of `object_name` or
    list pages of them (as the list endpoint answered, saved one per line). A file of pages must
    end with a page saying `has_more: false`; else it was cut short and is refused whole.
    Yields (where, object) with `where` = `file:line` (and `item N` inside a page)."""
    from flywheel.data import read_jsonl

    path = Path(path)
    more: str | None = None
    for number, row in read_jsonl(path, error=PlatformImportError):
        where = f"{path}:{number}"
        if isinstance(row, dict) and row.get("object") == "list":
            page = check_fields(row, PAGE_FIELDS, where, object_name="list")
            for index, obj in enumerate(page["data"]):
                yield f"{where} item {index + 1}", check_fields(obj, {}, f"{where} item {index + 1}", object_name=object_name)
            more = where if page["has_more"] else None
        else:
            yield where, check_fields(row, {}, where, object_name=object_name)
    if more is not None:
        raise PlatformImportError(f"{more}: has_more: the last page says more pages follow; the download is "
                                  "truncated (fetch the rest, or import with --from-api)")


def dump_line(obj: Any) -> str:
    """One JSONL line, as `read_download` reads it back."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n"


def sdk_client(base_url: str | None, api_key_env: str = "OPENAI_API_KEY") -> Any:
    """The openai SDK's client for `base_url` (else $OPENAI_BASE_URL), the key from `api_key_env`."""
    import os

    import openai

    from flywheel.models.openai_backend import resolve_base_url

    return openai.OpenAI(base_url=resolve_base_url(base_url), api_key=os.environ.get(api_key_env) or "unused",
                         max_retries=2)


def sdk_error(exc: Exception, server: str) -> Exception:
    """The exception to raise for `exc` met while reading `server`: the SDK's connection and status
    errors become one PlatformImportError line naming the server; anything else is kept (a bug)."""
    import openai

    if isinstance(exc, openai.OpenAIError) and not isinstance(exc, PlatformImportError):
        return PlatformImportError(f"{server}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return exc
