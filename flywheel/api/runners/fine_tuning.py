"""What a fine-tuning job runs: our trainer config from the platform's method, training in the
queue with periodic checkpoints and validation, and the resume of a paused or killed job.

* `supervised` / `dpo` / `reinforcement` train a LoRA adapter with `flywheel.train` (TRL's
  SFTTrainer / DPOTrainer / GRPOTrainer; RFT's reward is the job's grader). The platform's
  hyper-parameters map onto `SFTSpec` / `DPOSpec` / `RFTSpec`: `n_epochs` -> epochs, `batch_size`,
  `learning_rate_multiplier` x our default learning rate, `beta`; for RFT `compute_multiplier`
  x 4 -> samples per prompt (num_generations, at least 2) and `eval_interval` -> steps between
  checkpoints. `reasoning_effort` and `eval_samples` are echoed, not used (no reasoning models).
* Every job saves a resumable checkpoint (adapter, optimiser, schedule, data position) about every
  10% of its steps (`schedule`); each is registered and listed by the job's `checkpoints`, the last
  three are kept (as the platform keeps the last three epochs'). The job's model is the last step.
* Every trainer log line is a `metrics` event (`train_loss`); cancel stops the trainer at its next step.
* `validation_file`, SFT / DPO: the trainer's loss over the whole file at every checkpoint (`valid_loss`
  metrics events; the checkpoint's metrics) and at the last step (`full_valid_loss` too). RFT: after
  training the adapter's greedy replies are graded: `full_valid_mean_reward`.
* Pause (and a server stopping) saves a checkpoint at the current step; resume, and a server
  restarted after a kill, continue the job's training job from its last saved step
  (`flywheel.train.run`, `resume=` the training job), so no finished step is trained again.

    config = job_train_config(job_row, rows=len(training_set), validation_path="valid.jsonl")
"""
from __future__ import annotations

import json
from typing import Any

import graders
from flywheel.api.jobs import JobContext, JobInterrupted, JobPaused
from flywheel.api.platform import fine_tuned_name, model_for
from flywheel.api.runners.eval_runs import local_turn
from flywheel.errors import FlywheelError
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.spec import parse_eval_spec
from flywheel.store import Checkpoint, Store, now
from flywheel.train.formats import RFT_RESERVED, chat_messages, load_training_file
from flywheel.train.methods import hosted_method
from flywheel.train.run import TrainRequest, resume_point, run
from flywheel.train.validation import prune_checkpoints

RFT_MAX_TOKENS = 64  # completion length while sampling RFT groups (the platform has no such knob)


def _auto(hp: dict[str, Any], name: str) -> bool:
    return hp.get(name, "auto") == "auto"


def job_method(row: dict[str, Any]):
    """The flywheel.train.methods row of a job (its `method.type` is the platform's name)."""
    return hosted_method(json.loads(row["method_json"])["type"])


def train_config(row: dict[str, Any]):
    """Our SFTSpec / DPOSpec / RFTSpec (the method's config) for a job row (its `method_json`, `seed`)."""
    method = json.loads(row["method_json"])
    hp = method[method["type"]]["hyperparameters"]
    chosen = job_method(row)
    cls = chosen.config
    defaults = cls()
    extra: dict[str, Any] = {}
    if "beta" in chosen.hosted_hyperparameters and not _auto(hp, "beta"):
        extra["beta"] = float(hp["beta"])
    if chosen.grader_rewards:
        extra["max_completion_length"] = RFT_MAX_TOKENS
        if not _auto(hp, "compute_multiplier"):
            extra["num_generations"] = max(2, round(4 * float(hp["compute_multiplier"])))
    return cls(
        epochs=defaults.epochs if _auto(hp, "n_epochs") else float(hp["n_epochs"]),
        batch_size=defaults.batch_size if _auto(hp, "batch_size") else int(hp["batch_size"]),
        learning_rate=defaults.learning_rate * (1.0 if _auto(hp, "learning_rate_multiplier")
                                                else float(hp["learning_rate_multiplier"])),
        seed=row["seed"] or 0, logging_steps=1, **extra)


