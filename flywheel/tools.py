"""Tools: the platform's function definitions in eval specs, requests and outputs.

An eval spec's `tools` are Chat Completions function definitions, passed as they are:

    tools:
      - type: function
        function: {name: get_balance, description: ..., parameters: {type: object, properties: {...}}}
    tool_choice: auto            # auto | none | required | {type: function, function: {name: get_balance}}

`openai:` models send them with each request and return the reply's `tool_calls`; local models
render them with their chat template when it renders tools (`{% if tools %}`), else in the
Hermes convention most open tool-calling models use (the definitions inside `<tools></tools>` in
the system message; a call written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
and their calls are read back from the reply. Calls reach graders as `sample.output_tools`
(platform shape: `[{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}]`).
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
CHOICES = ("auto", "none", "required")


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> None:
    """Raise ValueError (`tools[1].function.name: ...`) for a malformed definition or choice."""
    names = []
    for index, tool in enumerate(tools or []):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"{where}.type: must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function: must be a mapping with name, description, parameters")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ValueError(f"{where}.function.name: {name!r} is not a function name (letters, digits, _ and -)")
        if name in names:
            raise ValueError(f"{where}.function.name: duplicate tool {name!r}")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type") != "object"):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema with type: object")
        names.append(name)
    if tool_choice is None:
        return
    if not tools:
        raise ValueError("tool_choice: needs `tools`")
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ValueError(f"tool_choice: {tool_choice!r}; expected one of {', '.join(CHOICES)} or a function")
        return
    chosen = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or chosen not in names:
        raise ValueError(f"tool_choice: {tool_choice!r} names no defined tool; tools: {', '.join(names)}")


def template_renders_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template uses the `tools` variable."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "tools" in template


def hermes_system(tools: list[dict[str, Any]], tool_choice: Any) -> str:
    """The tool definitions as a system-message block, for templates that do not render tools."""
    lines = ["You may call functions. Their signatures, as JSON, are inside <tools></tools>:", "<tools>"]
    lines += [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    lines.append("</tools>")
    lines.append('To call one, reply with <tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>.')
    if tool_choice == "required":
        lines.append("You must call a function.")
    elif isinstance(tool_choice, dict):
        lines.append(f"You must call {tool_choice['function']['name']}.")
    return "\n".join(lines)


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    """Messages with the Hermes tool block added to (or as) the system message; earlier calls
    written back as `<tool_call>` blocks, tool results as `<tool_response>` user turns."""
    block = hermes_system(tools, tool_choice)
    messages = [_hermes_turn(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _hermes_turn(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not calls:
        return message
    blocks = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        blocks.append("<tool_call>" + json.dumps({"name": function.get("name"), "arguments": arguments},
                                                 ensure_ascii=False) + "</tool_call>")
    text = "\n".join(filter(None, [message.get("content") or "", *blocks]))
    return {"role": "assistant", "content": text}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside `<tool_call>` blocks, the calls in platform shape); unreadable blocks stay text."""
    calls, kept, position = [], [], 0
    for match in TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        arguments = body.get("arguments", {})
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append({"id": f"call_{len(calls)}", "type": "function", "function": {
            "name": body["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
    kept.append(text[position:])
    return "".join(kept).strip(), calls


def calls_from_message(message: Any) -> list[dict[str, Any]] | None:
    """Tool calls of an SDK or dict chat message in platform shape, or None."""
    raw = message.get("tool_calls") if isinstance(message, dict) else getattr(message, "tool_calls", None)
    if not raw:
        return None
    out = []
    for call in raw:
        data = call if isinstance(call, dict) else call.model_dump()
        function = data.get("function") or {}
        out.append({"id": data.get("id"), "type": data.get("type", "function"),
                    "function": {"name": function.get("name"), "arguments": function.get("arguments")}})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                *, add_generation_prompt: bool = False) -> str:
    """A conversation (assistant tool calls and tool results included) as the chat template's text,
    with tools rendered the way `render_with_tools` renders them at inference: for SFT rows, so a
    model learns to write calls exactly as they are read back."""
    if tools and not template_renders_tools(tokenizer):
        return tokenizer.apply_chat_template(with_tools(messages, tools, None), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_with_tools(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      tool_choice: Any) -> str:
    """A local model's prompt with tools: its template renders them, else the Hermes block does.

    `tool_choice: none` renders no tools; a template that renders tools gets no other choice
    (chat templates take none), the Hermes block says `required` or the named function.
    """
    if tool_choice == "none":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template_renders_tools(tokenizer):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(with_tools(messages, tools, tool_choice), tokenize=False,
                                         add_generation_prompt=True)


def attach_tool_calls(requests: list[Any], completions: list[Any]) -> None:
    """Move `<tool_call>` blocks of local replies to `completion.tool_calls` (requests with tools)."""
    for request, completion in zip(requests, completions):
        if not request.tools or request.tool_choice == "none" or completion is None or completion.error:
            continue
        text, calls = parse_tool_calls(completion.text)
        if calls:
            completion.text, completion.tool_calls, completion.finish_reason = text, calls, "tool_calls"
