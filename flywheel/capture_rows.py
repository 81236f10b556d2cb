"""Reading what `flywheel proxy` recorded: the filters on captures (metadata, dates and ages), the
reply of a stored chat call, and a capture as item fields (for `dataset: {captures: ...}`).

Dates: `2026-11-05` (a day: as `--since` its start, as `--until` its end, inclusive), an ISO
timestamp (`2026-11-05T14:00`, UTC unless it names an offset), or an age: `30m`, `12h`, `7d`, `2w`.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.images import iter_image_urls, message_text
from flywheel.store import timestamp
from flywheel.store.rows import Capture

AGE = re.compile(r"^(\d+)\s*([mhdw])$")
AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_metadata_filters(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--metadata key=value` options as a dict.

    >>> parse_metadata_filters(["usecase=triage", "v=2"])
    {'usecase': 'triage', 'v': '2'}
    """
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FlywheelError(f"--metadata {pair!r}: expected key=value (e.g. usecase=triage)")
        filters[key.strip()] = value
    return filters


def parse_when(text: str | None, *, end: bool = False, option: str = "--since") -> str | None:
    """A date, timestamp or age as the store's UTC ISO format; `end` makes a bare day inclusive."""
    if not text:
        return None
    text = text.strip()
    stamp: datetime
    match = AGE.match(text)
    if match:
        stamp = datetime.now(timezone.utc) - timedelta(**{AGE_UNITS[match[2]]: int(match[1])})
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise FlywheelError(f"{option} {text!r}: {exc}") from None
        stamp = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + (timedelta(days=1) if end else timedelta())
    else:
        try:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise FlywheelError(
                f"{option} {text!r}: expected a date (2026-11-05), a timestamp (2026-11-05T14:00) "
                "or an age (30m, 12h, 7d, 2w)") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
    return timestamp(stamp)


def loads_json(text: str | None) -> Any:
    """A stored JSON column as a value; None when empty or not JSON."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def reply_message(response: Any) -> dict[str, Any] | None:
    """The assistant message of a chat.completion body (first choice), or None."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
        return None
    message = choices[0]["message"]
    reply: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        reply["tool_calls"] = message["tool_calls"]
    if reply["content"] is None and "tool_calls" not in reply:
        return None
    return reply


def chat_exchange(capture: Capture) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the chat request, the assistant reply) a capture holds; None when it holds no chat request
    with messages and reply (the one reading of a capture's request and response columns)."""
    request = loads_json(capture.request_json)
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return None
    reply = reply_message(loads_json(capture.response_json))
    return None if reply is None else (request, reply)


def capture_fields(capture: Capture) -> dict[str, Any] | None:
    """A successful chat capture as item fields; None when it holds no chat request and reply."""
    exchange = chat_exchange(capture)
    if exchange is None:
        return None
    request, reply = exchange
    messages = request["messages"]
    last_user = next((m.get("content") for m in reversed(messages)
                      if isinstance(m, dict) and m.get("role") == "user"), None)
    output = reply.get("content")
    if output is None:  # a tool call only: graded as its JSON
        output = json.dumps(reply.get("tool_calls"), ensure_ascii=False)
    fields = {
        "input": last_user if isinstance(last_user, str) else json.dumps(last_user, ensure_ascii=False),
        "messages": messages, "output": output, "model": capture.model,
        "created_at": capture.created_at, "metadata": loads_json(capture.metadata_json) or {},
    }
    images = list(iter_image_urls([{"content": last_user}]))
    if images:  # a vision request: its text as `input`, its images for {{item.image}} / image parts
        fields.update(input=message_text(last_user), images=images, image=images[0])
    return fields
