"""Helpers for the serving tests (serve-model, proxy, openai backend, captures).

`build_chatty_model` makes a real tiny Llama whose greedy replies are varied words (the shared
`tiny_model_dir` answers with special tokens only, which decode to ""), so a test that compares
replies can tell them apart. `scripted_upstream` is a small real Starlette app that misbehaves on
purpose (429s, 500s, stalls, JSON replies): an upstream that no machine here can reach otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def build_chatty_model(target: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # large random weights: argmax lands on ordinary words
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def completion_body(content: str, model: str = "scripted", n: int = 1, prompt_tokens: int = 11,
                    completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content if n == 1 else f"{content} {i}"},
                     "finish_reason": "stop", "logprobs": None} for i in range(n)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                  "total_tokens": prompt_tokens + completion_tokens * n},
    }


class ScriptedUpstream:
    """An OpenAI-compatible app whose behaviour a test sets: `plan` is consumed call by call.

    Plan entries: "ok", "400", "429", "500", "stall" (sleeps `stall_s`), "json" (replies with JSON text
    when response_format asks for it), "ignore_n" (answers one choice whatever `n` is).
    When the plan is empty, it answers "ok". `bodies` keeps every request body it received.
    """

    def __init__(self, plan: list[str] | None = None, stall_s: float = 5.0, hold_s: float = 0.0):
        self.plan = list(plan or [])
        self.stall_s = stall_s
        self.hold_s = hold_s
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0,
                                                          "owned_by": "tests"}]})

    async def chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        step = self.plan.pop(0) if self.plan else "ok"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            if step == "429":
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_error", "code": None}},
                                    status_code=429, headers={"retry-after-ms": "1"})
            if step == "400":
                return JSONResponse({"error": {"message": "bad request", "type": "invalid_request_error"}},
                                    status_code=400)
            if step == "500":
                return JSONResponse({"error": {"message": "upstream exploded", "type": "server_error"}},
                                    status_code=500, headers={"retry-after-ms": "1"})
            if step == "stall":
                await asyncio.sleep(self.stall_s)
            n = 1 if step == "ignore_n" else int(body.get("n") or 1)
            last_user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            content = f"echo: {last_user}"
            if body.get("response_format", {}).get("type") == "json_schema":
                content = json.dumps({"intent": "card_arrival", "echo": last_user})
            payload = completion_body(content, model=body.get("model", "scripted"), n=n)
            if body.get("stream"):
                return StreamingResponse(self._sse(payload), media_type="text/event-stream")
            return JSONResponse(payload)
        finally:
            self.in_flight -= 1

    async def _sse(self, payload: dict[str, Any]):
        for choice in payload["choices"]:
            text = choice["message"]["content"]
            for piece in (text[: len(text) // 2], text[len(text) // 2:]):
                chunk = {"id": payload["id"], "object": "chat.completion.chunk", "model": payload["model"],
                         "created": payload["created"],
                         "choices": [{"index": choice["index"], "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            end = {"id": payload["id"], "object": "chat.completion.chunk", "model": payload["model"],
                   "created": payload["created"],
                   "choices": [{"index": choice["index"], "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\n".encode()
        usage = {"id": payload["id"], "object": "chat.completion.chunk", "model": payload["model"],
                 "created": payload["created"], "choices": [], "usage": payload["usage"]}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def free_port() -> int:
    """A port nothing listens on (bound and released: good enough for 'upstream is down')."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
