"""`flywheel proxy`: an OpenAI-compatible recording proxy — the local `store: true`.

    flywheel proxy --upstream https://api.openai.com/v1 --port 8080 --db flywheel.db
    # the app changes only its base URL:
    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1")
    client.chat.completions.create(model="gpt-4o", messages=[...], metadata={"usecase": "triage"})

Every `POST /v1/chat/completions` is forwarded to the upstream unchanged (headers, the app's own
`Authorization`, body bytes) and answered with the upstream's reply unchanged, streamed replies
included. Each call lands in the store's `captures` table: request, response (a streamed one
re-assembled into a chat.completion object), status, latency, usage, the request's `metadata`,
and the error when there is one. Other `/v1/...` routes (`/v1/models`, embeddings, ...) are passed
through without recording.

Failures are answered in the platform's error shape and recorded too: upstream unreachable ->
502, no answer within `--timeout` -> 504, an upstream error status -> relayed as is, a body that
is not a JSON object -> 400, a body over `--max-body-mb` -> 413, more than `max_concurrency` calls
in flight or more than `max_buffered_mb` of request bodies held at once -> 429 (so a burst of large
bodies cannot grow the process without bound), a client that hangs up before its reply is
complete -> recorded with status 499 and a `client_disconnected` error. Request bodies may be in
any encoding JSON allows (UTF-8, UTF-16 or UTF-32, with or without a BOM).

Captures are written by one writer thread with its own SQLite connection; a non-streamed reply is
sent after its capture is committed, and a streamed one's closing `data: [DONE]` too, so what a
client has seen is in the store.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from flywheel.errors import FlywheelError
from flywheel.store import Store, now
from flywheel.web import DEFAULT_MAX_BODY_BYTES, EXCEPTION_HANDLERS, ApiError, bind_socket, read_body, uvicorn_config

CHAT_PATH = "/v1/chat/completions"
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes.
DROP_REQUEST_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                        "trailer", "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding"}
DROP_RESPONSE_HEADERS = {"content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding",
                         "date", "server"}
MAX_STORED_BODY = 1024 * 1024  # a malformed body is kept only up to this many characters
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the reply"


def _describe(exc: BaseException) -> str:
    """An exception as text that is never empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _once(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    """`fn(*args)` callable any number of times, run only the first."""
    done = []

    def call() -> None:
        if not done:
            done.append(True)
            fn(*args)
    return call


def decode_json_text(raw: bytes) -> str:
    """The body as text in the encoding JSON allows (RFC 8259 / json.loads: UTF-8, -16, -32, BOM or not)."""
    return raw.decode(json.detect_encoding(raw), "surrogatepass")


class BodyBudget:
    """Counts calls in flight and request-body bytes held in memory; past either cap, 429."""

    def __init__(self, max_concurrency: int, max_bytes: int):
        self.max_concurrency = max_concurrency
        self.max_bytes = max_bytes
        self.calls = 0
        self.bytes = 0

    def admit(self) -> str | None:
        """Take a call slot; the refusal reason when none is free."""
        if self.calls >= self.max_concurrency:
            return f"the proxy already has {self.calls} calls in flight (its limit is {self.max_concurrency})"
        self.calls += 1
        return None

    def reserve(self, size: int) -> str | None:
        if self.bytes + size > self.max_bytes:
            return (f"the proxy holds {self.bytes} bytes of request bodies; {size} more would pass its "
                    f"limit of {self.max_bytes}")
        self.bytes += size
        return None

    def release(self, size: int) -> None:
        self.calls -= 1
        self.bytes -= size


async def read_body_within(request: Request, limit: int, budget: BodyBudget) -> tuple[bytes, int]:
    """The request body, refusing more than `limit` bytes (413) or more than the budget allows (429).

    Returns the body and how many bytes it reserved from the budget (release them when done)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds this server's limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            if size + len(chunk) > limit:
                raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes",
                               code="request_too_large")
            refused = budget.reserve(len(chunk))
            if refused:
                raise ApiError(429, f"too many large requests at once: {refused}; retry shortly",
                               code="proxy_overloaded")
            size += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.bytes -= size
        raise
    return b"".join(chunks), size


def normalise_upstream(url: str) -> str:
    """The upstream base URL, ending in its API root (`/v1` when the URL has no path)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FlywheelError(f"--upstream {url!r}: expected an http(s) URL such as https://api.openai.com/v1")
    url = url.rstrip("/")
    return url if parts.path.strip("/") else url + "/v1"


class CaptureWriter:
    """Writes capture rows from one thread with its own store connection, in small batches."""

    def __init__(self, db_path: str, transform: Any = None):
        self.db_path = db_path
        self.transform = transform  # row -> row as stored (e.g. PII redaction), run in this thread
        self._queue: queue.Queue[tuple[dict[str, Any], Future] | None] = queue.Queue()
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.result()  # re-raises a StoreError from opening the database

    def submit(self, row: dict[str, Any]) -> Future:
        future: Future = Future()
        self._queue.put((row, future))
        return future

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            store = Store.open(self.db_path)
        except Exception as exc:  # noqa: BLE001 - handed to start()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                while item is not None:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                jobs = [job for job in batch if job is not None]
                if jobs:
                    try:
                        rows = [row for row, _ in jobs]
                        ids = store.insert_captures([self.transform(r) for r in rows] if self.transform else rows)
                    except Exception as exc:  # noqa: BLE001 - reported to each waiting request
                        for _, future in jobs:
                            _settle(future, exception=exc)
                    else:
                        for (_, future), capture_id in zip(jobs, ids):
                            _settle(future, result=capture_id)
                if None in batch:
                    return
        finally:
            store.close()


def _settle(future: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Resolve a writer future; one its request gave up on (cancelled) must not stop the writer."""
    if future.set_running_or_notify_cancel():
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def _usage_fields(usage: Any) -> dict[str, Any]:
    if not isinstance(usage, dict):
        return {}
    return {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            if isinstance(usage.get(k), int)}


def _error_text(status: int, payload: Any, raw: bytes) -> str:
    """What went wrong, from an upstream error reply; never empty."""
    detail = ""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        detail = str(error.get("message") or error.get("code") or error.get("type") or "").strip()
    elif isinstance(payload, dict) and isinstance(payload.get("error"), str):
        detail = payload["error"].strip()
    elif payload is None:
        detail = raw[:500].decode("utf-8", "replace").strip()
    if not detail:
        detail = "the upstream sent no error message" if raw.strip() else "the upstream sent an empty body"
    return f"HTTP {status}: {detail}"


class StreamAssembler:
    """Re-assembles a streamed chat completion (SSE chunks) into one chat.completion object."""

    def __init__(self) -> None:
        self.buffer = b""
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.error: Any = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            self.error = event["error"]
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in event:
                self.meta.setdefault(key, event[key])
        if event.get("usage"):
            self.usage = event["usage"]
        for delta_choice in event.get("choices") or []:
            index = delta_choice.get("index", 0)
            choice = self.choices.setdefault(index, {"index": index, "message": {"role": "assistant", "content": ""},
                                                     "finish_reason": None})
            delta = delta_choice.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if delta.get("content"):
                message["content"] += delta["content"]
            if delta.get("refusal"):
                message["refusal"] = message.get("refusal", "") + delta["refusal"]
            for call in delta.get("tool_calls") or []:
                calls = message.setdefault("tool_calls", [])
                position = call.get("index", len(calls))
                while len(calls) <= position:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                target = calls[position]
                if call.get("id"):
                    target["id"] = call["id"]
                function = call.get("function") or {}
                target["function"]["name"] += function.get("name") or ""
                target["function"]["arguments"] += function.get("arguments") or ""
            if delta_choice.get("finish_reason"):
                choice["finish_reason"] = delta_choice["finish_reason"]

    def result(self) -> dict[str, Any]:
        return {**self.meta, "object": "chat.completion",
                "choices": [self.choices[i] for i in sorted(self.choices)], "usage": self.usage}


METADATA_KEY = re.compile(r'"metadata"\s*:\s*(?=\{)')
METADATA_WINDOW = 16384  # the platform's metadata (16 pairs, 64-char keys, 512-char values) fits


def salvage_metadata(text: str) -> dict[str, Any] | None:
    """The `metadata` object of a body that is not valid JSON as a whole (truncated, a stray comma,
    a list around it): the first `"metadata": {...}` that parses on its own, if any. A malformed
    call's capture row keeps it, so `flywheel privacy delete --metadata` finds that row too."""
    decoder = json.JSONDecoder()
    for _, match in zip(range(4), METADATA_KEY.finditer(text)):  # bounded work on hostile bodies
        try:
            value, _ = decoder.raw_decode(text[match.end():match.end() + METADATA_WINDOW])
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and value:
            return value
    return None


def create_proxy_app(upstream: str, db_path: str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                     max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES, privacy: Any = None,
                     observer: Callable[[dict[str, Any], int], None] | None = None) -> Starlette:
    """The recording proxy as an ASGI app. `app.state.writer` is the capture writer. `privacy`: a
    `flywheel.privacy.policy.ProxyPrivacy` (redaction, output PII screening, retention). `observer`
    is told (row, capture id) after each capture commits, on the event loop: it must not block
    (the service's shadow worker queues the row)."""
    import httpx2

    upstream = normalise_upstream(upstream)
    writer = CaptureWriter(db_path, transform=privacy.transform_row if privacy else None)
    state: dict[str, Any] = {}
    budget = BodyBudget(max_concurrency, max(max_buffered_bytes, 1))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        writer.start()
        state["client"] = httpx2.AsyncClient(
            timeout=httpx2.Timeout(timeout, connect=min(connect_timeout, timeout)),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False)
        retention = None
        if privacy is not None and privacy.retention_days is not None:
            from flywheel.privacy.retention import purge_periodically

            retention = asyncio.create_task(purge_periodically(db_path, privacy))
        try:
            yield
        finally:
            if retention is not None:
                retention.cancel()
            await state["client"].aclose()
            writer.close()

    def upstream_url(request: Request) -> str:
        path = request.url.path[len("/v1"):]
        query = request.url.query
        return upstream + path + (f"?{query}" if query else "")

    def forward_headers(request: Request) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST_HEADERS]
        # The proxy reads usage out of the reply, so ask for it uncompressed.
        return headers + [("accept-encoding", "identity")]

    def reply_headers(response: Any) -> dict[str, str]:
        return {k: v for k, v in response.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}

    def upstream_failure(exc: Exception, timed_out: str, broken: str) -> ApiError:
        """A 504 for an upstream timeout, a 502 for any other transport failure."""
        if isinstance(exc, httpx2.TimeoutException):
            return ApiError(504, f"upstream {upstream} {timed_out} within {timeout:g} s", code="upstream_timeout")
        return ApiError(502, f"upstream {upstream} {broken}: {_describe(exc)}", code="upstream_unreachable")

    async def record(row: dict[str, Any]) -> None:
        # Shielded: a client that hangs up does not un-record its call.
        capture_id = await asyncio.shield(asyncio.wrap_future(writer.submit(row)))
        if observer is not None:
            observer(row, capture_id)

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        row: dict[str, Any] = {"created_at": now(), "endpoint": CHAT_PATH, "upstream": upstream}

        async def fail(error: ApiError, **extra: Any) -> Response:
            row.update(status=error.status, error=f"{error.code or error.type}: {error.message}",
                       latency_s=time.perf_counter() - started, **extra)
            await record(row)
            return error.response()

        declared = request.headers.get("content-length")
        refused = budget.admit()
        if refused:
            return await fail(ApiError(429, f"too many calls at once: {refused}; retry shortly",
                                       code="proxy_overloaded"),
                              request_bytes=int(declared) if declared and declared.isdigit() else None)
        held = {"bytes": 0, "handed_over": False}
        try:
            return await handle(request, row, started, fail, held)
        finally:
            if not held["handed_over"]:  # a streamed reply releases its slot when the stream ends
                budget.release(held["bytes"])

    async def handle(request: Request, row: dict[str, Any], started: float, fail: Any,
                     held: dict[str, Any]) -> Response:
        try:
            raw, held["bytes"] = await read_body_within(request, max_body_bytes, budget)
        except ApiError as error:
            declared = request.headers.get("content-length")
            return await fail(error, request_bytes=int(declared) if declared and declared.isdigit() else None)
        row["request_bytes"] = len(raw)
        try:
            body = json.loads(raw)  # bytes: UTF-8, UTF-16 or UTF-32, BOM or not, as RFC 8259 allows
            if not isinstance(body, dict):
                raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
            text = decode_json_text(raw)
            text.encode("utf-8")  # a lone surrogate (from UTF-16 bytes) cannot be stored as text
        except (UnicodeError, ValueError) as exc:
            kept = raw[:MAX_STORED_BODY].decode("utf-8", "replace")
            metadata = salvage_metadata(kept)  # so a deletion by metadata finds this row too
            return await fail(ApiError(400, f"request body is not a JSON object: {exc}", code="invalid_json"),
                              request_json=json.dumps({"raw": kept}),
                              metadata_json=json.dumps(metadata, ensure_ascii=False) if metadata else None)
        row["request_json"] = text
        row["model"] = body.get("model") if isinstance(body.get("model"), str) else None
        metadata = body.get("metadata")
        row["metadata_json"] = json.dumps(metadata, ensure_ascii=False) if isinstance(metadata, dict) else None
        row["stream"] = body.get("stream") is True

        client = state["client"]
        outgoing = client.build_request("POST", upstream_url(request), content=raw, headers=forward_headers(request))
        try:
            response = await client.send(outgoing, stream=True)
        except httpx2.HTTPError as exc:
            return await fail(upstream_failure(exc, "did not answer", "is unreachable"))
        row["status"] = response.status_code
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        screening = privacy is not None and privacy.block_output_pii is not None and response.status_code == 200
        if row["stream"] and response.status_code == 200 and is_sse and not screening:
            held["handed_over"] = True
            release = _once(budget.release, held["bytes"])
            stream = relay(response, row, started, release)
            weakref.finalize(stream, release)  # a stream never started (client gone at once) frees its slot too
            return StreamingResponse(stream, status_code=200, headers=reply_headers(response))
        try:
            content = await response.aread()
        except httpx2.HTTPError as exc:
            return await fail(upstream_failure(exc, "stopped answering", "broke off its reply"))
        finally:
            await response.aclose()
        row["latency_s"] = time.perf_counter() - started
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        row["response_json"] = content.decode("utf-8", "replace") if payload is not None \
            else json.dumps({"raw": content[:MAX_STORED_BODY].decode("utf-8", "replace")})
        if screening and is_sse:  # a screened stream is read whole, then checked like a reply
            assembler = StreamAssembler()
            assembler.feed(content + b"\n")
            payload = assembler.result()
            row["response_json"] = json.dumps(payload, ensure_ascii=False)
        if isinstance(payload, dict):
            row.update(_usage_fields(payload.get("usage")))
            row["response_id"] = payload.get("id") if isinstance(payload.get("id"), str) else None
        if response.status_code >= 400 or payload is None:
            row["error"] = _error_text(response.status_code, payload, content)
        if screening and payload is not None:
            # a short reply is screened inline (< 1 ms); a thread hop costs more than that on a busy machine
            screened = privacy.screen(body, payload) if len(content) < 32768 else \
                await asyncio.to_thread(privacy.screen, body, payload)
            if screened.blocked:
                row["response_json"] = json.dumps(screened.payload, ensure_ascii=False)
                if privacy.block_output_pii == "reject":
                    return await fail(ApiError(422, screened.message(), code="output_pii_blocked"))
                content = privacy.stream_of(screened.payload) if is_sse else row["response_json"].encode("utf-8")
                row["error"] = None
        if await request.is_disconnected():
            # The client hung up while the upstream worked: it never got this reply.
            row["error"] = (f"client_disconnected: the client hung up before the reply (upstream status "
                            f"{response.status_code})")
            row["status"] = CLIENT_CLOSED
        await record(row)
        return Response(content, status_code=response.status_code, headers=reply_headers(response))

    async def relay(response: Any, row: dict[str, Any], started: float,
                    release: Callable[[], None]) -> AsyncIterator[bytes]:
        assembler = StreamAssembler()
        held: list[bytes] = []
        finished = False
        try:
            async for chunk in response.aiter_raw():
                assembler.feed(chunk)
                if assembler.done:
                    held.append(chunk)  # `data: [DONE]` goes out once the capture is committed
                else:
                    yield chunk
            finished = True
        except httpx2.TimeoutException:
            row.update(status=504, error=f"upstream_timeout: stream stalled for {timeout:g} s")
        except httpx2.HTTPError as exc:
            row.update(status=502, error=f"upstream_unreachable: stream broke off: {_describe(exc)}")
        except (asyncio.CancelledError, GeneratorExit):
            # Starlette stops the stream when the client goes away mid-reply.
            row.update(status=CLIENT_CLOSED, error="client_disconnected: the client hung up during the stream")
            raise
        finally:
            release()
            if not finished and not row.get("error"):
                row.update(status=502, error="proxy_error: the stream was cut off")
            assembled = assembler.result()
            row["latency_s"] = time.perf_counter() - started
            row["response_json"] = json.dumps(assembled, ensure_ascii=False)
            row.update(_usage_fields(assembled.get("usage")))
            row["response_id"] = assembled.get("id")
            if assembler.error is not None and not row.get("error"):
                row["error"] = f"stream error: {str(assembler.error).strip() or 'the upstream sent an empty error'}"
            elif finished and not assembler.done and not row.get("error"):
                row["error"] = "stream ended without [DONE]"
            future = writer.submit(row)  # before any await: a cancelled stream must still be recorded
            try:
                await asyncio.shield(response.aclose())
            except BaseException:  # noqa: BLE001 - cancelled while closing; the row is already queued
                pass
        if finished:
            # A client that has read [DONE] finds its call stored.
            capture_id = await asyncio.shield(asyncio.wrap_future(future))
            if observer is not None:
                observer(row, capture_id)
        for chunk in held:
            yield chunk

    async def passthrough(request: Request) -> Response:
        client = state["client"]
        try:
            body = await read_body(request, max_body_bytes)
            response = await client.request(request.method, upstream_url(request), content=body,
                                            headers=forward_headers(request))
        except httpx2.TimeoutException:
            return ApiError(504, f"upstream {upstream} did not answer within {timeout:g} s",
                            code="upstream_timeout").response()
        except httpx2.HTTPError as exc:
            return ApiError(502, f"upstream {upstream} is unreachable: {_describe(exc)}",
                            code="upstream_unreachable").response()
        return Response(response.content, status_code=response.status_code, headers=reply_headers(response))

    app = Starlette(
        routes=[Route(CHAT_PATH, chat_completions, methods=["POST"]),
                Route("/v1/{path:path}", passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])],
        exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.writer = writer
    app.state.upstream = upstream
    return app


def run_proxy(upstream: str, *, db_path: str, host: str = "127.0.0.1", port: int = 8080, timeout: float = 600.0,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
              max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES, on_ready=None, privacy: Any = None) -> None:
    """Run the proxy until interrupted (the `flywheel proxy` command)."""
    import uvicorn

    normalise_upstream(upstream)  # a bad --upstream or --db fails here, as one clean line
    Store.open(db_path).close()
    app = create_proxy_app(upstream, db_path, timeout=timeout, max_body_bytes=max_body_bytes,
                           max_concurrency=max_concurrency, max_buffered_bytes=max_buffered_bytes, privacy=privacy)
    sock = bind_socket(host, port)
    if on_ready is not None:
        on_ready(app.state.upstream, f"http://{host}:{sock.getsockname()[1]}/v1")
    try:
        # No access log: the captures table is the log, and each line costs the client latency.
        uvicorn.Server(uvicorn_config(app, log_level="info", access_log=False)).run(sockets=[sock])
    finally:
        sock.close()
