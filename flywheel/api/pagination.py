"""The platform's cursor lists: `?after=<id>&limit=<n>&order=asc|desc` in, and out

    {"object": "list", "data": [...], "first_id": ..., "last_id": ..., "has_more": bool}
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from flywheel.api.errors import invalid


def page_args(request: Request, default_order: str = "desc", max_limit: int = 100) -> tuple[str | None, int, str]:
    """`after`, `limit` (1..max_limit, default 20) and `order` of a list request; 400 when malformed."""
    query = request.query_params
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= max_limit:
        raise invalid(f"limit must be an integer from 1 to {max_limit}, got {raw!r}.", "limit")
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise invalid(f"order must be 'asc' or 'desc', got {order!r}.", "order")
    return query.get("after") or None, int(raw), order


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list response over already-shaped objects."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
