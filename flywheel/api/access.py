"""API keys: created once (`flywheel keys create` prints the key), stored as sha256 hashes.

On a loopback bind the API needs no key. On any other bind `require_key=True`: every `/v1`
request must carry `Authorization: Bearer <key>` naming a stored, unrevoked key, else a 401 in
the platform's error JSON.

    key, key_id = create_key(store, "ci")
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, Callable

from flywheel.api.jobs import new_object_id, unix_now
from flywheel.store import Store

KEY_PREFIX = "fw-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, name: str = "") -> tuple[str, str]:
    """A new API key and its id; only the hash is stored, so the key is shown this once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_object_id("key_")
    store.api_insert("api_keys", {"id": key_id, "created_at": unix_now(), "name": name, "key_hash": hash_key(key),
                                  "prefix": key[:8], "revoked": 0})
    return key, key_id


class KeyCheck:
    """ASGI middleware: a 401 for `/v1` requests without a valid bearer key."""

    def __init__(self, app: Any, store: Callable[[], Store]):
        self.app = app
        self.store = store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not key or self.store().api_key_by_hash(hash_key(key)) is None:
                message = ("You didn't provide an API key. Send 'Authorization: Bearer <key>' (create one with "
                           "`flywheel keys create`)." if not key else "Incorrect API key provided.")
                body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
