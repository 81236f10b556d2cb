"""Fine-tuning jobs: create (method `supervised`, `dpo` or `reinforcement`), list, retrieve, cancel,
pause, resume, events, checkpoints.

A job trains a LoRA adapter with `flywheel.train` on an uploaded `fine-tune` file, in the job
queue (`flywheel.api.runners.fine_tuning`: the hyper-parameter mapping, step checkpoints, validation
loss, pause and resume).
A `reinforcement` job is the platform's RFT: its `method.reinforcement.grader` (any grader but
`label_model`, as on the platform) is GRPO's reward. The result is registered as a checkpoint (as
`flywheel train` does) and gets a platform-looking model id, `ft:<base>:<suffix>:<job>`, that
`/v1/chat/completions` on the same server answers with at once. `create_job` is also what
`flywheel import openai-job` calls, so a platform job definition becomes the same record.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.api.access import caller
from flywheel.api.errors import check_metadata, field, invalid, not_found
from flywheel.api.jobs import new_object_id
from flywheel.api.pagination import page, page_args
from flywheel.api.platform import fine_tuned_name, model_for
from flywheel.api.routes.files import read_file_rows, training_kind
from flywheel.api.scoped import get_owned, insert_owned, list_owned
from flywheel.errors import FlywheelError
from flywheel.store import Store, now, unix_seconds
from flywheel.web import parse_cursor, parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState

REASONING_EFFORTS = ("default", "low", "medium", "high")
DONE = ("succeeded", "failed", "cancelled")


def hyperparameters(method_type: str, method: dict[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameters (flywheel.train.methods: the common ones and the method's own),
    checked; "auto" (or absent) stays "auto"."""
    from flywheel.train.methods import HOSTED_HYPERPARAMETERS, hosted_method

    chosen = hosted_method(method_type)
    known = {**HOSTED_HYPERPARAMETERS, **chosen.hosted_hyperparameters}
    given = (method.get(method_type) or {}).get("hyperparameters") or {}
    if not isinstance(given, dict):
        raise invalid("hyperparameters must be an object.", f"method.{method_type}.hyperparameters")
    out: dict[str, Any] = {}
    for name, (kind, low, high, closed) in known.items():
        value = given.get(name, "auto")
        param = f"method.{method_type}.hyperparameters.{name}"
        if value != "auto" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                or not (low <= value if closed else low < value) or value > high
                                or (kind is int and not float(value).is_integer())):
            raise invalid(f"{param} must be 'auto' or a number in {'[' if closed else '('}{low}, {high}], "
                          f"got {value!r}.", param)
        out[name] = value
    if chosen.grader_rewards:
        effort = given.get("reasoning_effort", "default")
        if effort not in REASONING_EFFORTS:
            raise invalid(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}.",
                          "method.reinforcement.hyperparameters.reasoning_effort")
        out["reasoning_effort"] = effort
    unknown = set(given) - set(out)
    if unknown:
        raise invalid(f"unknown {method_type} hyper-parameter(s): {', '.join(sorted(unknown))}.",
                      f"method.{method_type}.hyperparameters")
    return out


