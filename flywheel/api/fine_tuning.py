"""Fine-tuning jobs: create (method `supervised` or `dpo`), list, retrieve, cancel, events, checkpoints.

A job trains a LoRA adapter with `flywheel.train` (TRL's SFTTrainer / DPOTrainer) on an uploaded
`fine-tune` file, in the job queue. Every trainer log line is a `metrics` event; cancelling stops the trainer
at its next step. The result is registered as a checkpoint (as `flywheel train` does) and gets a
platform-looking model id, `ft:<base>:<suffix>:<job>`, that `/v1/chat/completions` on the same
server answers with at once. The platform's hyper-parameters map onto `SFTSpec` / `DPOSpec`:
`n_epochs` -> epochs, `batch_size`, `learning_rate_multiplier` x our default learning rate, `beta`;
"auto" keeps ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.api.access import caller
from flywheel.api.errors import check_metadata, field, invalid, not_found
from flywheel.api.eval_runs import LOCAL_COMPUTE
from flywheel.api.files import read_rows, training_kind
from flywheel.api.jobs import JobContext, new_object_id, unix_now
from flywheel.api.pagination import page, page_args
from flywheel.api.scoped import get_owned, insert_owned, list_owned
from flywheel.errors import FlywheelError
from flywheel.store import Store
from flywheel.web import parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.app import ApiState

# name: (type, lowest, highest, whether the lowest is allowed) — the platform's OpenAPI ranges
HYPERPARAMETERS = {"n_epochs": (int, 1, 50, True), "batch_size": (int, 1, 256, True),
                   "learning_rate_multiplier": (float, 0, 100, False)}
# method type -> (training set kind, its extra hyper-parameters)
METHODS = {"supervised": ("sft", {}), "dpo": ("dpo", {"beta": (float, 0, 2, False)})}


def hyperparameters(method_type: str, method: dict[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameters, checked; "auto" (or absent) stays "auto"."""
    known = {**HYPERPARAMETERS, **METHODS[method_type][1]}
    given = (method.get(method_type) or {}).get("hyperparameters") or {}
    out: dict[str, Any] = {}
    for name, (kind, low, high, closed) in known.items():
        value = given.get(name, "auto")
        param = f"method.{method_type}.hyperparameters.{name}"
        if value != "auto" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                or (kind is int and not float(value).is_integer())
                                or not (low <= value if closed else low < value) or value > high):
            raise invalid(f"{param} must be 'auto' or a number in {'[' if closed else '('}{low}, {high}], "
                          f"got {value!r}.", param)
        out[name] = value
    unknown = set(given) - set(known)
    if unknown:
        raise invalid(f"unknown {method_type} hyper-parameter(s): {', '.join(sorted(unknown))}.",
                      f"method.{method_type}.hyperparameters")
    return out


def train_config(row: dict[str, Any]):
    """Our SFTSpec / DPOSpec for a job: n_epochs -> epochs, batch_size, learning_rate_multiplier x our
    default learning rate, beta; "auto" keeps our defaults."""
    from flywheel.train.config import DPOSpec, SFTSpec

    method = json.loads(row["method_json"])
    hp = method[method["type"]]["hyperparameters"]
    cls = SFTSpec if method["type"] == "supervised" else DPOSpec
    defaults = cls()
    extra = {"beta": float(hp["beta"])} if hp.get("beta", "auto") != "auto" else {}
    return cls(
        epochs=defaults.epochs if hp["n_epochs"] == "auto" else float(hp["n_epochs"]),
        batch_size=defaults.batch_size if hp["batch_size"] == "auto" else int(hp["batch_size"]),
        learning_rate=defaults.learning_rate * (1.0 if hp["learning_rate_multiplier"] == "auto"
                                                else float(hp["learning_rate_multiplier"])),
        seed=row["seed"] or 0, logging_steps=1, **extra)


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = json.loads(row["method_json"])
    return {
        "object": "fine_tuning.job", "id": row["id"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "estimated_finish": None, "status": row["status"], "model": row["model"],
        "fine_tuned_model": row["fine_tuned_model"], "organization_id": "flywheel",
        "training_file": row["training_file"], "validation_file": row["validation_file"], "result_files": [],
        "trained_tokens": row["trained_tokens"], "seed": row["seed"],
        "hyperparameters": method[method["type"]]["hyperparameters"], "method": method,
        "metadata": json.loads(row["metadata_json"] or "{}"), "integrations": [],
        "user_provided_suffix": row["suffix"],
        "error": json.loads(row["error_json"]) if row["error_json"] else None,
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{row['id']}", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": json.loads(row["data_json"]) if row["data_json"] else None}


def model_for(store: Store, model: str, project: str) -> str:
    """The Flywheel model reference of a `ft:` id made here by `project`; any other value is taken as a
    reference."""
    if not model.startswith("ft:"):
        from flywheel.models import parse_model_ref

        parse_model_ref(model)  # ModelError for what is no reference
        return model
    rows, _ = list_owned(store, "api_fine_tuning_jobs", project, limit=1, where={"fine_tuned_model": model})
    if not rows or not rows[0]["checkpoint_id"]:
        raise FlywheelError(f"no fine-tuned model {model!r} on this server")
    return store.get_checkpoint(rows[0]["checkpoint_id"])["model_ref"]


def _cancel_callback(ctx: JobContext):
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Metrics become job events; a cancel request stops training at the next step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                data = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                data["step"] = state.global_step
                shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k != "step")
                ctx.event(f"Step {state.global_step}/{state.max_steps}: {shown}", type="metrics",
                          data={**data, "total_steps": state.max_steps})

        def on_step_end(self, args, state, control, **kwargs):
            ctx.check()

    return Watch()


