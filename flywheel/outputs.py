"""Grade outputs you already have: the dataset holds the output, no model is called.

An eval spec with `outputs: {field: answer}` grades each item's `answer` (another system's
replies, a CSV exported from a tool, last week's logged traffic) with its graders, and stores
samples, grades and the iteration like any run. The iteration's model is recorded as the data's
origin, `data:answer`, so reports compare it with generated runs on the same items.

`DataOutputs` stands where a model would: its fingerprint is the field and the dataset's content
hash (a changed file is a new run), and `fill` answers pending samples from their items. Nothing
it returns is put in the completion cache: the output belongs to the item, not to the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel.errors import DataError
from flywheel.models.base import ChatRequest, Completion, Model

SCHEME = "data"


class DataOutputs(Model):
    """The outputs of an eval's dataset field, in the place of a model."""

    def __init__(self, field: str, dataset_hash: str):
        self.field = field
        self.ref = f"{SCHEME}:{field}"
        self._fingerprint = f"{SCHEME}:{field}:{dataset_hash}"

    @classmethod
    def for_spec(cls, spec: Any, dataset: Any) -> "DataOutputs":
        """The outputs of `spec.outputs.field`; DataError when no row of the dataset has that field."""
        field = spec.outputs.field
        if not any(field in item.fields for item in dataset.items):
            raise DataError(f"{spec.source}: outputs.field: {dataset.path.name} has no field {field!r}; "
                            f"fields: {', '.join(sorted(dataset.fields))}")
        return cls(field, dataset.content_hash)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def preferred_batch_size(self) -> int:
        return 64

    def output_of(self, fields: dict[str, Any]) -> Completion:
        """The completion an item's field makes: its text, or an error when the item lacks it."""
        value = fields.get(self.field)
        if value is None:
            return Completion(text="", finish_reason="error",
                              error=f"data_error: the item has no output field {self.field!r}")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return Completion(text=text, finish_reason="stop")

    def fill(self, pending: list[Any]) -> None:
        """Answer the harness's pending samples from their items (not cached: see module doc)."""
        for p in pending:
            p.cache_key = None
            if p.error:
                continue
            completion = self.output_of(p.item.fields)
            if completion.error:
                p.error = completion.error
            else:
                p.completion = completion

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        raise TypeError(f"{self.ref}: outputs come from the data; the harness fills them, nothing generates")


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def capture_fields(capture: dict[str, Any]) -> dict[str, Any] | None:
    """A successful chat capture as item fields; None when it holds no chat request and reply."""
    from flywheel.proxy.captures import reply_message

    request = _loads(capture.get("request_json"))
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return None
    reply = reply_message(_loads(capture.get("response_json")))
    if reply is None:
        return None
    messages = request["messages"]
    last_user = next((m.get("content") for m in reversed(messages)
                      if isinstance(m, dict) and m.get("role") == "user"), None)
    output = reply.get("content")
    if output is None:  # a tool call only: graded as its JSON
        output = json.dumps(reply.get("tool_calls"), ensure_ascii=False)
    fields = {
        "input": last_user if isinstance(last_user, str) else json.dumps(last_user, ensure_ascii=False),
        "messages": messages, "output": output, "model": capture.get("model"),
        "created_at": capture.get("created_at"), "metadata": _loads(capture.get("metadata_json")) or {},
    }
    from flywheel.images import iter_image_urls, message_text

    images = list(iter_image_urls([{"content": last_user}]))
    if images:  # a vision request: its text as `input`, its images for {{item.image}} / image parts
        fields.update(input=message_text(last_user), images=images, image=images[0])
    return fields


def captures_dataset(spec: Any) -> Any:
    """The proxy's successful captures matching `spec.dataset.captures`, as a Dataset (all in test)."""
    import hashlib

    from flywheel.proxy.captures import parse_when
    from flywheel.data import Dataset, Item
    from flywheel.store import Store

    source = spec.dataset.captures
    path = spec.dataset_path
    if not path.exists():
        raise DataError(f"{spec.source}: dataset.captures.db: no store at {path}")
    store = Store.open(path)
    try:
        rows = store.query_captures(
            metadata=source.metadata, since=parse_when(source.since, option="dataset.captures.since"),
            until=parse_when(source.until, end=True, option="dataset.captures.until"), model=source.model,
            outcome="ok")
    finally:
        store.close()
    items, digest = [], hashlib.sha256()
    access = spec.image_access(None)  # captures hold data URLs (or URLs, fetched only if the spec says so)
    for line, row in enumerate(rows, start=1):
        fields = capture_fields(row)
        if fields is None:
            continue
        items.append(Item(key=str(row["id"]), fields=fields, split="test", line=line, image_access=access,
                          capture_id=row["id"]))
        digest.update(json.dumps([row["id"], fields], sort_keys=True, default=str).encode())
    if not items:
        filters = source.model_dump(exclude_none=True, exclude={"db"})
        raise DataError(f"{spec.source}: dataset.captures: no successful chat captures in {path} match {filters}")
    return Dataset(path=path, content_hash=digest.hexdigest()[:16], items=items)
