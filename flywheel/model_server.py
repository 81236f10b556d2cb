"""`flywheel serve-model`: any flywheel model behind an OpenAI-compatible HTTP API.

    flywheel serve-model local:smollm2+.flywheel/ckpt/sft-3 --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-sft-3", messages=[...])

Routes: `POST /v1/chat/completions` (also `stream: true`, sent as server-sent events),
`GET /v1/models`, `GET /health`. Errors are the platform's JSON shape
`{"error": {"message", "type", "param", "code"}}` with the matching status: 400 malformed body,
404 unknown model or route, 405 wrong method, 413 oversized body, 500 generation failure.

Concurrent requests are gathered by a micro-batcher: the first waiting request opens a batch,
which closes when it holds `batch_size` sequences or `max_wait_ms` has passed, and the whole batch
goes to ONE `model.generate` call in a worker thread. While the model works, new requests queue up
and form the next batch, so throughput grows with load while a lone request waits at most
`max_wait_ms` extra. Generation is not incremental: a streamed reply is generated whole, then sent
as SSE chunks, which is what OpenAI-compatible clients need to work unchanged.

The ASGI stack is Starlette + uvicorn (the plumbing it shares with the proxy and the review app is
in `flywheel.web`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flywheel.errors import FlywheelError
from flywheel.images import ImageError, check_image_count, image_part, image_url_of, load_image
from flywheel.models import ChatRequest, Completion, Model, Sampling, load_model, parse_model_ref
from flywheel.web import (DEFAULT_MAX_BODY_BYTES, EXCEPTION_HANDLERS, ApiError, bind_socket, parse_json_object,
                          read_body, uvicorn_config)

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 8192
MAX_N = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


# -- parsing a chat request -----------------------------------------------------------------------
@dataclass
class ChatCall:
    """A parsed /v1/chat/completions body."""

    model: str
    messages: list[dict[str, str]]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def requests(self) -> list[ChatRequest]:
        return [ChatRequest(messages=self.messages, sampling=self.sampling, repeat=i,
                            response_format=self.response_format, tools=self.tools, tool_choice=self.tool_choice)
                for i in range(self.n)]


def _message_text(content: Any, index: int) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
                                         for p in content):
        return _vision_parts(content, index)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported by this server",
                               param=f"messages[{index}].content", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages[{index}].content")


def _vision_parts(content: list[Any], index: int) -> list[dict[str, Any]]:
    """Text and image parts, each image checked (flywheel.images) and kept as a data URL. Only
    data URLs are taken: the server fetches nothing from the network on a client's behalf."""
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        where = f"messages[{index}].content[{position}]"
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        url = image_url_of(part)
        if not isinstance(url, str):
            raise ApiError(400, f"{where}: expected a text or image_url part", param=f"messages[{index}].content", code="unsupported_content")
        if not url.startswith("data:"):
            raise ApiError(400, f"{where}: only base64 data URLs are accepted for images (this server fetches "
                           "no URLs)", param=f"messages[{index}].content", code="unsupported_content")
        try:
            image = load_image(url)
        except ImageError as exc:
            raise ApiError(400, f"{where}: {exc}", param=f"messages[{index}].content", code="invalid_image") from None
        inner = part.get("image_url") if isinstance(part.get("image_url"), dict) else {}
        parts.append(image_part(image, inner.get("detail") or part.get("detail")))
    return parts


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}, got {value!r}", param=name)
    return value