def parse_method(body: dict[str, Any]) -> dict[str, Any]:
    """The stored `method` of a create body (the deprecated top-level `hyperparameters` too)."""
    method = field(body, "method", dict)
    if method is None:
        legacy = field(body, "hyperparameters", dict, default={})
        method = {"type": "supervised", "supervised": {"hyperparameters": legacy}}
    from flywheel.train.methods import HOSTED_TYPES, hosted_method

    method_type = method.get("type", "supervised")
    if method_type not in HOSTED_TYPES:
        raise invalid(f"method.type must be one of {', '.join(HOSTED_TYPES)}, got {method_type!r}.", "method.type")
    inner: dict[str, Any] = {"hyperparameters": hyperparameters(method_type, method)}
    if hosted_method(method_type).grader_rewards:
        import graders
        from graders.registry import GRADER_TYPES, HOSTED_RFT_TYPES

        settings = method.get(method_type) or {}
        grader = settings.get("grader")
        param = f"method.{method_type}.grader"
        if not isinstance(grader, dict):
            raise invalid(f"{param}: a grader object is required for reinforcement fine-tuning.", param)
        subs = grader.get("graders") if grader.get("type") == "multi" else None
        types = [grader.get("type"), *(g.get("type") for g in subs.values() if isinstance(g, dict))] \
            if isinstance(subs, dict) else [grader.get("type")]
        refused = next((t for t in types if t in GRADER_TYPES and t not in HOSTED_RFT_TYPES), None)
        if refused is not None:  # the grader table's `hosted_rft`
            raise invalid(f"{param}: {refused} graders cannot be RFT rewards (as on the platform); use "
                          f"{', '.join(HOSTED_RFT_TYPES)}.", param)
        try:
            graders.parse_grader(grader)
        except graders.GraderConfigError as exc:
            raise invalid(f"{param}: {exc}", param) from None
        inner["grader"] = grader
        if settings.get("response_format") is not None:
            inner["response_format"] = settings["response_format"]  # accepted and echoed (docs-only field)
    return {"type": method_type, method_type: inner}


