"""Prompt objects (`pmpt_...`, the platform's reusable prompts) and their versions -> stored prompts
an eval spec names as `prompt: {id: pmpt_..., version: "3"}` (flywheel.spec resolves it at load).

    result = import_prompts_file(store, "prompts.jsonl")                 # a download
    result = import_prompts_api(store, save="prompts.jsonl")             # $OPENAI_BASE_URL, the SDK

Shapes. Neither the openai SDK in this venv (it has no prompts resource; only the Responses API's
reference `ResponsePrompt {id, version, variables}`) nor ../shared/reference/openai-platform.md
records the prompt objects' fields, so this importer states the field set it accepts and checks it
field by field: one prompt version is

    {"object": "prompt.version" | "prompt", "id": "pmpt_...", "version": "3" (a string, as
     ResponsePrompt.version), "created_at"?: unix seconds, "name"?: str, "model"?: str,
     "instructions"?: str, "messages"?: [{"role", "content": str | [{"type": "input_text" |
     "output_text" | "text", "text"}]}], "variables"?: {"name": default or null}}

with `instructions` and/or `messages`. A download is JSONL of such objects, or list pages of them;
`--from-api` lists `GET /v1/prompts` (pages of prompt objects) and, for each, `GET
/v1/prompts/{id}/versions` (pages of versions) through the SDK's raw `get`.

A platform variable `{{customer}}` becomes the item template `{{item.customer}}` (an eval spec maps
other names with `prompt.variables`). Every version is checked, then all are stored in one
transaction (the prompt by its content id, and the (id, version) row naming it): a wrong shape, a
duplicate (id, version) in the download or already imported, or a truncated download stores nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import PlatformImportError
from flywheel.importers.pages import check_fields, dump_line, read_download, sdk_client, sdk_error, walk_pages
from flywheel.store import Store, timestamp_from_unix

OBJECTS = ("prompt.version", "prompt")
VERSION_FIELDS = {"id": (str,), "version": (str,)}
VERSION_OPTIONAL = {"created_at": (int,), "name": (str,), "model": (str,), "instructions": (str,),
                    "messages": (list,), "variables": (dict,)}
ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
PLATFORM_VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
PROMPT_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class PromptImport:
    """What an import stored: (platform id, version) -> stored prompt id."""

    source: str
    versions: list[dict[str, str]]  # {"id", "version", "prompt_id", "name"}

    @property
    def imported(self) -> int:
        return len(self.versions)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "imported": self.imported, "versions": self.versions}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        check_fields(part, {"type": (str,)}, f"{where}[{index}]")
        if part["type"] not in TEXT_PARTS:
            raise PlatformImportError(f"{where}[{index}]: type: {part['type']!r}: only text prompts are imported "
                                      f"({', '.join(TEXT_PARTS)})")
        check_fields(part, {"text": (str,)}, f"{where}[{index}]")
        texts.append(part["text"])
    return "".join(texts)


def _templates(text: str, where: str) -> str:
    """The platform's `{{name}}` variables as item templates `{{item.name}}`."""
    def item(match: re.Match[str]) -> str:
        name = match.group(1)
        if not VARIABLE_NAME.fullmatch(name):
            raise PlatformImportError(f"{where}: variable {{{{{name}}}}}: not a name (letters, digits, _)")
        return "{{item." + name + "}}"

    return PLATFORM_VARIABLE.sub(item, text)


def prompt_version(obj: Any, where: str, source: str) -> tuple[Any, dict[str, Any]]:
    """One checked prompt version as (flywheel.prompt.Prompt, its platform_prompt_versions row)."""
    from flywheel.prompt import Prompt

    if isinstance(obj, dict) and isinstance(obj.get("version"), bool | int | float):
        raise PlatformImportError(f"{where}: version: expected a string (as \"3\"), got a number")
    check_fields(obj, VERSION_FIELDS, where, object_name=OBJECTS, optional=VERSION_OPTIONAL)
    for name in ("id", "version"):
        if not obj[name].strip():
            raise PlatformImportError(f"{where}: {name}: empty")
    messages: list[dict[str, str]] = []
    if obj.get("instructions"):
        messages.append({"role": "developer", "content": _templates(obj["instructions"], f"{where}: instructions")})
    for index, raw in enumerate(obj.get("messages") or []):
        at = f"{where}: messages[{index}]"
        check_fields(raw, {"role": (str,), "content": (str, list)}, at)
        if raw["role"] not in ROLES:
            raise PlatformImportError(f"{at}: role: {raw['role']!r} is not one of {', '.join(ROLES)}")
        messages.append({"role": raw["role"], "content": _templates(_text(raw["content"], f"{at}: content"), at)})
    if not messages:
        raise PlatformImportError(f"{where}: instructions/messages: the version has neither; nothing to prompt with")
    variables = obj.get("variables") or {}
    for name, default in variables.items():
        if not VARIABLE_NAME.fullmatch(name) or not (default is None or isinstance(default, str)):
            raise PlatformImportError(f"{where}: variables.{name}: a variable is a name with a string default or null")
    row = {"platform_id": obj["id"], "version": obj["version"], "name": obj.get("name"),
           "variables_json": json.dumps(variables, ensure_ascii=False), "model": obj.get("model"),
           "created_at": timestamp_from_unix(obj["created_at"]) if obj.get("created_at") is not None else None,
           "source": source}
    return Prompt(messages=messages), row


