"""`/v1/flywheel/runs`: the wheel (`flywheel run`) over HTTP — an extension the platform never had.

Submit a run spec with its eval spec and items (or the path of a run spec on the server), then
follow it: status, events (every `flywheel.events.WheelEvent`: the lines the wheel logs and each stage's
start and end as they come, items evaluated and training steps with their loss throttled; each event's
`type` is `wheel.<kind>` and its `data` the event), cancel. The run executes in the job queue
as `flywheel run` would, so its iterations, samples and report are in the same store; a run killed
with the server resumes (`run_wheel(resume=...)`: finished stages are read back). Cancel takes
effect at the wheel's next logged step (a stage boundary or an evaluation).

    POST /v1/flywheel/runs {"run_spec": {"stages": [...], "target": 0.8},
                            "eval_spec": {...}, "file_id": "file-..."}      # items: {"item": ...} lines
    POST /v1/flywheel/runs {"path": "evals/banking77/run.yaml"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.api.access import caller, require_admin
from flywheel.api.errors import check_metadata, field, invalid, not_found
from flywheel.api.jobs import new_object_id
from flywheel.api.pagination import page, page_args
from flywheel.api.routes.files import read_rows
from flywheel.api.scoped import get_owned, insert_owned, list_owned
from flywheel.errors import FlywheelError
from flywheel.run_spec import load_run_spec
from flywheel.spec import load_eval_spec
from flywheel.store import now, unix_seconds
from flywheel.web import parse_cursor, parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState



def wheel_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "flywheel.run", "id": row["id"], "created_at": unix_seconds(row["created_at"]), "status": row["status"],
            "run_id": row["run_id"], "spec_path": row["spec_path"],
            "result": json.loads(row["result_json"]) if row["result_json"] else None,
            "error": json.loads(row["error_json"]) if row["error_json"] else None,
            "metadata": json.loads(row["metadata_json"] or "{}")}


def write_specs(folder: Path, body: dict[str, Any], items: list[dict[str, Any]]) -> Path:
    """eval.yaml, data.jsonl and run.yaml of an inline submission; the run spec's path."""
    run_spec = dict(field(body, "run_spec", dict, required=True))
    eval_spec = dict(field(body, "eval_spec", dict, required=True))
    dataset = eval_spec.get("dataset")
    if isinstance(dataset, dict) and dataset.get("images") is not None:
        # widening image access (server folders, network fetches) is for spec files an operator
        # runs, not for a key holder: submitted items carry their images as data: URLs
        raise invalid("eval_spec.dataset.images: not accepted in a submitted spec; give images as data: URLs",
                      "eval_spec.dataset.images")
    eval_spec["dataset"] = {**(dataset or {}), "path": "data.jsonl"}
    run_spec["eval"] = "eval.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                       encoding="utf-8")
    (folder / "eval.yaml").write_text(yaml.safe_dump(eval_spec, sort_keys=False), encoding="utf-8")
    (folder / "run.yaml").write_text(yaml.safe_dump(run_spec, sort_keys=False), encoding="utf-8")
    return folder / "run.yaml"


def check_specs(path: Path) -> None:
    """Load the run spec and its eval spec; a 400 with their `file: field: message` lines."""
    try:
        load_eval_spec(load_run_spec(path).eval_path)
    except FlywheelError as exc:
        raise invalid(str(exc), "run_spec") from None


def routes(state: "ApiState") -> list[Route]:
    def get_row(request: Request) -> dict[str, Any]:
        row = get_owned(state.store(), "api_wheel_runs", request.path_params["run_id"], caller(request).project)
        if row is None:
            raise not_found("flywheel run", request.path_params["run_id"], "run_id")
        return row

    async def create(request: Request) -> Response:
        body = parse_json_object(await read_body(request, state.max_upload_bytes))
        store = state.store()
        run_id = new_object_id("fwrun_")
        if body.get("path") is not None:
            require_admin(request, "The path form reads a file on the server",
                          "send run_spec, eval_spec and file_id instead")
            path = Path(field(body, "path", str)).resolve()
            if not path.is_file():
                raise invalid(f"path: no run spec at {path} on the server.", "path")
        else:
            rows = read_rows(state, field(body, "file_id", str, required=True), "file_id", caller(request).project)
            if not all(isinstance(r.get("item"), dict) for r in rows):
                raise invalid("file_id: the items file must hold {\"item\": {...}} lines (purpose evals).", "file_id")
            from flywheel.api.model_access import check_spec

            # every model the specs name goes through the server's registry (docs/security.md)
            who = caller(request)
            body = {**body, "eval_spec": check_spec(store, field(body, "eval_spec", dict, required=True), who,
                                                    state.models, param="eval_spec"),
                    "run_spec": check_spec(store, field(body, "run_spec", dict, required=True), who, state.models,
                                           param="run_spec")}
            path = write_specs(store.artefact_dir / "api" / "wheel" / run_id, body, [r["item"] for r in rows])
        check_specs(path)
        row = {"id": run_id, "created_at": now(), "status": "queued", "spec_path": str(path),
               "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {})}
        insert_owned(store, "api_wheel_runs", row, caller(request).project)
        store.enqueue_job(new_object_id("job_"), "wheel_run", run_id)
        state.notify()
        return JSONResponse(wheel_object({**row, "run_id": None, "result_json": None, "error_json": None}))

    async def list_runs(request: Request) -> Response:
        after, limit, order = page_args(request)
        rows, more = list_owned(state.store(), "api_wheel_runs", caller(request).project, after=after, limit=limit,
                                order=order)
        return JSONResponse(page([wheel_object(r) for r in rows], more))

    async def retrieve(request: Request) -> Response:
        return JSONResponse(wheel_object(get_row(request)))

    async def cancel(request: Request) -> Response:
        row = get_row(request)
        store = state.store()
        job = store.request_job_cancel(row["id"])
        if job and job["status"] == "cancelled" and row["status"] == "queued":
            store.api_update("api_wheel_runs", row["id"], status="cancelled")
        return JSONResponse(wheel_object(store.api_get("api_wheel_runs", row["id"])))

    async def events(request: Request) -> Response:
        row = get_row(request)
        after, limit, order = page_args(request, default_order="asc", max_limit=1000)
        rows, more = state.store().api_events(row["id"], after=parse_cursor(after, "fwevent-", "after"), limit=limit,
                                              newest_first=order == "desc")
        return JSONResponse(page([{"object": "flywheel.run.event", "id": f"fwevent-{e['id']}",
                                   "created_at": unix_seconds(e["created_at"]), "level": e["level"], "type": e["type"],
                                   "message": e["message"],
                                   "data": json.loads(e["data_json"]) if e["data_json"] else None}
                                  for e in rows], more))

    base = "/v1/flywheel/runs"
    return [Route(base, create, methods=["POST"]), Route(base, list_runs, methods=["GET"]),
            Route(base + "/{run_id}", retrieve, methods=["GET"]),
            Route(base + "/{run_id}/cancel", cancel, methods=["POST"]),
            Route(base + "/{run_id}/events", events, methods=["GET"])]