def job_object(store: Store, row: dict[str, Any]) -> dict[str, Any]:
    """A job row as the platform's `fine_tuning.job`; its status is its training job's
    (`Store.fine_tuning_status`)."""
    method = json.loads(row["method_json"])
    return {
        "object": "fine_tuning.job", "id": row["id"], "created_at": unix_seconds(row["created_at"]),
        "finished_at": unix_seconds(row["finished_at"]), "estimated_finish": None,
        "status": store.fine_tuning_status(row["id"]), "model": row["model"],
        "fine_tuned_model": row["fine_tuned_model"], "organization_id": "flywheel",
        "training_file": row["training_file"], "validation_file": row["validation_file"], "result_files": [],
        "trained_tokens": row["trained_tokens"], "seed": row["seed"],
        "hyperparameters": method[method["type"]]["hyperparameters"], "method": method,
        "metadata": json.loads(row["metadata_json"] or "{}"), "integrations": [],
        "user_provided_suffix": row["suffix"],
        "error": json.loads(row["error_json"]) if row["error_json"] else None,
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{row['id']}", "created_at": unix_seconds(row["created_at"]),
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": json.loads(row["data_json"]) if row["data_json"] else None}


def _seed(body: dict[str, Any]) -> int:
    """The job's seed, within what every consumer accepts (flywheel.spec.SEED_MAX)."""
    from flywheel.spec import SEED_MAX

    seed = field(body, "seed", int, default=0)
    if not 0 <= seed <= SEED_MAX:
        raise invalid(f"seed must be between 0 and {SEED_MAX}, got {seed}.", "seed")
    return seed


def create_job(store: Store, body: dict[str, Any], project: str) -> dict[str, Any]:
    """Check a create body (400 / 404 naming the field), store the job for `project` and queue it;
    returns the job object."""
    model = field(body, "model", str, required=True)
    training_file = field(body, "training_file", str, required=True)
    validation_file = field(body, "validation_file", str)
    method = parse_method(body)
    suffix = field(body, "suffix", str)
    if suffix is not None and len(suffix) > 64:
        raise invalid("suffix must be at most 64 characters.", "suffix")
    from flywheel.train.methods import hosted_method

    wanted = hosted_method(method["type"]).name
    for name, file_id in (("training_file", training_file), ("validation_file", validation_file)):
        if file_id is None:
            continue
        found = training_kind(read_file_rows(store, file_id, name, project))
        if found != wanted:
            raise invalid(f"{name} {file_id} holds {found} rows; {method['type']} jobs need {wanted} rows (the "
                          f"platform's {method['type']} format).", name)
    try:
        model_for(store, model, project)
    except FlywheelError as exc:
        raise invalid(str(exc), "model", "model_not_found") from None
    row = {"id": new_object_id("ftjob-"), "created_at": now(), "model": model,
           "training_file": training_file, "validation_file": validation_file, "method_json": json.dumps(method),
           "suffix": suffix, "seed": _seed(body),
           "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {})}
    insert_owned(store, "api_fine_tuning_jobs", row, project)
    store.add_api_event(row["id"], f"Created fine-tuning job: {row['id']}")
    store.enqueue_job(new_object_id("job_"), "fine_tuning", row["id"])
    return job_object(store, store.api_get("api_fine_tuning_jobs", row["id"]))


def checkpoint_object(row: dict[str, Any], checkpoint: dict[str, Any], fine_tuned: str,
                      final_step: int | None = None) -> dict[str, Any]:
    """A registered step checkpoint as a `fine_tuning.job.checkpoint` with the platform's metrics
    (`full_valid_*` on the last step only)."""
    metrics = json.loads(checkpoint.get("metrics_json") or "{}")
    step = checkpoint.get("step") or metrics.get("steps") or 0
    shown = {"step": step, "train_loss": metrics.get("train_loss", metrics.get("last_loss"))}
    shown.update({k: metrics[k] for k in ("valid_loss", "full_valid_loss", "full_valid_mean_reward",
                                          "valid_reward_mean") if metrics.get(k) is not None})
    if final_step is not None and step != final_step:
        shown = {k: v for k, v in shown.items() if not k.startswith("full_valid")}
    if metrics.get("mean_reward") is not None:
        shown["train_reward_mean"] = metrics["mean_reward"]
    return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt_{checkpoint['id']}",
            "created_at": unix_seconds(checkpoint.get("created_at") or row["finished_at"] or row["created_at"]),
            "fine_tuned_model_checkpoint": f"{fine_tuned}:ckpt-step-{step}",
            "fine_tuning_job_id": row["id"], "step_number": step, "metrics": shown}


def job_checkpoints(store: Store, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's kept step checkpoints, newest first, as the platform lists them (while it trains too)."""
    training_job_id = row.get("training_job_id")
    if not training_job_id and row["checkpoint_id"]:  # a job finished before step checkpoints
        training_job_id = store.get_checkpoint(row["checkpoint_id"]).get("job_id")
    rows = store.job_checkpoints(training_job_id) if training_job_id else []
    if not rows and row["checkpoint_id"]:
        rows = [store.get_checkpoint(row["checkpoint_id"])]
    if not rows:
        return []
    try:
        fine_tuned = row["fine_tuned_model"] or fine_tuned_name(row, model_for(store, row["model"],
                                                                               row.get("project") or "default"))
    except FlywheelError:
        fine_tuned = fine_tuned_name(row, row["model"])
    succeeded = store.fine_tuning_status(row["id"]) == "succeeded"
    final_step = max((r.get("step") or 0) for r in rows) if succeeded else -1
    kept = [r for r in rows if not r.get("pruned_at")]
    return [checkpoint_object(row, r, fine_tuned, final_step)
            for r in sorted(kept, key=lambda r: (r.get("step") or 0, r["created_at"] or ""), reverse=True)]


def routes(state: "ApiState") -> list[Route]:
    def get_job(request: Request) -> dict[str, Any]:
        job_id = request.path_params["job_id"]
        row = get_owned(state.store(), "api_fine_tuning_jobs", job_id, caller(request).project)
        if row is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return row

    def answer(row: dict[str, Any]) -> Response:
        store = state.store()
        return JSONResponse(job_object(store, store.api_get("api_fine_tuning_jobs", row["id"])))

    async def create(request: Request) -> Response:
        from flywheel.api.model_access import resolve_model

        body = parse_json_object(await read_body(request, state.max_upload_bytes))
        if body.get("model") is not None:  # the base: one this caller may name (docs/security.md)
            resolve_model(state.store(), body["model"], caller(request), state.models, param="model")
        job = create_job(state.store(), body, caller(request).project)
        state.notify()
        return JSONResponse(job)

    async def list_jobs(request: Request) -> Response:
        after, limit, order = page_args(request)
        rows, more = list_owned(state.store(), "api_fine_tuning_jobs", caller(request).project, after=after,
                                limit=limit, order=order)
        return JSONResponse(page([job_object(state.store(), r) for r in rows], more))

    async def retrieve(request: Request) -> Response:
        return JSONResponse(job_object(state.store(), get_job(request)))

    async def cancel(request: Request) -> Response:
        row = get_job(request)
        store = state.store()
        status = store.fine_tuning_status(row["id"])
        if status in DONE:
            raise invalid(f"Job {row['id']} has already {status}; it cannot be cancelled.", "fine_tuning_job_id")
        job = store.request_job_cancel(row["id"])
        stopped = store.cancel_paused_job(row["id"]) or (job and job["status"] == "cancelled"
                                                        and status == "queued")
        if stopped:  # a running job is cancelled by its runner at its next step
            store.set_fine_tuning_status(row["id"], "cancelled")
            store.api_update("api_fine_tuning_jobs", row["id"], finished_at=now())
            store.add_api_event(row["id"], "The job was cancelled.")
        return answer(row)

    async def pause(request: Request) -> Response:
        row = get_job(request)
        store = state.store()
        status = store.fine_tuning_status(row["id"])
        if status not in ("queued", "running"):
            raise invalid(f"Job {row['id']} is {status}; only a queued or running job can be paused.",
                          "fine_tuning_job_id")
        paused_now = store.request_job_pause(row["id"])
        if paused_now == "paused":  # it was waiting in the queue: nothing to save
            store.set_fine_tuning_status(row["id"], "paused")
            store.add_api_event(row["id"], "The job was paused before it started.")
        elif paused_now == "running":
            store.add_api_event(row["id"], "Pausing the job at its next training step.")
        return answer(row)

    async def resume(request: Request) -> Response:
        row = get_job(request)
        store = state.store()
        status = store.fine_tuning_status(row["id"])
        if status != "paused" or not store.resume_paused_job(row["id"]):
            raise invalid(f"Job {row['id']} is {status}; only a paused job can be resumed.",
                          "fine_tuning_job_id")
        store.set_fine_tuning_status(row["id"], "queued")
        store.add_api_event(row["id"], "The job was resumed and is queued.")
        state.notify()
        return answer(row)

    async def events(request: Request) -> Response:
        row = get_job(request)
        after, limit, _ = page_args(request)
        rows, more = state.store().api_events(row["id"], after=parse_cursor(after, "ftevent-", "after"), limit=limit)
        return JSONResponse(page([event_object(r) for r in rows], more))

    async def checkpoints(request: Request) -> Response:
        row = get_job(request)
        after, limit, _ = page_args(request)
        data = job_checkpoints(state.store(), row)
        if after is not None:
            ids = [c["id"] for c in data]
            if after not in ids:
                raise invalid(f"after must be a checkpoint id of this job, got {after!r}.", "after")
            data = data[ids.index(after) + 1:]
        return JSONResponse(page(data[:limit], len(data) > limit))

    base = "/v1/fine_tuning/jobs"
    return [Route(base, create, methods=["POST"]), Route(base, list_jobs, methods=["GET"]),
            Route(base + "/{job_id}", retrieve, methods=["GET"]),
            Route(base + "/{job_id}/cancel", cancel, methods=["POST"]),
            Route(base + "/{job_id}/pause", pause, methods=["POST"]),
            Route(base + "/{job_id}/resume", resume, methods=["POST"]),
            Route(base + "/{job_id}/events", events, methods=["GET"]),
            Route(base + "/{job_id}/checkpoints", checkpoints, methods=["GET"])]
