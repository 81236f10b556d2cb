"""Evals: create, list, retrieve, update, delete; runs create, list, retrieve, cancel, delete;
output items list and retrieve — the platform's `/v1/evals` routes over the store.

`testing_criteria` are graders in the platform schema (parsed by `graders.parse_grader`; each gets
an id `<name>-<uuid>`). A run's `data_source` is `completions` (or `responses`, sampled the same
way) over a `file_id` or `file_content` source, with an `input_messages` template and any Flywheel
model reference as `model`; `jsonl` grades given samples; a stored source (`stored_completions`,
`responses`: `flywheel.api.logs`) grades stored replies. A run is queued and executed by
`flywheel.api.runners.eval_runs` in the job queue. Every object belongs to its caller's project.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import graders
from flywheel.api.access import caller
from flywheel.api.errors import check_metadata, field, invalid, not_found
from flywheel.api.jobs import new_object_id
from flywheel.api.logs import STORED_SOURCES, stored_rows
from flywheel.api.model_access import check_judges, resolve_model
from flywheel.api.pagination import page, page_args
from flywheel.api.routes.files import read_rows
from flywheel.api.runners.eval_runs import (ROW_FIELD, build_spec, is_recorded, output_item_object, provider_path,
                                            recorded_path,
                                            run_object)
from flywheel.api.scoped import get_owned, insert_owned, list_owned
from flywheel.privacy.lineage import record_export, record_list
from flywheel.store import now, unix_seconds
from flywheel.web import parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState

SOURCE_CONFIGS = ("custom", "logs", "stored_completions")
RUN_SOURCES = ("completions", "responses", "jsonl")
RUN_STATES = ("queued", "in_progress", "completed", "canceled", "failed")


def parse_criteria(value: Any) -> list[dict[str, Any]]:
    """Validated testing criteria with platform ids; a 400 naming `testing_criteria[i]`."""
    if not isinstance(value, list) or not value:
        raise invalid("testing_criteria must be a non-empty list of graders.", "testing_criteria")
    names: set[str] = set()
    out = []
    for index, raw in enumerate(value):
        param = f"testing_criteria[{index}]"
        if not isinstance(raw, dict):
            raise invalid(f"{param}: a grader object is required.", param)
        try:
            config = graders.parse_grader(raw)
        except graders.GraderConfigError as exc:
            raise invalid(f"{param}: {exc}", param) from None
        if config.name in names:
            raise invalid(f"{param}.name: duplicate criterion name {config.name!r}.", param + ".name")
        names.add(config.name)
        out.append({**raw, "id": f"{config.name}-{uuid.uuid4()}"})
    return out


def source_config(value: Any) -> dict[str, Any]:
    """The stored `data_source_config` with the generated `schema` the platform returns."""
    if not isinstance(value, dict) or value.get("type") not in SOURCE_CONFIGS:
        raise invalid(f"data_source_config.type must be one of {', '.join(SOURCE_CONFIGS)}.", "data_source_config")
    if value["type"] == "custom":
        item_schema = value.get("item_schema")
        if not isinstance(item_schema, dict):
            raise invalid("data_source_config.item_schema: a JSON Schema object is required.",
                          "data_source_config.item_schema")
        properties: dict[str, Any] = {"item": item_schema}
        if value.get("include_sample_schema"):
            properties["sample"] = {"type": "object", "properties": {"output_text": {"type": "string"}}}
        return {"type": "custom", "schema": {"type": "object", "properties": properties,
                                             "required": list(properties)}}
    config = {"type": value["type"], "metadata": check_metadata(value.get("metadata"), "data_source_config.metadata")}
    config["schema"] = {"type": "object", "properties": {"item": {"type": "object"}, "sample": {"type": "object"}},
                        "required": ["item", "sample"]}
    return config


def eval_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "eval", "id": row["id"], "name": row["name"], "created_at": unix_seconds(row["created_at"]),
            "metadata": json.loads(row["metadata_json"] or "{}"),
            "data_source_config": json.loads(row["data_source_config_json"]),
            "testing_criteria": json.loads(row["testing_criteria_json"])}


def run_items(state: "ApiState", source: Any, project: str,
              config_metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The `{item, ...}` rows of a run's `data_source.source`: a stored file, inline content, or
    stored completions selected by filters (`flywheel.api.logs`)."""
    param = "data_source.source"
    if not isinstance(source, dict):
        raise invalid(f"{param}: an object with type file_id or file_content is required.", param)
    if source.get("type") == "file_id":
        rows = read_rows(state, field(source, "id", str, required=True, param=param + ".id"), param + ".id", project)
    elif source.get("type") in STORED_SOURCES:
        rows = stored_rows(state.store(), source, project, config_metadata)
    elif source.get("type") == "file_content":
        rows = source.get("content")
        if not isinstance(rows, list) or not rows:
            raise invalid(f"{param}.content must be a non-empty list of {{item: {{...}}}} rows.", param + ".content")
    else:
        raise invalid(f"{param}.type must be file_id, file_content, stored_completions or responses, "
                      f"got {source.get('type')!r}.", param + ".type")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("item"), dict):
            raise invalid(f"{param}: row {index}: expected {{\"item\": {{...}}}}.", param)
    return rows


