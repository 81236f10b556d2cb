"""Captures: filtering by metadata and date, the SFT JSONL export, and their CLI commands."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from dataclasses import replace

import pytest
from click.testing import CliRunner

from flywheel.capture_rows import parse_metadata_filters, parse_when
from flywheel.proxy.captures import export_sft, list_captures, sft_example
from flywheel.cli import main
from flywheel.errors import FlywheelError
from flywheel.store.rows import Capture


def chat_capture(created_at: str, question: str, answer: str | None, metadata=None, status=200, error=None,
                 tools=None, model="gpt-4o-mini"):
    request = {"model": model, "messages": [{"role": "system", "content": "Classify."},
                                            {"role": "user", "content": question}]}
    if metadata is not None:
        request["metadata"] = metadata
    if tools:
        request["tools"] = tools
    response = None
    if answer is not None:
        response = {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}}
    return {"created_at": created_at, "endpoint": "/v1/chat/completions", "upstream": "http://up/v1",
            "model": model, "stream": 0, "status": status, "latency_s": 0.25, "prompt_tokens": 20,
            "completion_tokens": 2, "total_tokens": 22,
            "metadata_json": json.dumps(metadata) if metadata is not None else None,
            "request_json": json.dumps(request), "response_json": json.dumps(response) if response else None,
            "error": error}


@pytest.fixture
def filled(store):
    store.insert_captures([
        chat_capture("2026-11-01T09:00:00.000+00:00", "where is my card", "card_arrival",
                     {"usecase": "triage", "prompt_version": "v1"}),
        chat_capture("2026-11-03T12:00:00.000+00:00", "pin locked", "pin_blocked",
                     {"usecase": "triage", "prompt_version": "v2"}),
        chat_capture("2026-11-03T23:59:59.000+00:00", "rate?", "exchange_rate", {"usecase": "faq"}),
        chat_capture("2026-11-04T08:00:00.000+00:00", "broken", None, {"usecase": "triage", "prompt_version": "v2"},
                     status=502, error="upstream_unreachable: connection refused"),
        chat_capture("2026-11-05T08:00:00.000+00:00", "no tags", "atm_support"),
    ])
    return store


def test_parse_metadata_filters():
    assert parse_metadata_filters(["usecase=triage", "note=a=b"]) == {"usecase": "triage", "note": "a=b"}
    with pytest.raises(FlywheelError, match="expected key=value"):
        parse_metadata_filters(["usecase"])


def test_parse_when():
    assert parse_when("2026-11-03") == "2026-11-03T00:00:00.000+00:00"
    assert parse_when("2026-11-03", end=True) == "2026-11-04T00:00:00.000+00:00"
    assert parse_when("2026-11-03T14:30") == "2026-11-03T14:30:00.000+00:00"
    assert parse_when("2026-11-03T14:30+02:00") == "2026-11-03T12:30:00.000+00:00"
    week_ago = datetime.fromisoformat(parse_when("7d"))
    assert abs(datetime.now(timezone.utc) - timedelta(days=7) - week_ago) < timedelta(minutes=1)
    with pytest.raises(FlywheelError, match="--since 'yesterday'"):
        parse_when("yesterday")
    with pytest.raises(FlywheelError, match="--until '2026-13-01'"):
        parse_when("2026-13-01", option="--until")


def test_list_filters_by_metadata_and_dates(filled):
    keys = lambda rows: [r["input"] for r in rows]  # noqa: E731
    assert keys(list_captures(filled)) == ["no tags", "broken", "rate?", "pin locked", "where is my card"]
    assert keys(list_captures(filled, metadata={"usecase": "triage"})) == ["broken", "pin locked", "where is my card"]
    assert keys(list_captures(filled, metadata={"usecase": "triage", "prompt_version": "v2"})) == ["broken", "pin locked"]
    assert keys(list_captures(filled, since="2026-11-03", until="2026-11-03")) == ["rate?", "pin locked"]
    assert keys(list_captures(filled, since="2026-11-04T00:00")) == ["no tags", "broken"]
    assert keys(list_captures(filled, outcome="failed")) == ["broken"]
    assert keys(list_captures(filled, limit=2)) == ["no tags", "broken"]
    row = list_captures(filled, metadata={"usecase": "faq"})[0]
    assert row["output"] == "exchange_rate" and row["latency_ms"] == 250.0 and row["metadata"] == {"usecase": "faq"}


def test_export_writes_sft_lines_of_successful_captures(filled, tmp_path):
    out = tmp_path / "train.jsonl"
    result = export_sft(filled, out, metadata={"usecase": "triage"})
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.written == 2 and len(lines) == 2  # the 502 is not exported
    assert lines[0] == {"messages": [{"role": "system", "content": "Classify."},
                                     {"role": "user", "content": "where is my card"},
                                     {"role": "assistant", "content": "card_arrival"}]}
    assert lines[1]["messages"][-1] == {"role": "assistant", "content": "pin_blocked"}
    assert export_sft(filled, out, since="2026-11-02", until="2026-11-03").written == 2
    assert [json.loads(x)["messages"][-1]["content"] for x in out.read_text().splitlines()] == [
        "pin_blocked", "exchange_rate"]


def test_sft_example_keeps_tools_and_tool_calls():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    capture = chat_capture("2026-11-01T00:00:00.000+00:00", "q", None, tools=tools)
    capture["response_json"] = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}}]})
    capture = Capture.from_row({"id": 1, **capture})
    example = sft_example(capture)
    assert example["tools"] == tools
    assert example["messages"][-1]["tool_calls"][0]["function"]["name"] == "lookup"
    assert sft_example(replace(capture, status=500)) is None
    assert sft_example(replace(capture, response_json=json.dumps({"choices": []}))) is None


def test_cli_list_and_export(filled, tmp_path):
    db = filled.path
    runner = CliRunner()
    listed = runner.invoke(main, ["captures", "list", "--db", db, "--metadata", "usecase=triage", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["input"] for r in json.loads(listed.output)] == ["broken", "pin locked", "where is my card"]
    table = runner.invoke(main, ["captures", "list", "--db", db, "--failed"])
    assert table.exit_code == 0 and "upstream_unreachable" in table.output and "card_arrival" not in table.output
    out = tmp_path / "sft.jsonl"
    exported = runner.invoke(main, ["captures", "export", "-o", str(out), "--db", db, "--since", "2026-11-03"])
    assert exported.exit_code == 0, exported.output
    assert exported.output.startswith(f"wrote 3 examples to {out}")  # the failed call of 11-04 is left out
    assert len(out.read_text().splitlines()) == 3
    bad = runner.invoke(main, ["captures", "export", "-o", str(out), "--db", db, "--since", "last tuesday"])
    assert bad.exit_code == 1 and "error: --since 'last tuesday'" in bad.output
