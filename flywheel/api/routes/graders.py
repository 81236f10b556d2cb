"""`POST /v1/fine_tuning/alpha/graders/validate` and `/run`: the grader library behind the
platform's alpha endpoints (`graders.validate_grader`, `graders.run_grader`); judge graders use
Flywheel models, as `flywheel graders run` does. Grading runs in a thread (a judge may be slow).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import graders
from flywheel.api.access import caller
from flywheel.api.errors import field, invalid
from flywheel.api.model_access import check_run_judges, judge_loader
from flywheel.web import ApiError, parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState


def routes(state: "ApiState") -> list[Route]:
    async def grader_of(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        body = parse_json_object(await read_body(request, state.max_upload_bytes))
        return body, field(body, "grader", dict, required=True)

    async def validate(request: Request) -> Response:
        _, grader = await grader_of(request)
        try:
            return JSONResponse(graders.validate_grader(grader))
        except graders.GraderConfigError as exc:
            raise invalid(f"grader: {exc}", "grader") from None

    async def run(request: Request) -> Response:
        body, grader = await grader_of(request)
        sample = field(body, "model_sample", str, required=True)
        item = field(body, "item", dict, default={})
        who = caller(request)
        if who.role == "reader" and runs_code(grader):
            raise ApiError(403, "You have insufficient permissions for this operation: a python grader runs code "
                           "on the server, which needs the member or admin role (a reader key may run the other "
                           "graders).", code="insufficient_permissions", param="grader")
        check_run_judges(state.store(), grader, who, state.models, param="grader")

        def grade() -> dict[str, Any]:
            return graders.run_grader(grader, sample, item, judge=judge_loader(state.store(), who, state.models))

        try:
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, grade))
        except graders.GraderConfigError as exc:
            raise invalid(f"grader: {exc}", "grader") from None

    base = "/v1/fine_tuning/alpha/graders"
    return [Route(base + "/validate", validate, methods=["POST"]), Route(base + "/run", run, methods=["POST"])]


def runs_code(grader: Any) -> bool:
    """Whether a grader (or one nested in it) is a `python` grader: code run on the server."""
    if isinstance(grader, list):
        return any(runs_code(g) for g in grader)
    if not isinstance(grader, dict):
        return False
    return grader.get("type") == "python" or any(runs_code(v) for v in grader.values() if isinstance(v, (dict, list)))
