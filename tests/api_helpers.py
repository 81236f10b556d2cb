"""Helpers for the API tests: a server on a temp store, JSONL files, an eval, polling."""

from __future__ import annotations

import json
import time
from typing import Any

import openai

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]


def items(n: int) -> list[dict[str, Any]]:
    return [{"item": {"text": f"question {i} about {LABELS[i % 3].replace('_', ' ')}", "label": LABELS[i % 3]}}
            for i in range(n)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


CRITERIA = [
    # passes for every sample (the tiny model never answers "zzz")
    {"type": "string_check", "name": "not_zzz", "input": "{{sample.output_text}}", "reference": "zzz",
     "operation": "ne"},
    # depends on the item only: passes for the card_arrival third
    {"type": "string_check", "name": "is_card", "input": "{{item.label}}", "reference": "card_arrival",
     "operation": "eq"},
]


def create_eval(client: openai.OpenAI, criteria: list[dict[str, Any]] | None = None):
    return client.evals.create(
        name="tiny-api",
        data_source_config={"type": "custom", "include_sample_schema": True,
                            "item_schema": {"type": "object", "properties": {"text": {"type": "string"},
                                                                             "label": {"type": "string"}}}},
        testing_criteria=criteria or CRITERIA)


def completions_source(model_dir, source: dict[str, Any], max_tokens: int = 4) -> dict[str, Any]:
    return {"type": "completions", "source": source, "model": f"local:{model_dir}",
            "input_messages": {"type": "template",
                               "template": [{"role": "system", "content": "Answer with the intent."},
                                            {"role": "user", "content": "{{item.text}}"}]},
            "sampling_params": {"max_completion_tokens": max_tokens, "temperature": 0}}


def wait_run(client: openai.OpenAI, eval_id: str, run_id: str, states=("completed", "failed", "canceled"),
             timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in states:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run.status} after {timeout}s")
        time.sleep(0.1)
