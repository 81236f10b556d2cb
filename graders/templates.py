"""`{{item.a.b}}` / `{{sample.output_json.x}}` templates and the `sample` namespace (reference §1).

Only two namespaces exist, `item` (the data row) and `sample` (the output being graded). A path is
dots for keys and `[n]` for list indexes (`{{item.messages[0].content}}`, `{{item["a key"]}}`).
A variable that does not exist raises `TemplateVariableError` (the grade records it as an
`invalid_variable_error`) instead of rendering empty. Non-string values render as JSON.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from graders.errors import TemplateVariableError

NAMESPACES = ("item", "sample")

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_STEP = re.compile(
    r"""\s*(?:
        \.\s*(?P<key>[^.\[\]\s]+)          # .key
      | \[\s*(?P<index>-?\d+)\s*\]          # [0]
      | \[\s*(?P<q>["'])(?P<qkey>.*?)(?P=q)\s*\]   # ["a key"]
    )""",
    re.X,
)
_HEAD = re.compile(r"\s*(?P<ns>[A-Za-z_][A-Za-z0-9_]*)")


def make_sample(
    output_text: str,
    output_json: Any = None,
    choices: list[dict[str, Any]] | None = None,
    output_tools: list[dict[str, Any]] | None = None,
    output_audio: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the `sample` namespace for one model output.

    `output_json` is parsed from `output_text` when not given and the text is valid JSON (as the
    platform's run endpoint does); otherwise it is None. `choices` defaults to one Chat
    Completions-shaped choice holding the text (and the tool calls, if any).

    >>> make_sample('{"intent": "card_arrival"}')["output_json"]["intent"]
    'card_arrival'
    """
    if output_text is None:
        output_text = ""
    if not isinstance(output_text, str):
        raise TypeError(f"output_text must be a string, got {type(output_text).__name__}")
    if output_json is None:
        output_json = parse_json_text(output_text)
    tools = list(output_tools or [])
    if choices is None:
        message: dict[str, Any] = {"role": "assistant", "content": output_text}
        if tools:
            message["tool_calls"] = tools
        choices = [{"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}]
    return {
        "output_text": output_text,
        "output_json": output_json,
        "output_tools": tools,
        "choices": choices,
        "output_audio": output_audio,
    }


def parse_json_text(text: str) -> Any:
    """The JSON value `text` holds, or None when it is not valid JSON."""
    stripped = text.strip()
    if not stripped or stripped[0] not in '{["-0123456789tfn':
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def parse_variable(expr: str) -> tuple[str, tuple[str | int, ...]]:
    """`"item.a[0].b"` -> `("item", ("a", 0, "b"))`; raises TemplateVariableError if malformed."""
    head = _HEAD.match(expr)
    if not head:
        raise TemplateVariableError(expr.strip(), "expected item.<path> or sample.<path>")
    namespace = head["ns"]
    if namespace not in NAMESPACES:
        raise TemplateVariableError(
            expr.strip(), f"unknown namespace {namespace!r}; templates use item.<path> or sample.<path>"
        )
    pos, steps = head.end(), []
    while pos < len(expr.rstrip()):
        step = _STEP.match(expr, pos)
        if not step:
            raise TemplateVariableError(expr.strip(), f"cannot parse the path at {expr[pos:].strip()!r}")
        if step["key"] is not None:
            steps.append(step["key"])
        elif step["index"] is not None:
            steps.append(int(step["index"]))
        else:
            steps.append(step["qkey"])
        pos = step.end()
    return namespace, tuple(steps)


def resolve(expr: str, item: Any, sample: Any) -> Any:
    """The value a template variable names; TemplateVariableError when it does not exist."""
    namespace, steps = parse_variable(expr)
    value = item if namespace == "item" else sample
    if value is None:
        raise TemplateVariableError(expr.strip(), f"no {namespace} was given")
    walked = namespace
    for step in steps:
        if isinstance(step, str) and isinstance(value, (list, tuple)) and step.lstrip("-").isdigit():
            step = int(step)  # `{{item.list.0}}` is a common spelling of `{{item.list[0]}}`
        if isinstance(step, int):
            if not isinstance(value, (list, tuple)):
                raise TemplateVariableError(expr.strip(), f"{walked} is {_kind(value)}, not a list")
            if not -len(value) <= step < len(value):
                raise TemplateVariableError(expr.strip(), f"{walked} has {len(value)} element(s); no index {step}")
            value = value[step]
            walked += f"[{step}]"
            continue
        if not isinstance(value, dict):
            _missing(expr, walked, value, step)
        if step not in value:
            keys = ", ".join(map(str, list(value)[:12])) or "none"
            raise TemplateVariableError(expr.strip(), f"{walked} has no key {step!r} (keys: {keys})")
        value = value[step]
        walked += f".{step}"
    return value


def _missing(expr: str, walked: str, value: Any, step: str) -> Any:
    hint = " (sample.output_json is null: the output was not valid JSON)" if walked == "sample.output_json" else ""
    raise TemplateVariableError(expr.strip(), f"{walked} is {_kind(value)}, it has no key {step!r}{hint}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def to_text(value: Any) -> str:
    """How a resolved value appears in rendered text: strings as-is, everything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render_template(text: str, *, item: Any = None, sample: Any = None) -> str:
    """Substitute every `{{ namespace.path }}` in `text`.

    >>> render_template("Is {{ sample.output_text }} a {{item.labels[0]}}?",
    ...                 item={"labels": ["refund"]}, sample=make_sample("yes"))
    'Is yes a refund?'
    """
    if "{{" not in text:
        return text
    return _TEMPLATE.sub(lambda m: to_text(resolve(m.group(1), item, sample)), text)


def template_variables(text: str) -> list[str]:
    """The variable expressions a template uses (stripped), in order; checks their syntax."""
    found = []
    for m in _TEMPLATE.finditer(text):
        parse_variable(m.group(1))
        found.append(m.group(1).strip())
    return found


class _Slow(Exception):
    """The fast path cannot resolve a variable; the full resolver will say why."""


class Template:
    """A template parsed once, rendered many times (the graders' hot path).

    >>> Template("{{item.label}}!").render({"label": "ok"}, None)
    'ok!'
    """

    __slots__ = ("text", "_parts", "_single", "render")

    def __init__(self, text: str):
        self.text = text
        pos = 0
        # each part: a literal string, or (expr, is_item, steps) for a variable
        self._parts: list[str | tuple[str, bool, tuple[str | int, ...]]] = []
        for m in _TEMPLATE.finditer(text):
            if m.start() > pos:
                self._parts.append(text[pos : m.start()])
            namespace, steps = parse_variable(m.group(1))
            self._parts.append((m.group(1), namespace == "item", steps))
            pos = m.end()
        if pos < len(text) or not self._parts:
            self._parts.append(text[pos:])
        only = self._parts[0]
        self._single = only if len(self._parts) == 1 and isinstance(only, tuple) else None
        self.render = self._compile()

    def _compile(self) -> Any:
        """The fastest renderer for this template's shape (the general one is `_render`)."""
        if len(self._parts) == 1 and type(self._parts[0]) is str:
            literal = self._parts[0]
            return lambda item, sample: literal
        single = self._single
        if single is not None and all(type(step) is str for step in single[2]):
            expr, is_item, steps = single

            def render_keys(item: Any, sample: Any) -> str:
                value = item if is_item else sample
                try:
                    for step in steps:
                        value = value[step]  # only dicts take str keys; anything else raises
                except (KeyError, TypeError, IndexError):
                    value = resolve(expr, item, sample)
                return value if type(value) is str else to_text(value)

            return render_keys
        return self._render

    @staticmethod
    def _value(part: tuple[str, bool, tuple[str | int, ...]], item: Any, sample: Any) -> str:
        expr, is_item, steps = part
        value = item if is_item else sample
        try:
            if value is None:
                raise _Slow
            for step in steps:
                if type(step) is int:
                    if type(value) is not list:
                        raise _Slow
                elif type(value) is not dict:
                    raise _Slow
                value = value[step]
        except (_Slow, KeyError, IndexError):
            value = resolve(expr, item, sample)  # raises TemplateVariableError, or handles list.0
        return value if type(value) is str else to_text(value)

    def _render(self, item: Any, sample: Any) -> str:
        if self._single is not None:
            return self._value(self._single, item, sample)
        return "".join(p if type(p) is str else self._value(p, item, sample) for p in self._parts)

    @property
    def variables(self) -> list[str]:
        return [p[0].strip() for p in self._parts if isinstance(p, tuple)]
