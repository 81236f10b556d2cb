"""A local stand-in for the hosted platform on 127.0.0.1 (a real Starlette app, real HTTP).

It serves the list endpoints a platform user can still download from — stored chat completions
(`GET /v1/chat/completions`, paged with `after`/`limit`/`has_more`/`last_id`) and each one's request
messages (`GET /v1/chat/completions/{id}/messages`) — in the shapes the openai SDK's types and
../shared/reference/openai-platform.md §6 record, and answers chat completions as the user's
"fine-tuned" model `ft:gpt-4o-mini-2024-07-18:acme::abc123`. That model is a lookup of the right
label for each question (an oracle: the platform's fine-tune is what no machine here can reach), so
a student trained on too little data is measurably worse than it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import LABELS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

FT_MODEL = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
SYSTEM = "Answer with one label: " + ", ".join(LABELS)


def stored_completion(index: int, question: str, label: str, created: int = 1_780_000_000) -> dict[str, Any]:
    """A stored completion as the list endpoint shows it, plus its request messages (`input_messages`)."""
    return {
        "id": f"chatcmpl-stored{index:04d}", "object": "chat.completion", "created": created + 60 * index,
        "model": FT_MODEL, "metadata": {"usecase": "triage", "prompt_version": "v3"},
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": label, "refusal": None, "annotations": []}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43},
        "service_tier": "default", "system_fingerprint": "fp_abc",
        "input_messages": [{"id": f"chatcmpl-stored{index:04d}-0", "role": "system", "content": SYSTEM, "content_parts": None},
                           {"id": f"chatcmpl-stored{index:04d}-1", "role": "user", "content": question,
                            "content_parts": None}],
    }


def traffic(n: int, answer: str | None = None) -> list[dict[str, Any]]:
    """`n` stored completions of the fine-tune: questions about the three labels, answered right
    (or, with `answer`, all answered with it: a teacher the tiny student can learn)."""
    return [stored_completion(i, f"customer message {i} about {LABELS[i % 3].replace('_', ' ')}", answer or LABELS[i % 3])
            for i in range(n)]


def prompt_versions() -> list[dict[str, Any]]:
    """Two versions of one prompt object and one of another, in the shape flywheel.importers.prompts
    accepts (the SDK records no prompts resource; see that module's docstring)."""
    return [
        {"object": "prompt.version", "id": "pmpt_triage", "version": "1", "created_at": 1_760_000_000,
         "name": "triage", "model": "gpt-4o-mini", "instructions": "Answer with one label.",
         "messages": [{"role": "user", "content": "{{question}}"}], "variables": {"question": None}},
        {"object": "prompt.version", "id": "pmpt_triage", "version": "2", "created_at": 1_770_000_000,
         "name": "triage", "model": "gpt-4o-mini", "instructions": SYSTEM,
         "messages": [{"role": "user", "content": [{"type": "input_text", "text": "Customer: {{ question }}"}]}],
         "variables": {"question": None}},
        {"object": "prompt.version", "id": "pmpt_greet", "version": "1", "created_at": 1_765_000_000,
         "messages": [{"role": "developer", "content": "Greet {{name}}."}]},
    ]


class Platform:
    """The stand-in: `completions` are the stored ones; `chat_calls` counts paid model calls."""

    def __init__(self, completions: list[dict[str, Any]], *, truncate: bool = False,
                 prompts: list[dict[str, Any]] | None = None, answer: str | None = None):
        self.completions = completions
        self.answer = answer  # the fine-tune answers every question with this (a learnable teacher)
        self.prompts = prompts or []
        self.truncate = truncate  # a server that says has_more but gives no last_id
        self.chat_calls = 0

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.list_completions, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/chat/completions/{cid}/messages", self.messages, methods=["GET"]),
            Route("/v1/prompts", self.list_prompts, methods=["GET"]),
            Route("/v1/prompts/{pid}/versions", self.list_versions, methods=["GET"]),
        ])

    @staticmethod
    def _page(rows: list[dict[str, Any]], request: Request) -> dict[str, Any]:
        after, limit = request.query_params.get("after"), int(request.query_params.get("limit", 20))
        start = next((i + 1 for i, r in enumerate(rows) if r["id"] == after), 0)
        page = rows[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(rows)}

    async def list_completions(self, request: Request) -> JSONResponse:
        rows = [{k: v for k, v in c.items() if k != "input_messages"} for c in self.completions]
        page = self._page(rows, request)
        if self.truncate:
            page.update(has_more=True, last_id=None, data=page["data"][:0])
        return JSONResponse(page)

    async def list_prompts(self, request: Request) -> JSONResponse:
        newest: dict[str, dict[str, Any]] = {}
        for version in self.prompts:  # a prompt object: its id, name and newest version
            newest[version["id"]] = {"object": "prompt", "id": version["id"], "name": version.get("name"),
                                     "version": version["version"], "created_at": version.get("created_at")}
        return JSONResponse(self._page(list(newest.values()), request))

    async def list_versions(self, request: Request) -> JSONResponse:
        rows = [v for v in self.prompts if v["id"] == request.path_params["pid"]]
        page = self._page([{**v, "id": v["id"]} for v in rows], request)
        return JSONResponse(page)

    async def messages(self, request: Request) -> JSONResponse:
        found = next((c for c in self.completions if c["id"] == request.path_params["cid"]), None)
        if found is None:
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error"}}, status_code=404)
        return JSONResponse(self._page(found["input_messages"], request))

    async def chat(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.chat_calls += 1
        question = body["messages"][-1]["content"]
        label = self.answer or next((label for label in LABELS if label.replace("_", " ") in question), LABELS[0])
        return JSONResponse({
            "id": f"chatcmpl-live{self.chat_calls}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                                 "message": {"role": "assistant", "content": label}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}})