def store_prompts(store: Store, versions: Iterable[tuple[str, tuple[Any, dict[str, Any]]]], *,
                  source: str) -> PromptImport:
    """Refuse duplicates, then store every (where, (prompt, row)) in one transaction."""
    seen: dict[tuple[str, str], str] = {}
    checked = []
    for where, (prompt, row) in versions:
        key = (row["platform_id"], row["version"])
        first = seen.setdefault(key, where)
        if first != where:
            raise PlatformImportError(f"{where}: id/version: {key[0]} version {key[1]} appears twice (first at {first})")
        checked.append((where, prompt, row))
    if not checked:
        raise PlatformImportError(f"{source}: no prompt versions in it")
    known = store.imported_prompt_keys(list(seen))
    if known:
        where, _, row = next(c for c in checked if (c[2]["platform_id"], c[2]["version"]) in known)
        raise PlatformImportError(f"{where}: id/version: {row['platform_id']} version {row['version']} is already "
                                  f"imported in {store.path}; nothing was stored")
    store.save_platform_prompts([(prompt, row) for _, prompt, row in checked], origin=f"import:{source}")
    return PromptImport(source=source, versions=[{"id": row["platform_id"], "version": row["version"],
                                                  "prompt_id": prompt.id, "name": row["name"] or ""}
                                                 for _, prompt, row in checked])


def read_prompts_file(path: str | Path) -> Iterator[tuple[str, tuple[Any, dict[str, Any]]]]:
    """(where, (prompt, row)) of every prompt version in a download."""
    for where, obj in read_download(path, object_name=OBJECTS):
        yield where, prompt_version(obj, where, f"import:{Path(path).name}")


def import_prompts_file(store: Store, path: str | Path) -> PromptImport:
    """Import a download of prompt versions (module docstring) as stored prompts."""
    return store_prompts(store, read_prompts_file(path), source=str(path))


def import_prompts_api(store: Store, *, base_url: str | None = None, save: str | Path | None = None,
                       api_key_env: str = "OPENAI_API_KEY") -> PromptImport:
    """Import every prompt's every version from the platform (or any server with these list
    endpoints), all pages read and checked before anything is stored; `save` also writes them as a
    download file `import_prompts_file` reads back."""
    client = sdk_client(base_url, api_key_env)
    server = str(client.base_url).rstrip("/")
    rows, lines = [], []

    def lister(path: str):
        def fetch(after: str | None) -> Any:
            return client.get(path, cast_to=object, options={"params": {"limit": 100, **({"after": after} if after else {})}})
        return fetch

    try:
        for where, prompt in walk_pages(lister("/prompts"), source=f"{server}/prompts"):
            check_fields(prompt, {"id": (str,)}, where, object_name=OBJECTS)
            if not PROMPT_ID.fullmatch(prompt["id"]):
                raise PlatformImportError(f"{where}: id: {prompt['id'][:80]!r} is not a prompt id (letters, digits, _ -)")
            for at, version in walk_pages(lister(f"/prompts/{prompt['id']}/versions"),
                                          source=f"{server}/prompts/{prompt['id']}/versions"):
                rows.append((at, prompt_version(version, at, server)))
                lines.append(dump_line(version))
    except Exception as exc:
        raise sdk_error(exc, server) from None
    result = store_prompts(store, rows, source=server)
    if save is not None:
        Path(save).write_text("".join(lines), encoding="utf-8")
    return result
