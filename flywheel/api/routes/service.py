"""`/v1/service/laps`: the running service's laps over HTTP (`flywheel serve --flywheel`) — an
extension the platform never had. Admin keys only: the service trains on every project's traffic.

    POST /v1/service/laps {"reason": "new phrasings since Monday"}   # body optional
        201 {"object": "service.lap", "id": "lap-...", "trigger": "api", "status": "queued", ...}
        409 {"error": {"message": "no lap queued: ...", "code": "no_lap_queued"}}
    GET  /v1/service/laps?limit=20                                  # newest first

The API has these routes only when the service gives it `start_lap` (flywheel.service.run binds
`flywheel.service.laps.queue_lap` to its spec and wakes its queue); a plain `serve --api` answers 404.
The api layer sits below flywheel.service, so it takes the service's one door as that callable
rather than importing it. A lap over its budget is recorded `skipped` (201, with the reason), as
`flywheel service lap` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.api.access import require_admin
from flywheel.api.errors import field, invalid
from flywheel.api.pagination import page
from flywheel.store import Store, unix_seconds
from flywheel.store.service import ServiceLap
from flywheel.web import ApiError, parse_count, parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState

LapStarter = Callable[[Store, str], "ServiceLap | None"]
"""`start_lap(store, trigger)`: queue a lap over the new captures; None when none was queued."""

TRIGGER = "api"
NO_LAP_QUEUED = "no lap queued: no new captures, or a lap is already queued or running"
LAP_FIELDS = ("reason",)
MAX_REASON_CHARS = 500
WHAT = "The service's laps train on every project's traffic"


def lap_object(lap: ServiceLap) -> dict[str, Any]:
    """A lap as the API shows it: its fields, times in unix seconds."""
    return {"object": "service.lap", **asdict(lap), "created_at": unix_seconds(lap.created_at),
            "finished_at": unix_seconds(lap.finished_at)}


def routes(state: "ApiState", start_lap: LapStarter | None) -> list[Route]:
    """The routes, or none when this API does not belong to a running service."""
    if start_lap is None:
        return []

    async def create(request: Request) -> Response:
        who = require_admin(request, WHAT)
        raw = await read_body(request, state.max_upload_bytes)
        body = parse_json_object(raw) if raw.strip() else {}
        for name in body:
            if name not in LAP_FIELDS:
                raise invalid(f"Unrecognized request argument supplied: {name[:60]} (known: "
                              f"{', '.join(LAP_FIELDS)}).", name[:60], "unknown_parameter")
        reason = field(body, "reason", str)
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise invalid(f"reason: at most {MAX_REASON_CHARS} characters, got {len(reason)}.", "reason")
        store = state.store()
        lap = start_lap(store, TRIGGER)
        if lap is None:
            raise ApiError(409, NO_LAP_QUEUED, code="no_lap_queued", type="invalid_request_error")
        # the lap's events are its job's (flywheel.api.jobs.JobContext.event): who asked, and why, first
        store.add_api_event(lap.id, f"requested through the API by {who.key_id or 'a loopback client'}"
                            + (f": {reason}" if reason else ""), type="service.lap.requested",
                            data={"key_id": who.key_id, "reason": reason})
        return JSONResponse(lap_object(lap), status_code=201)

    async def list_laps(request: Request) -> Response:
        require_admin(request, WHAT)
        limit = parse_count(request.query_params.get("limit"), "limit", low=1, high=100, default=20)
        laps = state.store().service_laps(limit=limit + 1)
        return JSONResponse(page([lap_object(lap) for lap in laps[:limit]], len(laps) > limit))

    return [Route("/v1/service/laps", create, methods=["POST"]),
            Route("/v1/service/laps", list_laps, methods=["GET"])]
