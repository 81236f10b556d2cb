"""The small protocol a judge model satisfies, and how judge replies are read.

flywheel's models (local and OpenAI-compatible) implement `chat`; so can any object:

    class MyJudge:
        def chat(self, conversations, *, temperature=0.0, max_tokens=256, seed=None,
                 response_format=None) -> list[str]:
            return [my_llm(messages) for messages in conversations]

A judge may also offer `score_choices` (`ChoiceScorer`): then model graders pick among the
allowed replies by its log-probabilities instead of parsing free text (graders.constrained).
flywheel's local models do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Protocol, Union, runtime_checkable


@runtime_checkable
class JudgeModel(Protocol):
    """One reply text per conversation; messages are `{"role", "content"}` with string content."""

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> list[str]: ...


@runtime_checkable
class ChoiceScorer(Protocol):
    """Optional judge capability: the log-probability of each choice as the reply to each conversation."""

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[list[float]]: ...


#: What `build_grader(judge=...)` accepts: a resolver from a config's `model` string, or one model.
JudgeResolver = Union[Callable[[str], JudgeModel], JudgeModel]


class ReplyParseError(ValueError):
    """A judge reply that does not hold what was asked for."""


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in `text` (prose, code fences around it are fine), outermost first."""
    stripped = text.strip()
    try:
        whole = json.loads(stripped)
        if isinstance(whole, dict):
            return [whole]
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    found, pos = [], 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end
    return found


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip())
    return None


def parse_score_reply(text: str) -> tuple[float, list[Any]]:
    """The `result` number (and `steps`) of a score_model reply.

    Accepted: a JSON object with a numeric `result` (or a numeric string), alone or with prose or
    code fences around it; or a reply that is just a number. Anything else raises ReplyParseError.
    """
    if not text or not text.strip():
        raise ReplyParseError("the judge's reply is empty")
    for obj in json_objects(text):
        if "result" in obj:
            value = _as_number(obj["result"])
            if value is None:
                raise ReplyParseError(f"'result' is not a number: {obj['result']!r}")
            if not math.isfinite(value):
                raise ReplyParseError(f"'result' is not a finite number: {obj['result']!r}")
            steps = obj.get("steps")
            return value, steps if isinstance(steps, list) else []
    bare = text.strip().rstrip(".")
    if _NUMBER.fullmatch(bare):
        value = float(bare)
        if math.isfinite(value):
            return value, []
    raise ReplyParseError("no JSON object with a numeric 'result' in the reply")


def parse_label_reply(text: str, labels: list[str]) -> str:
    """The label a label_model reply chose.

    Accepted, in order: a JSON object whose `result` (or `label`) is a label; the whole reply
    (trimmed of whitespace, quotes, backticks and a final period) equal to a label; the same
    case-insensitively when exactly one label matches. Anything else raises ReplyParseError.
    """
    if not text or not text.strip():
        raise ReplyParseError("the judge's reply is empty")
    candidates: list[str] = []
    for obj in json_objects(text):
        for key in ("result", "label"):
            if isinstance(obj.get(key), str):
                candidates.append(obj[key])
    candidates.append(text)
    for candidate in candidates:
        label = _match_label(candidate, labels)
        if label is not None:
            return label
    shown = ", ".join(map(repr, labels))
    raise ReplyParseError(f"the reply is not one of the labels ({shown})")


def _match_label(text: str, labels: list[str]) -> str | None:
    cleaned, previous = text, None
    while cleaned != previous:  # peel quotes, backticks, whitespace and a final period, in any order
        previous = cleaned
        cleaned = cleaned.strip().strip("`\"'").rstrip(".")
    if cleaned in labels:
        return cleaned
    folded = [label for label in labels if label.casefold() == cleaned.casefold()]
    return folded[0] if len(folded) == 1 else None


def score_response_format(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """The structured output the platform forces on score_model judges: {result, steps}.

    With `low`/`high` (the grader's range), `result` is bounded by `minimum`/`maximum`.
    """
    result: dict[str, Any] = {"type": "number"}
    if low is not None:
        result["minimum"] = low
    if high is not None:
        result["maximum"] = high
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "grader_score",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "steps": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"description": {"type": "string"}, "conclusion": {"type": "string"}},
                            "required": ["description", "conclusion"],
                            "additionalProperties": False,
                        },
                    },
                    "result": result,
                },
                "required": ["steps", "result"],
                "additionalProperties": False,
            },
        },
    }


def label_response_format(labels: list[str]) -> dict[str, Any]:
    """Structured output constraining the judge's answer to one of `labels`."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "grader_label",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"result": {"type": "string", "enum": list(labels)}},
                "required": ["result"],
                "additionalProperties": False,
            },
        },
    }
