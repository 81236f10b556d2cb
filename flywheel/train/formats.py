"""Training-set formats: the platform's JSONL rows, checked, read and written, and TRL's forms.

A `TrainingSet` is rows in one of the hosted platform's JSONL formats (reference §5.4), so a set
can be uploaded as it is: SFT `{"messages": [..., {"role": "assistant", ...}]}`, DPO
`{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`, RFT
`{"messages": [...], <item fields>}`. `validate_rows` checks a format (errors name the line),
`load_training_file` reads a user's JSONL, `to_hf_dataset` and `tokenize_sft` give TRL its forms.
Building sets out of the store is `flywheel.train.sets`.

    training_set = load_training_file("sft", "train.jsonl")
    to_hf_dataset(training_set)        # TRL's conversational format
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.data import read_jsonl
from flywheel.errors import FlywheelError
from flywheel.images import iter_image_urls
from flywheel.tools import render_chat

KINDS = ("sft", "dpo", "rft")
RFT_RESERVED = ("messages", "tools")


class TrainingDataError(FlywheelError):
    """A training set cannot be built or read: nothing captured, nothing passing, a malformed row."""


@dataclass
class TrainingSet:
    """Rows in a platform JSONL format, with where they came from (`source`)."""

    kind: str
    rows: list[dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    path: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def jsonl(self) -> str:
        return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in self.rows)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSONL (sorted keys): equal rows give an equal hash."""
        return hashlib.sha256(f"{self.kind}\n{self.jsonl()}".encode()).hexdigest()

    def to_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.jsonl(), encoding="utf-8")
        return path


# -- platform JSONL in and out ---------------------------------------------------------------------
def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: messages must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TrainingDataError(f"{where}: messages[{index}] must be an object with a role")


def validate_rows(kind: str, rows: list[dict[str, Any]], source: str) -> None:
    """Check rows against the platform format of `kind`; errors name the line."""
    if kind not in KINDS:
        raise TrainingDataError(f"unknown training set kind {kind!r}; known: {', '.join(KINDS)}")
    if not rows:
        raise TrainingDataError(f"{source}: empty training set (no rows)")
    for line, row in enumerate(rows, start=1):
        where = f"{source}:{line}"
        if not isinstance(row, dict):
            raise TrainingDataError(f"{where}: expected a JSON object")
        if kind == "sft":
            _check_messages(row.get("messages"), where)
            if not any(m.get("role") == "assistant" and m.get("weight", 1) for m in row["messages"]):
                raise TrainingDataError(f"{where}: an SFT row needs an assistant message to learn from")
        elif kind == "dpo":
            if not isinstance(row.get("input"), dict):
                raise TrainingDataError(f"{where}: a DPO row needs input.messages, preferred_output, non_preferred_output")
            _check_messages(row["input"].get("messages"), where + ": input")
            for name in ("preferred_output", "non_preferred_output"):
                value = row.get(name)
                if not isinstance(value, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                          for m in value):
                    raise TrainingDataError(f"{where}: {name} must be a list with an assistant message")
        else:
            _check_messages(row.get("messages"), where)


def load_training_file(kind: str, path: str | Path) -> TrainingSet:
    """A platform-format JSONL file as a training set (validated)."""
    path = Path(path)
    rows = [row for _, row in read_jsonl(path, error=TrainingDataError)]
    validate_rows(kind, rows, str(path))
    return TrainingSet(kind, rows, {"file": str(path.resolve()), "method": kind})


# -- TRL's formats ---------------------------------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def chat_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Platform messages as chat-template input: text content, `developer` read as `system`."""
    out = []
    for m in messages:
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"))}
        if m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        out.append(message)
    return out


def to_hf_dataset(training_set: TrainingSet):
    """A `datasets.Dataset` in TRL's conversational format: SFT `messages`; DPO `prompt`/`chosen`/
    `rejected`; RFT `prompt` plus the item fields (GRPO passes them to the reward functions)."""
    from datasets import Dataset

    if set_has_images(training_set):  # chat_messages keeps text only: the images would vanish
        raise TrainingDataError("this training set has images; TRL's text formats would drop them: use its "
                                "platform JSONL (docs/vision.md)")
    records = []
    for row in training_set.rows:
        if training_set.kind == "sft":
            records.append({"messages": chat_messages(row["messages"])})
        elif training_set.kind == "dpo":
            records.append({"prompt": chat_messages(row["input"]["messages"]),
                            "chosen": chat_messages(row["preferred_output"]),
                            "rejected": chat_messages(row["non_preferred_output"])})
        else:
            fields = {k: v for k, v in row.items() if k not in RFT_RESERVED}
            if "prompt" in fields:
                raise TrainingDataError("an RFT item field named 'prompt' clashes with GRPO's prompt column; rename it")
            records.append({"prompt": chat_messages(row["messages"]), **fields})
    return Dataset.from_list(records)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (where one rendering of a conversation stops matching)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_sft(training_set: TrainingSet, tokenizer, *, loss: str = "assistant") -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Token ids and labels per SFT row. With `loss="assistant"` only assistant turns are learned
    (their content and end-of-turn tokens; `weight: 0` turns stay context), as the platform trains;
    with `"all"` every token is. The assistant spans come from rendering each prefix of the
    conversation with the chat template, so any prefix-consistent template works, whether or not it
    has `{% generation %}` markers. Returns the rows and token counts."""
    if training_set.kind != "sft":
        raise TrainingDataError(f"tokenize_sft needs an SFT set, got {training_set.kind}")
    if loss not in ("assistant", "all"):
        raise TrainingDataError(f"loss must be 'assistant' or 'all', got {loss!r}")

    def encode(messages: list[dict[str, Any]], tools: Any, generation_prompt: bool) -> list[int]:
        # Tools rendered as inference renders them, so a model learns to write calls as they are read back.
        text = render_chat(tokenizer, messages, tools, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False).input_ids

    out, total, trained = [], 0, 0
    for row in training_set.rows:
        raw = row["messages"]
        messages, tools = chat_messages(raw), row.get("tools")
        input_ids = encode(messages, tools, False)
        labels = list(input_ids) if loss == "all" else [-100] * len(input_ids)
        if loss == "assistant":
            for index, message in enumerate(raw):
                if message["role"] != "assistant" or not message.get("weight", 1):
                    continue
                start = common_prefix(encode(messages[:index], tools, True), input_ids)
                end = common_prefix(encode(messages[:index + 1], tools, False), input_ids)
                labels[start:end] = input_ids[start:end]
        out.append({"input_ids": input_ids, "labels": labels})
        total += len(input_ids)
        trained += sum(1 for label in labels if label != -100)
    if trained == 0:
        raise TrainingDataError("no trainable tokens: every assistant message has weight 0 or renders empty")
    return out, {"rows": len(out), "tokens": total, "trained_tokens": trained}


def row_messages(kind: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message of a training row that can hold images, in one list."""
    if kind == "dpo":
        return [*(row.get("input") or {}).get("messages", []), *row.get("preferred_output", []),
                *row.get("non_preferred_output", [])]
    return list(row.get("messages") or [])


def set_has_images(training_set: TrainingSet) -> bool:
    """Whether any row of the set holds an image (a vision set: text-only formats would drop them)."""
    return any(next(iter_image_urls(row_messages(training_set.kind, row)), None) is not None
               for row in training_set.rows)
