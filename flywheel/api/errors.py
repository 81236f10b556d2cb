"""The platform's error JSON: `{"error": {"message", "type", "param", "code"}}` with its status.

`flywheel.web.ApiError` carries the shape; these helpers say the platform's usual things.

    raise not_found("eval", "eval_123")     # 404 "No eval found with id 'eval_123'."
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from flywheel.web import EXCEPTION_HANDLERS, ApiError


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """404 for an unknown object id."""
    return ApiError(404, f"No {kind} found with id '{object_id}'.", code="not_found", param=param)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400 invalid_request_error naming the parameter at fault."""
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False,
          param: str | None = None, default: Any = None) -> Any:
    """`body[name]` checked against `kind`; a 400 naming `param` (default: `name`) when it is wrong."""
    param = param or name
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise invalid(f"Invalid type for '{param}': expected {names}, got {type(value).__name__}.", param,
                      "invalid_type")
    return value


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str] | None:
    """The platform's metadata rule: at most 16 string pairs, keys <= 64 chars, values <= 512."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise invalid("metadata must be an object of at most 16 key-value pairs.", param)
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise invalid(f"metadata[{key!r}]: keys are at most 64 characters and values strings of at most 512.",
                          param)
    return value


async def _no_route(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return ApiError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url").response()
    if exc.status_code == 405:
        return ApiError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                        code="method_not_allowed").response()
    return ApiError(exc.status_code, str(exc.detail)).response()


HANDLERS = {**EXCEPTION_HANDLERS, HTTPException: _no_route}
