"""Who is calling: API keys (stored as sha256 hashes), their project and role, and rate limits.

Every key belongs to a project and has a role:

* `admin`  — everything in its project, including `POST /v1/flywheel/runs` with a server `path`;
* `member` — (the default) create, read, cancel and delete its project's objects;
* `reader` — read only: any other method than GET is a 403 (grader `run` / `validate`, which
  store nothing, are allowed).

Objects (files, evals, runs, jobs) belong to the project of the key that made them, and another
project's object is a 404, as on the platform. A request without a key, from a loopback client
address (parsed: 127.0.0.2 and ::ffff:127.0.0.1 count) on a loopback bind, acts with the
`loopback_role` (`serve --api --loopback-role`, default `admin`: the operator's own machine, as the
CLI; `none`: a key for everything) in the `default` project. Any other request without a valid
bearer key is a 401 (docs/security.md). With a rate limit, each key (or, keyless or with an invalid
key, each client address) gets `rpm` requests per minute (`flywheel.api.limits`), a key's own `rpm`
overriding the server's.

    key, key_id = create_key(store, "ci", project="team-a", role="reader")
"""

from __future__ import annotations

import hashlib
import http.cookies
import json
import re
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from flywheel.api.jobs import new_object_id
from flywheel.api.limits import RateLimiter
from flywheel.errors import FlywheelError
from flywheel.store import Store, now, unix_seconds
from flywheel.web import ApiError, is_loopback

KEY_PREFIX = "fw-"
ROLES = ("admin", "member", "reader")
LOOPBACK_ROLES = (*ROLES, "none")
DEFAULT_PROJECT = "default"
READER_POSTS = ("/v1/fine_tuning/alpha/graders/",)  # stateless: a reader may call them


@dataclass(frozen=True)
class Caller:
    """The project and role a request acts as (`caller(request)` in an endpoint)."""

    project: str = DEFAULT_PROJECT
    role: str = "admin"
    key_id: str | None = None


LOOPBACK_CALLER = Caller()


def caller(request: Request) -> Caller:
    """The caller the access middleware recorded (loopback without a key: the default project's admin)."""
    return request.scope.get("flywheel.caller", LOOPBACK_CALLER)


def require_admin(request: Request, what: str, hint: str = "") -> Caller:
    """The caller when it is an admin; else a 403 saying that `what` needs an admin key (and `hint`:
    what a member may do instead). The routes' one check of the admin role (a reader's writes are
    refused before, by `Access`)."""
    who = caller(request)
    if who.role != "admin":
        raise ApiError(403, f"{what}: it needs an admin key{f' ({hint})' if hint else ''}; "
                       f"this key is a {who.role} of project {who.project!r}.", code="insufficient_permissions",
                       type="invalid_request_error")
    return who


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_PROJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_project(project: str) -> str:
    """A project name as it may enter the store: 1-64 ASCII letters, digits, '-' or '_' (no other
    script's digits, no path parts); FlywheelError otherwise. Every door that takes a project
    name goes through here (keys, importers)."""
    if not isinstance(project, str) or not _PROJECT_NAME.fullmatch(project):
        raise FlywheelError(f"project must be 1-64 ASCII letters, digits, '-' or '_', got {project!r}")
    return project


