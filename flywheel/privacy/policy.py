"""The proxy's privacy settings: redact what is stored, screen replies for leaked PII, retention.

    privacy = ProxyPrivacy(redact=RedactionPolicy(), block_output_pii="reject", retention_days=30)
    app = create_proxy_app(upstream, db, privacy=privacy)

* `redact` — each capture row is redacted in the writer thread before it is stored (request and
  reply as one conversation); what goes to the upstream and back to the app is untouched.
* `block_output_pii` — a reply is screened before it is relayed: PII in the reply that the request
  did not contain (the `pii` grader's rule) makes the proxy answer 422 `output_pii_blocked`
  (`reject`), or relay the reply with those spans replaced by `<KIND>` (`redact`). A streamed reply
  is then buffered whole before anything is relayed (the screen needs the full text): the client
  gets the same events at once, or, when spans were replaced, one chunk with the whole message.
* `retention_days` — captures older than that are purged (with their copies) at start and hourly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from flywheel.privacy.redact import RedactionPolicy, Redactor, parse_redact
from graders.pii import get_detector

BLOCK_MODES = ("reject", "redact")


@dataclass
class Screened:
    """The verdict on one reply: leaked entities (kind, masked text) and the reply to send."""

    leaked: list[dict[str, str]]
    payload: Any

    @property
    def blocked(self) -> bool:
        return bool(self.leaked)

    def message(self) -> str:
        kinds = sorted({e["kind"] for e in self.leaked})
        return f"the reply contained PII that the request did not ({', '.join(kinds)}); not relayed"


def _mask(text: str) -> str:
    return text[:1] + "*" * max(len(text) - 2, 1) + text[-1:] if len(text) > 2 else "*" * len(text)


def _message_texts(messages: Any) -> list[str]:
    out = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                out.append(str(call["function"].get("arguments") or ""))
    return out


def _normal(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum() or ch == "@")


@dataclass
class ProxyPrivacy:
    redact: RedactionPolicy | None = None
    block_output_pii: Literal["reject", "redact"] | None = None
    retention_days: float | None = None
    retention_interval_s: float = 3600.0
    _writer_redactor: Redactor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.redact is not None:
            self._writer_redactor = Redactor(self.redact)  # used only in the writer thread
        if self.block_output_pii is not None:
            policy = self.redact or RedactionPolicy()
            self.detector = get_detector(tuple(policy.entities), policy.min_score)  # builds Presidio now
        if self.retention_days is not None:
            from flywheel.privacy.retention import cutoff

            cutoff(self.retention_days)  # a bad value fails at start, as one clean line

    # -- stored rows ----------------------------------------------------------------------------
    def transform_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """The capture row as it is stored (redacted when `redact` is set). Writer thread only."""
        if self._writer_redactor is None:
            return row
        return self._writer_redactor.redact_capture(row)

    # -- replies --------------------------------------------------------------------------------
    def screen(self, request: dict[str, Any], payload: Any) -> Screened:
        """Check a chat.completion reply for PII absent from the request (CPU work: run it in a
        thread). The returned payload has the leaked spans replaced by `<KIND>`."""
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return Screened([], payload)
        seen = _normal(" ".join(_message_texts(request.get("messages"))))
        leaked: list[dict[str, str]] = []
        payload = json.loads(json.dumps(payload))
        for choice in payload["choices"]:
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                continue
            text = message["content"]
            new = []
            for entity in self.detector.detect(text):
                if _normal(entity.text) and _normal(entity.text) in seen:
                    continue
                leaked.append({"kind": entity.kind, "text": _mask(entity.text)})
                new.append(entity)
            for entity in reversed(new):
                text = text[:entity.start] + f"<{entity.kind}>" + text[entity.end:]
            message["content"] = text
        return Screened(leaked, payload)

    @staticmethod
    def stream_of(payload: dict[str, Any]) -> bytes:
        """A screened, re-assembled completion as a short SSE stream: one chunk per choice, [DONE]."""
        events = []
        for choice in payload.get("choices") or []:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
            events.append({"id": payload.get("id"), "object": "chat.completion.chunk",
                           "created": payload.get("created") or int(time.time()), "model": payload.get("model"),
                           "choices": [{"index": choice.get("index", 0), "delta": delta,
                                        "finish_reason": choice.get("finish_reason")}]})
        if payload.get("usage"):
            events.append({"id": payload.get("id"), "object": "chat.completion.chunk", "model": payload.get("model"),
                           "created": payload.get("created") or int(time.time()), "choices": [],
                           "usage": payload["usage"]})
        body = "".join(f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events)
        return (body + "data: [DONE]\n\n").encode("utf-8")


def proxy_privacy(redact: str | None, block_output_pii: str | None, retention_days: float | None) -> ProxyPrivacy | None:
    """The proxy's privacy settings from its command-line options (None when none is set)."""
    if redact is None and block_output_pii is None and retention_days is None:
        return None

    return ProxyPrivacy(redact=parse_redact(redact) if redact else None, block_output_pii=block_output_pii,  # type: ignore[arg-type]
                        retention_days=retention_days)
