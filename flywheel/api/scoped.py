"""The store's API objects as one project sees them: another project's object does not exist (404).

Endpoints read and write their objects through these, never `Store.api_get` directly, so no
route can forget the project:

    row = get_owned(store, "api_evals", eval_id, caller(request).project)   # None: 404
    rows, more = list_owned(store, "api_evals", project, after=..., limit=20, order="asc")
"""

from __future__ import annotations

from typing import Any

from flywheel.store import Store


def owned(row: dict[str, Any] | None, project: str) -> dict[str, Any] | None:
    """`row` when it belongs to `project` (rows from before projects belong to 'default'), else None."""
    if row is None or (row.get("project") or "default") != project:
        return None
    return row


def get_owned(store: Store, table: str, object_id: str, project: str) -> dict[str, Any] | None:
    """One API object of `project`, or None (unknown, or another project's)."""
    return owned(store.api_get(table, object_id), project)


def list_owned(store: Store, table: str, project: str, *, after: str | None = None, limit: int = 20,
               order: str = "desc", where: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """A page of `project`'s objects (see `Store.api_list`)."""
    return store.api_list(table, after=after, limit=limit, order=order, where={**(where or {}), "project": project})


def insert_owned(store: Store, table: str, row: dict[str, Any], project: str) -> dict[str, Any]:
    """Insert `row` as an object of `project`; returns the row with its project."""
    row = {**row, "project": project}
    store.api_insert(table, row)
    return row
