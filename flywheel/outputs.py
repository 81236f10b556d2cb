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