def parse_chat_call(body: dict[str, Any]) -> ChatCall:
    """Validate an OpenAI chat completions body; ApiError(400) names the bad field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string naming a model from /v1/models)", param="model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ApiError(400, "messages is required: a non-empty list of {role, content}", param="messages")
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{index}].role must be one of {', '.join(ROLES)}",
                           param=f"messages[{index}].role")
        # Chat templates of small open models know `system`, not the platform's `developer`.
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _message_text(message.get("content"), index)})
        if role == "assistant" and isinstance(message.get("tool_calls"), list):  # kept for tool-aware templates
            messages[-1]["tool_calls"] = message["tool_calls"]
    tools, tool_choice = body.get("tools") or None, body.get("tool_choice")
    try:
        from flywheel.tools import check_tools

        check_tools(tools, tool_choice)
    except ValueError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(":")[0].split("[")[0]) from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_LIMIT, True)
    sampling = Sampling(
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)) or 1.0,
        max_tokens=int(max_tokens),
        seed=int(_number(body, "seed", 0, -2**63, 2**63 - 1, True)),
    )
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    stream_options = body.get("stream_options") or {}
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise ApiError(400, "response_format must be an object", param="response_format")
    return ChatCall(
        model=model, messages=messages, sampling=sampling,
        n=int(_number(body, "n", 1, 1, MAX_N, True)), stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        stop=[s for s in stop if s], response_format=response_format, tools=tools, tool_choice=tool_choice)


def apply_stop(text: str, finish_reason: str, stop: Sequence[str]) -> tuple[str, str]:
    """Cut the text at the first stop sequence (the model itself does not know them)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish_reason)


# -- the micro-batcher ----------------------------------------------------------------------------
class MicroBatcher:
    """Gathers concurrent requests into one `model.generate` call, run in a worker thread.

    `batch_sizes` remembers how many sequences each generate call got (for tests and stats).
    """

    def __init__(self, model: Model, batch_size: int = 32, max_wait_ms: float = 10.0):
        if batch_size < 1:
            raise FlywheelError(f"--batch-size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.batch_sizes: list[int] = []
        self._pending: collections.deque[tuple[list[ChatRequest], asyncio.Future]] = collections.deque()
        self._pending_sequences = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One worker: generate calls on one model must not overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(ApiError(503, "server is shutting down", code="shutting_down"))
        self._executor.shutdown(wait=True)

    async def submit(self, requests: list[ChatRequest]) -> list[Completion]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((requests, future))
        self._pending_sequences += len(requests)
        self._wakeup.set()
        return await future

    async def _wait(self, timeout: float | None) -> bool:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            deadline = loop.time() + self.max_wait_s
            while self._pending_sequences < self.batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait(remaining):
                    break
            jobs = []
            size = 0
            while self._pending and (not jobs or size + len(self._pending[0][0]) <= self.batch_size):
                requests, future = self._pending.popleft()
                self._pending_sequences -= len(requests)
                if future.done():  # the client went away while waiting
                    continue
                jobs.append((requests, future))
                size += len(requests)
            if not jobs:
                continue
            flat = [r for requests, _ in jobs for r in requests]
            self.batch_sizes.append(len(flat))
            try:
                completions = await loop.run_in_executor(self._executor, self.model.generate, flat)
            except Exception as exc:  # noqa: BLE001 - every waiting client gets a 500
                error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed")
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for requests, future in jobs:
                if not future.done():
                    future.set_result(completions[start:start + len(requests)])
                start += len(requests)


# -- the app --------------------------------------------------------------------------------------
def served_name(ref: str) -> str:
    """The model id clients use: `local:smollm2+ckpt/sft-3` -> `smollm2-sft-3`."""
    try:
        scheme, name, adapter = parse_model_ref(ref)
    except FlywheelError:
        return ref
    if scheme == "local" and Path(name).exists():
        name = Path(name).resolve().name
    if adapter:  # one adapter, or a combination (`A*0.7+B*0.3`): their folder names
        from flywheel.models import parse_adapters

        name = "-".join([name, *(Path(path).resolve().name + ("" if weight == 1.0 else f"x{weight:g}")
                                 for path, weight in parse_adapters(adapter))])
    return name


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = completions[0].prompt_tokens if completions else 0
    output = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def model_fingerprint(model: Model) -> str:
    """The reply's `system_fingerprint` for a model: a short hash of its weights' fingerprint."""
    return "fp_" + hashlib.sha256(model.fingerprint.encode()).hexdigest()[:10]


def chat_payload(call: ChatCall, completions: list[Completion], name: str, fingerprint: str | None) -> dict[str, Any]:
    """The chat.completion object for a call's completions; ApiError(500) when generation failed. The
    one reply shape of every flywheel model server (serve-model, the service's aliases, the API)."""
    failed = next((c.error for c in completions if c.error), None)
    if failed:
        raise ApiError(500, f"generation failed: {failed}", code="generation_failed")
    choices = []
    for index, completion in enumerate(completions):
        text, finish = apply_stop(completion.text, completion.finish_reason, call.stop)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if completion.tool_calls:  # read from the reply by flywheel.tools
            message.update(content=text or None, tool_calls=completion.tool_calls)
            finish = "tool_calls"
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": name, "system_fingerprint": fingerprint, "choices": choices, "usage": _usage(completions)}


def payload_response(call: ChatCall, payload: dict[str, Any]) -> Response:
    """A chat.completion object as the call asked for it: JSON, or server-sent events when it streams."""
    if call.stream:
        return StreamingResponse(_sse(payload, call.include_usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    return JSONResponse(payload)


def chat_response(call: ChatCall, completions: list[Completion], name: str, fingerprint: str) -> Response:
    """The chat.completion reply (JSON, or SSE when the call streams) for a call's completions."""
    return payload_response(call, chat_payload(call, completions, name, fingerprint))


# Ten images of 10 MB each, base64-encoded (4/3), plus the rest of the request.
VISION_MAX_BODY_BYTES = 10 * 10 * 1024 * 1024 * 4 // 3 + DEFAULT_MAX_BODY_BYTES


def create_app(model: Model, *, name: str | None = None, batch_size: int = 32, max_wait_ms: float = 10.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, preload: bool = True) -> Starlette:
    """The OpenAI-compatible app for one model. `app.state.batcher` exposes the batcher."""
    name = name or served_name(model.ref)
    if model.reads_images and max_body_bytes == DEFAULT_MAX_BODY_BYTES:
        max_body_bytes = VISION_MAX_BODY_BYTES
    aliases = {name, model.ref}
    batcher = MicroBatcher(model, batch_size=batch_size, max_wait_ms=max_wait_ms)
    created = int(time.time())
    fingerprint = model_fingerprint(model)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if preload and hasattr(model, "load"):
            # Load weights before the port opens: the first request should not pay for it.
            await asyncio.get_running_loop().run_in_executor(None, model.load)
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "flywheel", "root": model.ref}]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name})

    async def chat_completions(request: Request) -> Response:
        call = parse_chat_call(parse_json_object(await read_body(request, max_body_bytes)))
        if call.model not in aliases:
            raise ApiError(404, f"The model '{call.model}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")
        if model.reads_images is False:
            from flywheel.images import has_images

            if has_images(call.messages):
                raise ApiError(400, f"'{name}' is a text model: it does not read images (serve a vision-language "
                               "model for image parts)", param="messages", code="unsupported_content")

        try:
            check_image_count(call.messages)
        except ImageError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_image") from None
        completions = await batcher.submit(call.requests())
        return chat_response(call, completions, name, fingerprint)

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model_name = name
    return app


