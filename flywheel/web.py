"""HTTP plumbing shared by the model server, the capture proxy and the review app.

OpenAI-style JSON errors (`ApiError`, `EXCEPTION_HANDLERS`), a size-limited body reader, sockets
and uvicorn settings, and `BackgroundServer`, which runs any ASGI app in a thread (tests,
benchmarks, the proxy in front of a server in one process).

    with BackgroundServer(app) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="x")
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from flywheel.errors import FlywheelError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


# -- OpenAI-style errors ----------------------------------------------------------------------------
class ApiError(Exception):
    """An error a client gets as `{"error": {...}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             502: "upstream_error", 504: "upstream_error"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; this server has /v1/chat/completions and /v1/models"
        return ApiError(404, message, code="not_found").response()
    if exc.status_code == 405:
        return ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    return ApiError(exc.status_code, str(exc.detail)).response()


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()


EXCEPTION_HANDLERS = {HTTPException: _http_exception, ApiError: _api_error, Exception: _server_error}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes with a 413 before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds this server's limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def size_limited(request: Request, limit: int) -> Request:
    """The request with a body that refuses (413) past `limit` bytes as it streams in, for a parser
    that reads the body itself (a multipart form spooling its files to disk)."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds this server's limit of {limit} bytes",
                       code="request_too_large")
    seen = 0

    async def receive() -> dict[str, Any]:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes", code="request_too_large")
        return message

    return Request(request.scope, receive)


# -- parsing what a client sends: the one door for bodies and parameters ---------------------------
MAX_JSON_DEPTH = 64  # deeper is no request a client means; Python's own limit would be a 500
MAX_INT = 2**53  # the largest integer every JSON reader agrees on; SQLite's limit is 2**63 - 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object (no NaN / Infinity, nested at most `max_depth` deep), or a 400 that
    says what is wrong with it; the size is `read_body`'s limit."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, f"request body is nested deeper than {max_depth} levels", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, NaN, a 5,000-digit integer
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if json_depth(body) > max_depth:
        raise ApiError(400, f"request body is nested deeper than {max_depth} levels", code="invalid_json")
    return body


def json_depth(value: Any) -> int:
    """How deep containers nest in a parsed JSON value (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_count(raw: str | None, param: str, *, low: int, high: int, default: int | None = None) -> int | None:
    """A query parameter that is an integer: ASCII digits only (not '²' or '٣', which `isdigit`
    passes), from `low` to `high`; a 400 naming `param` otherwise. Absent: `default`."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or not low <= int(raw) <= high:
        raise ApiError(400, f"{param} must be an integer from {low} to {high}, got {raw[:40]!r}.", param=param)
    return int(raw)


def parse_cursor(raw: str | None, prefix: str, param: str) -> int | None:
    """The number in an id such as `ftevent-12` (a list's `after`), within what the store holds; a
    400 naming `param` otherwise."""
    if raw is None or raw == "":
        return None
    digits = raw[len(prefix):] if raw.startswith(prefix) else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise ApiError(400, f"{param} must be an id of the form {prefix}N, got {raw[:60]!r}.", param=param)
    return int(digits)


def bounded_int(value: Any, param: str, *, low: int = 0, high: int = MAX_INT) -> int:
    """A body field that must be an integer from `low` to `high` (not a bool, not 1e20); a 400 naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{param} must be an integer from {low} to {high}, got {str(value)[:40]}.", param=param)
    return value


# -- who may talk to the port ----------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """Whether a bind address, client address or Host name is this machine: parsed, so 127.0.0.2,
    `::ffff:127.0.0.1` and `[::1]` count, and `localhost` (which resolves nowhere else)."""
    if not host:
        return False
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def host_of(value: str) -> str:
    """The host part of a Host header or an Origin URL (`[::1]:80` -> `::1`, `http://a:1` -> `a`), lower case."""
    value = value.strip().lower()
    if "://" in value:
        value = value.split("://", 1)[1].split("/", 1)[0]
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostGuard:
    """ASGI middleware: a request whose Host (or, when sent, Origin) names no allowed host is a 400
    (DNS rebinding, cross-site posts). `allowed_hosts` empty: loopback names only; `"*"`: any."""

    def __init__(self, app: Any, allowed_hosts: list[str] | None = None):
        self.app = app
        self.allowed = {host_of(h) for h in allowed_hosts or []}

    def allows(self, host: str) -> bool:
        return "*" in self.allowed or host in self.allowed or (not self.allowed and is_loopback(host))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            # "null" is what a browser sends from our own pages under Referrer-Policy: no-referrer;
            # the pages' form token and the SameSite=Strict session cookie guard those posts
            origin = headers.get(b"origin", b"").decode("latin-1")
            refused = ("Host" if not self.allows(host) else
                       "Origin" if origin and origin != "null" and not self.allows(host_of(origin)) else None)
            if refused:
                # a foreign Host is a bad request (400, as starlette's TrustedHostMiddleware); a foreign
                # Origin, a cross-site request refused (403)
                response = ApiError(400 if refused == "Host" else 403, f"{refused} header names a host this "
                                    "server does not answer for (start it with --allowed-host NAME to allow one).",
                                    code="invalid_host" if refused == "Host" else "invalid_origin").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- running servers ------------------------------------------------------------------------------
def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket; port 0 picks a free port (read it back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and without it
    # every reply on a kept-alive connection waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FlywheelError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # Listening from the start: a client told the address (the ready line) before uvicorn has started
    # queues in the backlog instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, **kwargs: Any):
    import uvicorn

    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=5, **kwargs)


def page_url(host: str, sock: socket.socket, path: str = "/") -> str:
    """The address a bound socket serves, for the ready line (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}{path}"


def serve_forever(app: Any, sock: socket.socket, **config: Any) -> None:
    """Run an ASGI app with uvicorn on an already bound socket until it is stopped; closes the socket."""
    import uvicorn

    try:
        uvicorn.Server(uvicorn_config(app, **config)).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 (a free port by default).

        with BackgroundServer(create_app(model)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any):
        import uvicorn

        self.host = host
        self.socket = bind_socket(host, port)
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, **config))
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FlywheelError(f"server on {self.url} did not start: {self.error or 'timed out'}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