class FineTuningRunner:
    """Runs `fine_tuning` jobs with the local SFT trainer."""

    def run(self, ctx: JobContext) -> None:
        from flywheel.spec import parse_eval_spec
        from flywheel.train.dpo import build_dpo_trainer
        from flywheel.train.formats import load_training_file
        from flywheel.train.local import run_local
        from flywheel.train.sft import build_sft_trainer

        store = ctx.store
        row = store.api_get("api_fine_tuning_jobs", ctx.job["object_id"])
        file_row = store.api_get("api_files", row["training_file"])
        if file_row is None:
            raise FlywheelError(f"training file {row['training_file']} was deleted")
        store.api_update("api_fine_tuning_jobs", row["id"], status="running")
        ctx.event("Fine-tuning job started." if ctx.job["attempts"] == 1 else "Fine-tuning job restarted.")
        method_type = json.loads(row["method_json"])["type"]
        kind = METHODS[method_type][0]
        builder = build_sft_trainer if kind == "sft" else build_dpo_trainer
        training_set = load_training_file(kind, file_row["path"])
        config = train_config(row)
        base = model_for(store, row["model"], row.get("project") or "default")
        # run_local wants an eval spec for evaluating afterwards; the API job does not evaluate.
        spec = parse_eval_spec({"name": f"api-{row['id']}", "dataset": {"path": file_row["path"]},
                                "input": [{"role": "user", "content": "-"}], "model": base,
                                "graders": [{"type": "string_check", "name": "none", "input": "-",
                                             "reference": "-", "operation": "eq"}]})

        def build(model, tokenizer, output_dir, bf16):
            built = builder(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=True)
            built.trainer.add_callback(_cancel_callback(ctx))
            return built

        with LOCAL_COMPUTE:  # local training and local eval runs take turns on the cores
            result = run_local(kind, spec, store, training_set, base=base, config=config, build=build,
                               evaluate=False, quiet=True)
        short = row["id"].removeprefix("ftjob-")[:8]
        name = Path(base.partition(":")[2].partition("+")[0]).name or "model"
        fine_tuned = f"ft:{name}:{row['suffix'] or 'flywheel'}:{short}"
        store.api_update("api_fine_tuning_jobs", row["id"], fine_tuned_model=fine_tuned,
                         checkpoint_id=result.checkpoint.id,
                         trained_tokens=int(result.metrics.get("tokens") or result.metrics.get("train_tokens") or 0))
        ctx.event(f"New fine-tuned model created: {fine_tuned}", data={"checkpoint": result.checkpoint.id,
                                                                          "model_ref": result.checkpoint.model_ref})

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        if store.api_get("api_fine_tuning_jobs", job["object_id"]) is None:
            return
        fields: dict[str, Any] = {"status": status, "finished_at": unix_now()}
        if error:
            fields["error_json"] = json.dumps({"code": "training_failed", "message": error, "param": None})
        store.api_update("api_fine_tuning_jobs", job["object_id"], **fields)
        message = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled.",
                   "failed": f"The job failed: {error}"}[status]
        store.add_api_event(job["object_id"], message, created_at=unix_now(),
                            level="error" if status == "failed" else "info")


