"""Captured traffic (from `flywheel proxy`): list it, and export it as the platform's SFT JSONL.

    rows = list_captures(store, metadata={"usecase": "triage"}, since="7d")
    result = export_sft(store, "train.jsonl", metadata={"prompt_version": "v2"}, since="2026-11-01")

An exported line is `{"messages": <the request's messages> + [<the assistant reply>]}` (plus the
request's `tools` when it had some), the chat format of supervised fine-tuning (reference §5.4) —
the API equivalent of the platform's "Distill" button over stored completions. Only successful
calls are exported; with `n` > 1 the first choice is the reply.

Dates: `2026-11-05` (a day: as `--since` its start, as `--until` its end, inclusive), an ISO
timestamp (`2026-11-05T14:00`, UTC unless it names an offset), or an age: `30m`, `12h`, `7d`, `2w`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.capture_rows import chat_exchange, loads_json, parse_when, reply_message
from flywheel.errors import FlywheelError
from flywheel.store import Store
from flywheel.store.rows import Capture
from flywheel.terminal import safe_terminal_text


def sft_example(capture: Capture) -> dict[str, Any] | None:
    """A capture as one SFT line, or None when it is not a usable successful call."""
    if capture.error or capture.status != 200:
        return None
    exchange = chat_exchange(capture)
    if exchange is None:
        return None
    request, reply = exchange
    example: dict[str, Any] = {"messages": [*request["messages"], reply]}
    if request.get("tools"):
        example["tools"] = request["tools"]
    return example


def summarise_capture(capture: Capture) -> dict[str, Any]:
    """A row for listings: what was asked, what came back, how it went."""
    request = loads_json(capture.request_json)
    messages = request.get("messages") if isinstance(request, dict) else None
    last_user = next((m.get("content") for m in reversed(messages or []) if isinstance(m, dict)
                      and m.get("role") == "user"), None)
    reply = reply_message(loads_json(capture.response_json))
    return {
        "id": capture.id, "created_at": capture.created_at, "model": capture.model,
        "status": capture.status, "latency_ms": round((capture.latency_s or 0) * 1000, 1),
        "prompt_tokens": capture.prompt_tokens, "completion_tokens": capture.completion_tokens,
        "metadata": loads_json(capture.metadata_json) or {}, "stream": bool(capture.stream),
        "input": last_user if isinstance(last_user, str) else json.dumps(last_user) if last_user else None,
        "output": reply.get("content") if reply else None, "error": capture.error,
    }


def list_captures(store: Store, *, metadata: dict[str, str] | None = None, since: str | None = None,
                  until: str | None = None, model: str | None = None, limit: int | None = 50,
                  outcome: str | None = None) -> list[dict[str, Any]]:
    """Captures newest first, summarised; dates as `parse_when` reads them; outcome ok|failed."""
    rows = store.query_captures(
        metadata=metadata, since=parse_when(since), until=parse_when(until, end=True, option="--until"),
        model=model, outcome=outcome, limit=limit, newest_first=True)
    return [summarise_capture(r) for r in rows]


@dataclass
class ExportResult:
    path: str
    written: int
    skipped: int


def export_sft(store: Store, path: str | Path, *, metadata: dict[str, str] | None = None,
               since: str | None = None, until: str | None = None, model: str | None = None) -> ExportResult:
    """Write the successful matching captures as SFT JSONL, oldest first."""
    rows = store.query_captures(
        metadata=metadata, since=parse_when(since), until=parse_when(until, end=True, option="--until"),
        model=model, outcome="ok")
    examples = [sft_example(r) for r in rows]
    path = Path(path)
    try:
        with path.open("w", encoding="utf-8") as handle:
            for example in examples:
                if example is not None:
                    handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise FlywheelError(f"{path}: cannot write export: {exc.strerror}") from None
    written = sum(e is not None for e in examples)
    return ExportResult(path=str(path), written=written, skipped=len(examples) - written)


def print_captures(rows: list[dict[str, Any]]) -> None:
    """A table of `list_captures` rows on the terminal."""
    from rich.console import Console
    from rich.table import Table

    safe = safe_terminal_text

    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped output: do not squeeze the table to 80 columns
    if not rows:
        console.print("no captures match")
        return
    table = Table(show_lines=False)
    for column in ("id", "created_at", "model", "status", "ms", "tokens", "metadata", "input", "output / error"):
        table.add_column(column, overflow="fold")

    def clip(text: Any, width: int = 48) -> str:
        """Captured text (anyone's who called the proxy): one line, cut, made safe for a terminal."""
        text = "" if text is None else str(text).replace("\n", " ")
        return safe(text if len(text) <= width else text[:width - 1] + "…")

    for r in rows:
        tokens = f"{r['prompt_tokens'] or 0}+{r['completion_tokens'] or 0}"
        metadata = ",".join(f"{k}={v}" for k, v in r["metadata"].items())
        outcome = f"[red]{clip(r['error'])}[/red]" if r["error"] else clip(r["output"])
        table.add_row(safe(r["id"]), safe(r["created_at"][:19]), safe(r["model"] or ""), safe(r["status"] or ""),
                      f"{r['latency_ms']:.0f}", safe(tokens), clip(metadata, 32), clip(r["input"]), outcome)
    console.print(table)
