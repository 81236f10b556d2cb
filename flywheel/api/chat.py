"""`POST /v1/chat/completions` on the API server, for any Flywheel model reference and for the
`ft:` models its fine-tuning jobs made (their adapters, as `serve-model` serves them). With
`store: true` the call (and its `metadata`) is recorded in the captures table, as `flywheel proxy`
records calls, and evals read it back as a `stored_completions` source.

Requests are parsed and answered as `flywheel.model_server` does; models load on first use and
the last few stay loaded. Generation runs in a thread, one request per model at a time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flywheel.api.access import caller
from flywheel.api.errors import check_metadata
from flywheel.api.fine_tuning import model_for
from flywheel.api.logs import store_completion
from flywheel.errors import FlywheelError
from flywheel.model_server import _completion_id, _sse, _usage, apply_stop, parse_chat_call
from flywheel.web import ApiError, parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.app import ApiState

KEEP_LOADED = 2


class Models:
    """Loaded models by reference, least recently used dropped first, each with its own lock."""

    def __init__(self, keep: int = KEEP_LOADED):
        self.keep = keep
        self.loaded: OrderedDict[str, tuple[Any, threading.Lock]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, ref: str):
        from flywheel.models import load_model

        with self.lock:
            if ref not in self.loaded:
                self.loaded[ref] = (load_model(ref), threading.Lock())
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(ref)
            return self.loaded[ref]


def routes(state: "ApiState") -> list[Route]:
    models = Models()

    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, state.max_upload_bytes)
        body = parse_json_object(raw)
        call = parse_chat_call(body)
        started = time.perf_counter()
        try:
            ref = model_for(state.store(), call.model, caller(request).project)
            model, lock = models.get(ref)
        except FlywheelError as exc:
            raise ApiError(404, f"The model '{call.model}' does not exist: {exc}", param="model",
                           code="model_not_found") from None

        def generate():
            with lock:
                return model.generate(call.requests())

        completions = await asyncio.get_running_loop().run_in_executor(None, generate)
        failed = next((c.error for c in completions if c.error), None)
        if failed:
            raise ApiError(500, f"generation failed: {failed}", code="generation_failed")
        choices = []
        for index, completion in enumerate(completions):
            text, finish = apply_stop(completion.text, completion.finish_reason, call.stop)
            choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": finish})
        payload = {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                   "model": call.model, "system_fingerprint": None, "choices": choices, "usage": _usage(completions)}
        if body.get("store") is True:
            # as `flywheel proxy` records calls: evals read them back as stored completions
            usage = payload["usage"]
            store_completion(state.store(), {
                "endpoint": "/v1/chat/completions", "upstream": "flywheel-api", "model": call.model,
                "stream": int(call.stream), "status": 200, "latency_s": time.perf_counter() - started,
                "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {}),
                "request_json": raw.decode("utf-8"), "request_bytes": len(raw), "response_json": json.dumps(payload),
                "response_id": payload["id"]}, caller(request).project)
        if call.stream:
            return StreamingResponse(_sse(payload, call.include_usage), media_type="text/event-stream")
        return JSONResponse(payload)

    return [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