def create_key(store: Store, name: str = "", *, project: str = DEFAULT_PROJECT, role: str = "member",
               rpm: int | None = None) -> tuple[str, str]:
    """A new API key and its id; only the hash is stored, so the key is shown this once."""
    if role not in ROLES:
        raise FlywheelError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_project(project)
    if rpm is not None and rpm < 1:
        raise FlywheelError(f"rpm must be at least 1, got {rpm}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_object_id("key_")
    store.api_insert("api_keys", {"id": key_id, "created_at": now(), "name": name, "key_hash": hash_key(key),
                                  "prefix": key[:8], "revoked": 0, "project": project, "role": role, "rpm": rpm})
    return key, key_id


def list_keys(store: Store) -> list[dict[str, Any]]:
    """Every key (without hashes), oldest first; `created_at` in unix seconds, as the API reports times."""
    return [{**key, "created_at": unix_seconds(key["created_at"])} for key in store.list_api_keys()]


def revoke_key(store: Store, key_id: str) -> None:
    """Revoke a key by id; a FlywheelError when there is no such key."""
    if not store.revoke_api_key(key_id):
        raise FlywheelError(f"no API key {key_id!r} (see `flywheel keys list`)")


def _error(status: int, message: str, type: str, code: str,
           headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    return status, body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          *headers]


class Access:
    """ASGI middleware for `/v1`: authenticate (401), enforce the role (403), rate-limit (429).

    `require_key`: a valid key is needed whatever the client (any bind off loopback);
    `loopback_role`: what a keyless loopback client may do otherwise ("none": nothing); `limiter`:
    the server's rate limit (None: none, though a key made with its own `rpm` is still held to it)."""

    def __init__(self, app: Any, store: Callable[[], Store], require_key: bool = False,
                 limiter: RateLimiter | None = None, loopback_role: str = "admin"):
        if loopback_role not in LOOPBACK_ROLES:
            raise FlywheelError(f"loopback role must be one of {', '.join(LOOPBACK_ROLES)}, got {loopback_role!r}")
        self.app = app
        self.store = store
        self.require_key = require_key
        self.loopback = None if loopback_role == "none" else Caller(DEFAULT_PROJECT, loopback_role)
        self.limiter = limiter or RateLimiter(None)  # without a server limit, keys' own `rpm` still apply
        self.sessions: dict[str, str] = {}  # page session id -> key hash (a restart logs everyone out)

    def identify(self, scope: dict[str, Any], cookie: bool = False) -> tuple[Caller | None, dict[str, Any] | None, str]:
        """(caller or None for a 401, the key row, the presented key); `cookie`: a page session counts
        (pages only: `/v1` takes bearer keys, so no browser can be made to call it with a session)."""
        auth = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        key_hash = hash_key(key) if key else self.sessions.get(_cookie(scope, SESSION_COOKIE) or "") if cookie else None
        row = self.store().api_key_by_hash(key_hash) if key_hash else None
        if row is not None:
            return Caller(row.get("project") or DEFAULT_PROJECT, row.get("role") or "member", row["id"]), row, key
        client = (scope.get("client") or ("", 0))[0]
        if self.require_key or not is_loopback(client):  # an SDK's placeholder key is no key on loopback
            return None, None, key
        return self.loopback, None, key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not scope["path"].startswith("/v1"):
            await self.pages(scope, receive, send)
            return
        who, row, key = self.identify(scope)
        refusal = None
        limit_headers: list[tuple[bytes, bytes]] = []
        client = (scope.get("client") or ("local", 0))[0]
        if who is None:
            # an invalid key spends its client address's allowance: guessing keys is rate-limited too
            decision = self.limiter.take(f"addr:{client}", None)
            if decision is not None and not decision.allowed:
                refusal = _error(429, f"Rate limit reached for requests per min (RPM) on client {client}: Limit "
                                 f"{decision.limit}, Remaining 0. Please try again in {decision.retry_after_s:.3g}s.",
                                 "requests", "rate_limit_exceeded", decision.headers())
            else:
                message = ("You didn't provide an API key. Send 'Authorization: Bearer <key>' (create one with "
                           "`flywheel keys create`)." if not key else "Incorrect API key provided.")
                refusal = _error(401, message, "invalid_request_error", "invalid_api_key")
        elif who.role == "reader" and scope["method"] not in ("GET", "HEAD") \
                and not scope["path"].startswith(READER_POSTS):
            refusal = _error(403, f"You have insufficient permissions for this operation: key {who.key_id} is a "
                             f"reader of project {who.project!r} ({scope['method']} {scope['path']} needs the "
                             "member or admin role).", "invalid_request_error", "insufficient_permissions")
        else:
            decision = self.limiter.take(who.key_id or f"addr:{client}", (row or {}).get("rpm"))
            limit_headers = decision.headers() if decision is not None else []
            if decision is not None and not decision.allowed:
                whom = f"key {who.key_id}" if who.key_id else f"client {client}"
                refusal = _error(429, f"Rate limit reached for requests per min (RPM) on {whom} in project "
                                 f"{who.project!r}: Limit {decision.limit}, Remaining 0. Please try again in "
                                 f"{decision.retry_after_s:.3g}s.", "requests", "rate_limit_exceeded",
                                 limit_headers)
        if refusal is not None:
            status, body, headers = refusal
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope["flywheel.caller"] = who
        if not limit_headers:
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *limit_headers]}
            await send(message)

        await self.app(scope, receive, send_with_limits)

    # -- the pages on the same port (the review app): the same keys, projects and roles ---------------
    async def pages(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Guard a page request: `/login` takes a key and sets an HttpOnly, SameSite=Strict session
        cookie; every other page needs that cookie, a bearer key or a keyless loopback role, and
        shows the caller's project only (`flywheel.project` in the scope)."""
        if scope["path"] == "/login":
            await self.login(scope, receive, send)
            return
        if scope["path"] == "/logout" and scope["method"] == "POST":
            self.sessions.pop(_cookie(scope, SESSION_COOKIE) or "", None)
            await _page(send, 303, "", [(b"location", b"/login"), (b"set-cookie", _session_cookie("", 0))])
            return
        who, _, _ = self.identify(scope, cookie=True)
        if who is None:
            if scope["method"] in ("GET", "HEAD"):
                await _page(send, 303, "", [(b"location", b"/login")])
            else:
                await _page(send, 401, _LOGIN_FORM.format(message="Log in with an API key first."))
            return
        scope["flywheel.caller"] = who
        scope["flywheel.project"] = who.project
        scope["flywheel.role"] = who.role
        await self.app(scope, receive, send)

    async def login(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            await _page(send, 200, _LOGIN_FORM.format(message=""))
            return
        body, more = b"", True
        while more and len(body) <= 4096:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        key = urllib.parse.parse_qs(body[:4096].decode("latin-1")).get("key", [""])[0].strip()
        row = self.store().api_key_by_hash(hash_key(key)) if key else None
        if row is None:
            client = (scope.get("client") or ("local", 0))[0]
            decision = self.limiter.take(f"addr:{client}", None)
            status = 429 if decision is not None and not decision.allowed else 401
            await _page(send, status, _LOGIN_FORM.format(
                message="Too many attempts: wait a minute." if status == 429 else "Incorrect API key."))
            return
        session = secrets.token_urlsafe(32)
        self.sessions[session] = hash_key(key)
        await _page(send, 303, "", [(b"location", b"/"), (b"set-cookie", _session_cookie(session, 12 * 3600))])


SESSION_COOKIE = "flywheel_session"
_LOGIN_FORM = ("<!doctype html><meta charset=utf-8><title>Flywheel: log in</title><h1>Log in</h1><p>{message}</p>"
               "<form method=post action=/login><label>API key <input name=key type=password "
               "autocomplete=off></label> <button>Log in</button></form>")


def _cookie(scope: dict[str, Any], name: str) -> str | None:
    for header, value in scope["headers"]:
        if header == b"cookie":
            jar = http.cookies.SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except http.cookies.CookieError:
                return None
            if name in jar:
                return jar[name].value
    return None


def _session_cookie(value: str, max_age: int) -> bytes:
    return f"{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}".encode()


async def _page(send: Any, status: int, html: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = html.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"content-security-policy", b"default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
        (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": body})