async def _sse(payload: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A finished completion as the chunk sequence of a streamed one."""
    base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
            "model": payload["model"], "system_fingerprint": payload["system_fingerprint"]}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    for choice in payload["choices"]:
        index = choice["index"]
        yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        if choice["message"]["content"]:
            yield event([{"index": index, "delta": {"content": choice["message"]["content"]}, "logprobs": None,
                          "finish_reason": None}])
        for position, call in enumerate(choice["message"].get("tool_calls") or []):
            yield event([{"index": index, "delta": {"tool_calls": [{"index": position, **call}]}, "logprobs": None,
                          "finish_reason": None}])
        yield event([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}])
    if include_usage:
        yield event([], usage=payload["usage"])
    yield b"data: [DONE]\n\n"


def serve_model(ref: str, *, options: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 8000,
                name: str | None = None, batch_size: int = 32, max_wait_ms: float = 10.0,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, on_ready=None) -> None:
    """Serve `ref` until interrupted (the `flywheel serve-model` command)."""
    import uvicorn

    model = load_model(ref, options)
    sock = bind_socket(host, port)
    if hasattr(model, "load"):
        model.load()  # here, not in the app's startup, so a ModelError is one clean line
    app = create_app(model, name=name, batch_size=batch_size, max_wait_ms=max_wait_ms,
                     max_body_bytes=max_body_bytes, preload=False)
    server = uvicorn.Server(uvicorn_config(app, log_level="info"))
    if on_ready is not None:
        on_ready(app.state.model_name, f"http://{host}:{sock.getsockname()[1]}/v1")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        model.close()