def recorded_outputs(rows: list[dict[str, Any]]) -> list[str]:
    """The `sample.output_text` of each row of a `jsonl` run (graded as given, no model)."""
    outputs = []
    for index, row in enumerate(rows):
        sample = row.get("sample")
        if not isinstance(sample, dict) or not isinstance(sample.get("output_text"), str):
            raise invalid(f"data_source.source: row {index}: a jsonl run grades given samples; each row needs "
                          "\"sample\": {\"output_text\": \"...\"}.", "data_source.source")
        outputs.append(sample["output_text"])
    return outputs


def routes(state: "ApiState") -> list[Route]:
    async def body_of(request: Request) -> dict[str, Any]:
        return parse_json_object(await read_body(request, state.max_upload_bytes))

    def get_eval(request: Request) -> dict[str, Any]:
        eval_id = request.path_params["eval_id"]
        row = get_owned(state.store(), "api_evals", eval_id, caller(request).project)
        if row is None:
            raise not_found("eval", eval_id, "eval_id")
        return row

    def get_run(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        evaluation = get_eval(request)
        run = get_owned(state.store(), "api_eval_runs", request.path_params["run_id"], caller(request).project)
        if run is None or run["eval_id"] != evaluation["id"]:
            raise not_found("eval run", request.path_params["run_id"], "run_id")
        return evaluation, run

    def shaped_run(run: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
        return run_object(state.store(), run, json.loads(evaluation["testing_criteria_json"]), state.report_base)

    async def create_eval(request: Request) -> Response:
        body = await body_of(request)
        config = source_config(body.get("data_source_config"))
        criteria = check_judges(state.store(), parse_criteria(body.get("testing_criteria")), caller(request),
                                state.models, param="testing_criteria")
        row = {"id": new_object_id("eval_"), "created_at": now(), "name": field(body, "name", str, default=""),
               "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {}),
               "data_source_config_json": json.dumps(config), "testing_criteria_json": json.dumps(criteria)}
        insert_owned(state.store(), "api_evals", row, caller(request).project)
        return JSONResponse(eval_object(row))

    async def list_evals(request: Request) -> Response:
        after, limit, order = page_args(request, default_order="asc")
        rows, more = list_owned(state.store(), "api_evals", caller(request).project, after=after, limit=limit,
                                order=order)
        return JSONResponse(page([eval_object(r) for r in rows], more))

    async def retrieve_eval(request: Request) -> Response:
        return JSONResponse(eval_object(get_eval(request)))

    async def update_eval(request: Request) -> Response:
        row = get_eval(request)
        body = await body_of(request)
        changes = {}
        if "name" in body:
            changes["name"] = field(body, "name", str, default="")
        if "metadata" in body:
            changes["metadata_json"] = json.dumps(check_metadata(body["metadata"]) or {})
        if changes:
            state.store().api_update("api_evals", row["id"], **changes)
        return JSONResponse(eval_object({**row, **changes}))

    async def delete_eval(request: Request) -> Response:
        row = get_eval(request)
        store = state.store()
        runs, _ = store.api_list("api_eval_runs", limit=10000, where={"eval_id": row["id"]})
        for run in runs:
            store.request_job_cancel(run["id"])
            store.api_delete("api_eval_runs", run["id"])
        store.api_delete("api_evals", row["id"])
        return JSONResponse({"object": "eval.deleted", "deleted": True, "eval_id": row["id"]})

    async def create_run(request: Request) -> Response:
        evaluation = get_eval(request)
        body = await body_of(request)
        source = field(body, "data_source", dict, required=True)
        if source.get("type") not in RUN_SOURCES:
            raise invalid(f"data_source.type must be one of {', '.join(RUN_SOURCES)}, got {source.get('type')!r}.",
                          "data_source.type")
        config = json.loads(evaluation["data_source_config_json"])
        rows = run_items(state, source.get("source"), caller(request).project,
                         config.get("metadata") if config.get("type") in ("logs", "stored_completions") else None)
        items = [row["item"] for row in rows]
        resolved = None
        if source.get("model") is not None and not is_recorded(source):
            # only a model the caller may name; its provider's URL and key stay on the server
            resolved = resolve_model(state.store(), source["model"], caller(request), state.models,
                                     param="data_source.model")
        store = state.store()
        run_id = new_object_id("evalrun_")
        folder = store.artefact_dir / "api" / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        dataset = folder / f"{run_id}.jsonl"
        if is_recorded(source):
            if source["type"] != "jsonl" and (source.get("model") or source.get("input_messages")):
                raise invalid("data_source: stored completions are graded as they are here; sampling them again "
                              "with model / input_messages (item_reference) is not supported.", "data_source.model")
            outputs = recorded_outputs(rows)
            # The row index reaches the recorded "model" through the prompt (see eval_runs.RecordedModel).
            items = [{**item, ROW_FIELD: index} for index, item in enumerate(items)]
            recorded_path(dataset).write_text(json.dumps(outputs, ensure_ascii=False), encoding="utf-8")
        elif resolved is not None and resolved.options:
            provider_path(dataset).write_text(json.dumps(resolved.options), encoding="utf-8")
        dataset.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
        row = {"id": run_id, "eval_id": evaluation["id"], "created_at": now(),
               "name": field(body, "name", str, default="") or run_id, "status": "queued",
               "model": source.get("model"), "data_source_json": json.dumps(source),
               "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {}), "dataset_path": str(dataset)}
        try:  # refuse now what the worker could not run
            build_spec(evaluation, {**row, "project": caller(request).project}, store=store)
        except Exception:
            Path(dataset).unlink(missing_ok=True)
            raise
        insert_owned(store, "api_eval_runs", row, caller(request).project)
        if (source.get("source") or {}).get("type") in STORED_SOURCES:  # lineage: a deletion follows captures here
            captured = [r["capture_id"] for r in rows]
            record_export(store, dataset, "api_eval_run", items, capture_ids=captured, source={"run": run_id})
            if is_recorded(source):
                record_list(store, recorded_path(dataset), "api_eval_run_outputs", outputs, captured)
        store.enqueue_job(new_object_id("job_"), "eval_run", run_id)
        state.notify()
        return JSONResponse(shaped_run(row, evaluation))

    async def list_runs(request: Request) -> Response:
        evaluation = get_eval(request)
        after, limit, order = page_args(request, default_order="asc")
        where = {"eval_id": evaluation["id"]}
        status = request.query_params.get("status")
        if status:
            if status not in RUN_STATES:
                raise invalid(f"status must be one of {', '.join(RUN_STATES)}.", "status")
            where["status"] = status
        rows, more = list_owned(state.store(), "api_eval_runs", caller(request).project, after=after, limit=limit,
                                order=order, where=where)
        return JSONResponse(page([shaped_run(r, evaluation) for r in rows], more))

    async def retrieve_run(request: Request) -> Response:
        evaluation, run = get_run(request)
        return JSONResponse(shaped_run(run, evaluation))

    async def cancel_run(request: Request) -> Response:
        evaluation, run = get_run(request)
        store = state.store()
        job = store.request_job_cancel(run["id"])
        if job and job["status"] == "cancelled" and run["status"] == "queued":
            store.api_update("api_eval_runs", run["id"], status="canceled")
            store.add_api_event(run["id"], "Run cancelled before it started.")
        return JSONResponse(shaped_run(store.api_get("api_eval_runs", run["id"]), evaluation))

    async def delete_run(request: Request) -> Response:
        _, run = get_run(request)
        store = state.store()
        store.request_job_cancel(run["id"])
        store.api_delete("api_eval_runs", run["id"])
        return JSONResponse({"object": "eval.run.deleted", "deleted": True, "run_id": run["id"]})

    def item_id(value: str | None, param: str) -> int | None:
        if value is None:
            return None
        if not value.startswith("outputitem_") or not (value[11:].isascii() and value[11:].isdigit()
                                                       and len(value) <= 29):
            raise not_found("output item", value[:60], param)
        return int(value[11:])

    async def list_items(request: Request) -> Response:
        evaluation, run = get_run(request)
        after, limit, order = page_args(request, default_order="asc")
        status = request.query_params.get("status")
        if status not in (None, "pass", "fail"):
            raise invalid("status must be 'pass' or 'fail'.", "status")
        after_id = item_id(after, "after")
        if not run.get("iteration_id"):
            return JSONResponse(page([], False))
        rows, more = state.store().output_items(run["iteration_id"], after=after_id, limit=limit,
                                                order=order, status=status)
        criteria = json.loads(evaluation["testing_criteria_json"])
        return JSONResponse(page([output_item_object(r, run, criteria) for r in rows], more))

    async def retrieve_item(request: Request) -> Response:
        evaluation, run = get_run(request)
        wanted = request.path_params["item_id"]
        sample_id = item_id(wanted, "output_item_id")
        rows, _ = (state.store().output_items(run["iteration_id"], sample_id=sample_id, limit=1)
                   if run.get("iteration_id") else ([], False))
        if not rows:
            raise not_found("output item", wanted, "output_item_id")
        return JSONResponse(output_item_object(rows[0], run, json.loads(evaluation["testing_criteria_json"])))

    base = "/v1/evals"
    return [
        Route(base, create_eval, methods=["POST"]), Route(base, list_evals, methods=["GET"]),
        Route(base + "/{eval_id}", retrieve_eval, methods=["GET"]),
        Route(base + "/{eval_id}", update_eval, methods=["POST"]),
        Route(base + "/{eval_id}", delete_eval, methods=["DELETE"]),
        Route(base + "/{eval_id}/runs", create_run, methods=["POST"]),
        Route(base + "/{eval_id}/runs", list_runs, methods=["GET"]),
        Route(base + "/{eval_id}/runs/{run_id}", retrieve_run, methods=["GET"]),
        Route(base + "/{eval_id}/runs/{run_id}", cancel_run, methods=["POST"]),  # the reference's path
        Route(base + "/{eval_id}/runs/{run_id}/cancel", cancel_run, methods=["POST"]),  # the SDK's path
        Route(base + "/{eval_id}/runs/{run_id}", delete_run, methods=["DELETE"]),
        Route(base + "/{eval_id}/runs/{run_id}/output_items", list_items, methods=["GET"]),
        Route(base + "/{eval_id}/runs/{run_id}/output_items/{item_id}", retrieve_item, methods=["GET"]),
    ]