SAVE_FRACTION = 10  # checkpoints (and validation) about every 1/10 of the steps
KEEP_CHECKPOINTS = 3  # the platform keeps the last three epochs' checkpoints


def schedule(config, rows: int) -> int:
    """Steps between checkpoints (and validation points): about a tenth of the job's steps, at least 1.

    The job's steps are estimated as the Trainer counts them on one device: ceil(epochs x
    ceil(rows / examples per step)) (RFT: prompts per step)."""
    import math

    per_step = config.batch_size * config.grad_accum
    total = config.max_steps or math.ceil(config.epochs * math.ceil(max(rows, 1) / per_step))
    return max(1, total // SAVE_FRACTION)


def job_train_config(row: dict[str, Any], *, rows: int, validation_path: str | None = None):
    """`train_config` plus what running in the queue needs: resumable checkpoints every `schedule`
    steps (RFT: every `eval_interval` when given), kept until the job prunes them, and for SFT / DPO
    with a validation file its loss at each of them."""
    config = train_config(row)
    method = json.loads(row["method_json"])
    hp = method[method["type"]]["hyperparameters"]
    chosen = job_method(row)
    every = schedule(config, rows)
    if "eval_interval" in chosen.hosted_hyperparameters and not _auto(hp, "eval_interval"):
        every = int(hp["eval_interval"])
    update: dict[str, Any] = {"save_steps": every, "keep": "all"}
    if validation_path and chosen.validation_loss:  # GRPO has no validation loss
        update.update(eval_steps=every, validation_file=validation_path)
    return config.model_copy(update=update)


def job_spec(row: dict[str, Any], base: str, data_path: str):
    """The eval spec `run_local` wants: RFT's reward grader lives there; SFT / DPO jobs do not evaluate."""
    grader = job_grader(row) or {
        "type": "string_check", "name": "none", "input": "-", "reference": "-", "operation": "eq"}
    return parse_eval_spec({"name": f"api-{row['id']}", "dataset": {"path": data_path},
                            "input": [{"role": "user", "content": "-"}], "model": base,
                            "sampling": {"max_tokens": RFT_MAX_TOKENS}, "graders": [grader]})


def job_grader(row: dict[str, Any]) -> dict[str, Any] | None:
    """The grader of a job whose method trains on grader rewards (RFT), else None."""
    method = json.loads(row["method_json"])
    return (method.get(method["type"]) or {}).get("grader")


def platform_rewards(data: dict[str, Any], grader: dict[str, Any] | None) -> dict[str, Any]:
    """TRL's GRPO log (`reward`, `rewards/<name>/mean`) with the platform's RFT metric names added:
    `train_mean_reward` and `scores: {train_reward_mean, graders: [{name, type, train_reward_mean}]}`."""
    if grader is None or not isinstance(data.get("reward"), float):
        return data
    name = grader.get("name")
    mean = data.get(f"rewards/{name}/mean", data["reward"])
    return {**data, "train_mean_reward": data["reward"], "scores": {
        "train_reward_mean": data["reward"],
        "graders": [{"name": name, "type": grader.get("type"), "train_reward_mean": mean}]}}


def _watch(ctx: JobContext, grader: dict[str, Any] | None = None):
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Metrics become job events; cancel stops at the next step; pause (or the server stopping) saves a checkpoint at this step, then stops."""

        pending: Exception | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            data = {"step": state.global_step, "total_steps": state.max_steps}
            if "eval_loss" in numbers:  # the validation file's loss, at a checkpoint
                data["valid_loss"] = numbers["eval_loss"]
                if state.global_step >= state.max_steps:
                    data["full_valid_loss"] = numbers["eval_loss"]
            else:
                data.update(numbers)
                if "loss" in numbers:
                    data["train_loss"] = numbers["loss"]
            shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k not in ("step", "total_steps"))
            ctx.event(f"Step {data['step']}/{data['total_steps']}: {shown}", type="metrics",
                      data=platform_rewards(data, grader))

        def on_step_end(self, args, state, control, **kwargs):
            try:
                ctx.check()
            except (JobPaused, JobInterrupted) as exc:
                if isinstance(exc, JobPaused):
                    ctx.store.api_update("api_fine_tuning_jobs", ctx.job["object_id"], resume_json=json.dumps(
                        {"step": state.global_step, "total_steps": state.max_steps}))
                self.pending = exc
                control.should_save = True  # a resumable checkpoint at this step; on_save stops the job
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if self.pending is not None:
                raise self.pending

    return Watch()


def rft_validation_metrics(model_ref: str, validation_set, spec) -> dict:
    """The RFT adapter on the whole validation file: the grader's mean score of its greedy replies
    (`full_valid_mean_reward`)."""
    model = load_model(model_ref)
    try:
        greedy = Sampling(max_tokens=RFT_MAX_TOKENS)
        requests = [ChatRequest(messages=chat_messages(row["messages"]), sampling=greedy)
                    for row in validation_set.rows]
        replies = model.generate(requests)
    finally:
        model.close()
    scores = []
    for row, reply in zip(validation_set.rows, replies):
        item = {k: v for k, v in row.items() if k not in RFT_RESERVED}
        scores.append(float(graders.run_grader(spec.graders[0], reply.text or "", item)["reward"]))
    mean = sum(scores) / len(scores)
    return {"full_valid_mean_reward": mean, "valid_reward_mean": mean, "valid_rows": len(scores)}


def final_checkpoint(store: Store, training_job_id: str) -> Checkpoint:
    """The last step's checkpoint of a training job (the job's model, as on the platform)."""
    checkpoints = store.job_checkpoints(training_job_id)
    if not checkpoints:
        raise FlywheelError(f"training job {training_job_id} registered no checkpoint")
    return max(checkpoints, key=lambda c: (c.step or 0, c.created_at or ""))


def discard_training_folder(store: Store, training_job_id: str | None) -> None:
    """Delete a cancelled or failed job's resumable trainer state (the API never resumes it); its
    registered checkpoints stay."""
    import shutil

    if not training_job_id:
        return
    try:
        folder = store.get_training_job(training_job_id).output_dir
    except FlywheelError:
        return
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def trained_tokens(metrics: dict[str, Any]) -> int:
    """A job's `trained_tokens` as the platform counts them: the set's tokens times the epochs trained
    (a checkpoint's `tokens` is one pass over the set; `epochs` the passes made, fractional when
    max_steps stopped mid-epoch)."""
    per_epoch = metrics.get("tokens") or metrics.get("train_tokens") or 0
    return int(round(per_epoch * (metrics.get("epochs") or 1)))


class FineTuningRunner:
    """Runs `fine_tuning` jobs with the local trainers."""

    def run(self, ctx: JobContext) -> None:
        store = ctx.store
        row = store.api_get("api_fine_tuning_jobs", ctx.job["object_id"])
        files = {name: store.api_get("api_files", row[name]) if row[name] else None
                 for name in ("training_file", "validation_file")}
        for name, file_row in files.items():
            if row[name] and file_row is None:
                raise FlywheelError(f"{name} {row[name]} was deleted")
        method = job_method(row)
        training_set = load_training_file(method.name, files["training_file"]["path"])
        validation_path = files["validation_file"]["path"] if files["validation_file"] else None
        config = job_train_config(row, rows=len(training_set), validation_path=validation_path)
        base = model_for(store, row["model"], row.get("project") or "default")
        # RESUME_HOOK: a paused job, or one killed with the server, continues its own training job
        # from the last step it saved (the trainer's optimiser, schedule and data position).
        point = resume_point(store, row.get("training_job_id"))
        if point is not None and not point.finished and point.step is None:  # killed before its first saved step
            store.update_training_job(point.job_id, status="failed", error="killed before its first saved step; "
                                      f"API job {row['id']} trains a new job")
            store.api_update("api_fine_tuning_jobs", row["id"], training_job_id=None)  # its status is no longer ours
            point = None
        ctx.event(f"Fine-tuning job resumed from step {point.step}." if point and point.resumable else
                  "Fine-tuning job started." if ctx.job["attempts"] == 1 and point is None else
                  "Fine-tuning job restarted.")
        spec = job_spec(row, base, files["training_file"]["path"])
        grader = job_grader(row)

        with local_turn(store):  # local training and local eval runs take turns on the cores
            if point is not None and point.finished:  # it finished training; the job's record did not
                training_job_id = point.job_id
            else:
                # VALIDATION_HOOK: the validation file (config.validation_file) is the trainer's eval set;
                # its loss at every checkpoint is a `valid_loss` metrics event (the last one `full_valid_loss`).
                result = run(TrainRequest(
                    method=method.name, spec=spec, store=store, base=base, config=config, data=training_set,
                    resume=point.job_id if point else None, evaluate=False, check_data=False, fresh=True,
                    quiet=True, callbacks=[_watch(ctx, grader)],
                    on_job=lambda job_id: store.api_update("api_fine_tuning_jobs", row["id"],
                                                           training_job_id=job_id)))
                training_job_id = result.job_id
            final = final_checkpoint(store, training_job_id)
            stored = dict(final.metrics)
            found: dict[str, Any] = {}
            if validation_path and method.validation_loss and stored.get("valid_loss") is not None:
                found = {"full_valid_loss": stored["valid_loss"]}
            elif validation_path and not method.validation_loss:
                ctx.event("Scoring the adapter on the validation file.")
                found = rft_validation_metrics(final.model_ref, load_training_file(method.name, validation_path),
                                               spec)
                step_now = final.step or 0
                shown = ", ".join(f"{k}={v:.4g}" for k, v in found.items() if k != "valid_rows")
                ctx.event(f"Step {step_now}/{step_now}: {shown}", type="metrics", data={
                    "step": step_now, "total_steps": step_now, **found, "scores": {
                        "valid_reward_mean": found["valid_reward_mean"], "graders": [
                            {"name": grader.get("name"), "type": grader.get("type"),
                             "valid_reward_mean": found["valid_reward_mean"]}]}})
            stored.update(found)
            store.update_checkpoint(final.id, metrics_json=json.dumps(stored, default=str))
        prune_checkpoints(store, [c for c in store.job_checkpoints(training_job_id) if not c.pruned_at],
                          str(KEEP_CHECKPOINTS), latest=True)
        metrics = {k: stored.get(k) for k in ("train_loss", "last_loss", "steps", "mean_reward", "valid_loss",
                                              "full_valid_loss", "full_valid_mean_reward", "valid_reward_mean",
                                              "valid_rows", "resumed_from_step")
                   if stored.get(k) is not None}
        fine_tuned = fine_tuned_name(row, base)
        store.api_update("api_fine_tuning_jobs", row["id"], fine_tuned_model=fine_tuned, checkpoint_id=final.id,
                         training_job_id=training_job_id, metrics_json=json.dumps(metrics),
                         trained_tokens=trained_tokens(stored))
        ctx.event(f"New fine-tuned model created: {fine_tuned}", data={"checkpoint": final.id,
                                                                          "model_ref": final.model_ref})

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        row = store.api_get("api_fine_tuning_jobs", job["object_id"])
        if row is None:
            return
        if status == "paused":
            resume = json.loads(row["resume_json"]) if row.get("resume_json") else {}
            store.set_fine_tuning_status(row["id"], "paused")
            where = f" at step {resume['step']}/{resume['total_steps']}" if resume else ""
            store.add_api_event(row["id"], f"The job was paused{where}; resume continues from there.")
            return
        if status != "succeeded":  # the trainer stopped (cancel) or failed: the training job says so
            store.set_fine_tuning_status(row["id"], status, error)
        fields: dict[str, Any] = {"finished_at": now()}
        if error:
            fields["error_json"] = json.dumps({"code": "training_failed", "message": error, "param": None})
        store.api_update("api_fine_tuning_jobs", row["id"], **fields)
        if status != "succeeded":
            discard_training_folder(store, row.get("training_job_id"))
        message = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled.",
                   "failed": f"The job failed: {error}"}[status]
        store.add_api_event(row["id"], message, level="error" if status == "failed" else "info")