def routes(state: "ApiState") -> list[Route]:
    def get_job(request: Request) -> dict[str, Any]:
        job_id = request.path_params["job_id"]
        row = get_owned(state.store(), "api_fine_tuning_jobs", job_id, caller(request).project)
        if row is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return row

    async def create(request: Request) -> Response:
        body = parse_json_object(await read_body(request, state.max_upload_bytes))
        model = field(body, "model", str, required=True)
        training_file = field(body, "training_file", str, required=True)
        validation_file = field(body, "validation_file", str)
        method = field(body, "method", dict, default={"type": "supervised"})
        method_type = method.get("type", "supervised")
        if method_type not in METHODS:
            raise invalid(f"method.type {method_type!r} is not supported yet; this server trains "
                          f"{' and '.join(METHODS)} jobs.", "method.type")
        method = {"type": method_type, method_type: {"hyperparameters": hyperparameters(method_type, method)}}
        suffix = field(body, "suffix", str)
        if suffix is not None and len(suffix) > 64:
            raise invalid("suffix must be at most 64 characters.", "suffix")
        project = caller(request).project
        rows = read_rows(state, training_file, "training_file", project)
        wanted = METHODS[method_type][0]
        if training_kind(rows) != wanted:
            raise invalid(f"training_file {training_file} holds {training_kind(rows)} rows; {method_type} jobs need "
                          f"{wanted} rows (the platform's {method_type} format).", "training_file")
        if validation_file is not None:
            read_rows(state, validation_file, "validation_file", project)
        store = state.store()
        try:
            model_for(store, model, project)
        except FlywheelError as exc:
            raise invalid(str(exc), "model", "model_not_found") from None
        row = {"id": new_object_id("ftjob-"), "created_at": unix_now(), "status": "queued", "model": model,
               "training_file": training_file, "validation_file": validation_file, "method_json": json.dumps(method),
               "suffix": suffix, "seed": field(body, "seed", int, default=0),
               "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {})}
        insert_owned(store, "api_fine_tuning_jobs", row, project)
        store.add_api_event(row["id"], f"Created fine-tuning job: {row['id']}", created_at=row["created_at"])
        store.enqueue_job(new_object_id("job_"), "fine_tuning", row["id"], row["created_at"])
        state.notify()
        return JSONResponse(job_object({**row, "finished_at": None, "fine_tuned_model": None,
                                        "trained_tokens": None, "error_json": None, "checkpoint_id": None}))

    async def list_jobs(request: Request) -> Response:
        after, limit, order = page_args(request)
        rows, more = list_owned(state.store(), "api_fine_tuning_jobs", caller(request).project, after=after,
                                limit=limit, order=order)
        return JSONResponse(page([job_object(r) for r in rows], more))

    async def retrieve(request: Request) -> Response:
        return JSONResponse(job_object(get_job(request)))

    async def cancel(request: Request) -> Response:
        row = get_job(request)
        if row["status"] in ("succeeded", "failed", "cancelled"):
            raise invalid(f"Job {row['id']} has already {row['status']}; it cannot be cancelled.", "fine_tuning_job_id")
        store = state.store()
        job = store.request_job_cancel(row["id"])
        if job and job["status"] == "cancelled" and row["status"] == "queued":
            store.api_update("api_fine_tuning_jobs", row["id"], status="cancelled", finished_at=unix_now())
            store.add_api_event(row["id"], "The job was cancelled.", created_at=unix_now())
        return JSONResponse(job_object(store.api_get("api_fine_tuning_jobs", row["id"])))

    async def events(request: Request) -> Response:
        row = get_job(request)
        after, limit, _ = page_args(request)
        if after is not None and not (after.startswith("ftevent-") and after[8:].isdigit()):
            raise invalid(f"after must be an event id (ftevent-N), got {after!r}.", "after")
        rows, more = state.store().api_events(row["id"], after=int(after[8:]) if after else None, limit=limit)
        return JSONResponse(page([event_object(r) for r in rows], more))

    async def checkpoints(request: Request) -> Response:
        row = get_job(request)
        data = []
        if row["checkpoint_id"]:
            checkpoint = state.store().get_checkpoint(row["checkpoint_id"])
            metrics = json.loads(checkpoint.get("metrics_json") or "{}")
            data.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt_{checkpoint['id']}",
                         "created_at": row["finished_at"] or row["created_at"],
                         "fine_tuned_model_checkpoint": f"{row['fine_tuned_model']}:ckpt-step-{metrics.get('steps', 0)}",
                         "fine_tuning_job_id": row["id"], "step_number": metrics.get("steps", 0),
                         "metrics": {"step": metrics.get("steps"), "train_loss": metrics.get("last_loss")}})
        return JSONResponse(page(data, False))

    base = "/v1/fine_tuning/jobs"
    return [Route(base, create, methods=["POST"]), Route(base, list_jobs, methods=["GET"]),
            Route(base + "/{job_id}", retrieve, methods=["GET"]),
            Route(base + "/{job_id}/cancel", cancel, methods=["POST"]),
            Route(base + "/{job_id}/events", events, methods=["GET"]),
            Route(base + "/{job_id}/checkpoints", checkpoints, methods=["GET"])]
