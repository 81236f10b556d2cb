"""The platform's cursor lists: `?after=<id>&limit=<n>&order=asc|desc` in, and out

    {"object": "list", "data": [...], "first_id": ..., "last_id": ..., "has_more": bool}
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from flywheel.api.errors import invalid
from flywheel.web import parse_count


def page_args(request: Request, default_order: str = "desc", max_limit: int = 100) -> tuple[str | None, int, str]:
    """`after`, `limit` (1..max_limit, default 20) and `order` of a list request; 400 when malformed."""
    query = request.query_params
    limit = parse_count(query.get("limit"), "limit", low=1, high=max_limit, default=20)
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise invalid(f"order must be 'asc' or 'desc', got {order[:40]!r}.", "order")
    after = query.get("after") or None
    if after is not None and len(after) > 200:
        raise invalid("after must be an object id.", "after")
    return after, limit, order


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list response over already-shaped objects."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
