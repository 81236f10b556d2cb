"""What a fine-tuning job runs: our trainer config from the platform's method, training in the
queue, validation metrics, and the adapter a pause leaves to resume from.

* `supervised` / `dpo` / `reinforcement` train a LoRA adapter with `flywheel.train` (TRL's
  SFTTrainer / DPOTrainer / GRPOTrainer; RFT's reward is the job's grader). The platform's
  hyper-parameters map onto `SFTSpec` / `DPOSpec` / `RFTSpec`: `n_epochs` -> epochs, `batch_size`,
  `learning_rate_multiplier` x our default learning rate, `beta`; for RFT `compute_multiplier`
  x 4 -> samples per prompt (num_generations, at least 2). `reasoning_effort`, `eval_interval` and
  `eval_samples` are echoed, not used (no reasoning models; validation runs once, at the end).
* Every trainer log line is a `metrics` event; cancel stops the trainer at its next step.
* `validation_file`: after training, the adapter is scored on the whole file and the job's
  metrics (and its checkpoint's) get `valid_loss` = `full_valid_loss` (SFT / DPO: the trainer's own
  loss over the file) or `full_valid_mean_reward` (RFT: the grader's mean score of greedy replies).
* Pause stops at the next step and saves the adapter there; resume continues from that adapter
  for the remaining steps (the optimiser state and data order start afresh: an honest
  approximation until `flywheel.train.local` offers a trainer-state resume — see RESUME_HOOK).

    config = train_config(job_row)           # SFTSpec / DPOSpec / RFTSpec
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.api.eval_runs import local_turn
from flywheel.api.jobs import JobContext, JobPaused, unix_now
from flywheel.errors import FlywheelError
from flywheel.store import Store

# method type -> our training-set kind
KINDS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "rft"}
RFT_MAX_TOKENS = 64  # completion length while sampling RFT groups (the platform has no such knob)


def _auto(hp: dict[str, Any], name: str) -> bool:
    return hp.get(name, "auto") == "auto"


def train_config(row: dict[str, Any]):
    """Our SFTSpec / DPOSpec / RFTSpec for a job row (its `method_json`, `seed`)."""
    from flywheel.train.config import DPOSpec, RFTSpec, SFTSpec

    method = json.loads(row["method_json"])
    hp = method[method["type"]]["hyperparameters"]
    cls = {"supervised": SFTSpec, "dpo": DPOSpec, "reinforcement": RFTSpec}[method["type"]]
    defaults = cls()
    extra: dict[str, Any] = {}
    if method["type"] == "dpo" and not _auto(hp, "beta"):
        extra["beta"] = float(hp["beta"])
    if method["type"] == "reinforcement":
        extra["max_completion_length"] = RFT_MAX_TOKENS
        if not _auto(hp, "compute_multiplier"):
            extra["num_generations"] = max(2, round(4 * float(hp["compute_multiplier"])))
    return cls(
        epochs=defaults.epochs if _auto(hp, "n_epochs") else float(hp["n_epochs"]),
        batch_size=defaults.batch_size if _auto(hp, "batch_size") else int(hp["batch_size"]),
        learning_rate=defaults.learning_rate * (1.0 if _auto(hp, "learning_rate_multiplier")
                                                else float(hp["learning_rate_multiplier"])),
        seed=row["seed"] or 0, logging_steps=1, **extra)


def job_spec(row: dict[str, Any], base: str, data_path: str):
    """The eval spec `run_local` wants: RFT's reward grader lives there; SFT / DPO jobs do not evaluate."""
    from flywheel.spec import parse_eval_spec

    method = json.loads(row["method_json"])
    grader = method.get("reinforcement", {}).get("grader") or {
        "type": "string_check", "name": "none", "input": "-", "reference": "-", "operation": "eq"}
    return parse_eval_spec({"name": f"api-{row['id']}", "dataset": {"path": data_path},
                            "input": [{"role": "user", "content": "-"}], "model": base,
                            "sampling": {"max_tokens": RFT_MAX_TOKENS}, "graders": [grader]})


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


def _watch(ctx: JobContext, pause_dir: Path, offset: int, total: int | None, grader: dict[str, Any] | None = None):
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Metrics become job events; cancel stops at the next step; pause saves the adapter there."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                data = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                data["step"] = offset + state.global_step
                steps = total or state.max_steps
                shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k != "step")
                ctx.event(f"Step {data['step']}/{steps}: {shown}", type="metrics",
                          data=platform_rewards({**data, "total_steps": steps}, grader))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            try:
                ctx.check()
            except JobPaused:
                pause_dir.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(str(pause_dir), selected_adapters=["default"])
                ctx.store.api_update("api_fine_tuning_jobs", ctx.job["object_id"], resume_json=json.dumps(
                    {"step": offset + state.global_step, "total_steps": total or state.max_steps,
                     "adapter": str(pause_dir)}))
                raise

    return Watch()


def validation_metrics(kind: str, builder, config, model_ref: str, validation_set, spec, scratch: Path) -> dict:
    """The adapter scored on the whole validation file: SFT / DPO `valid_loss` (the trainer's loss),
    RFT `full_valid_mean_reward` (the grader's mean score of greedy replies)."""
    import tempfile

    if kind == "rft":
        import graders

        from flywheel.models import ChatRequest, Sampling, load_model
        from flywheel.train.formats import RFT_RESERVED, chat_messages

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
    from flywheel.train.config import resolve_bf16
    from flywheel.train.local import load_for_training

    bf16 = resolve_bf16(config.precision)
    model, tokenizer, _, _ = load_for_training(model_ref, bf16=bf16)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        built = builder(model, tokenizer, validation_set, config, Path(folder), bf16=bf16, quiet=True)
        try:
            found = built.trainer.evaluate(eval_dataset=built.trainer.train_dataset)
        finally:
            built.close()
    loss = float(found["eval_loss"])
    return {"valid_loss": loss, "full_valid_loss": loss, "valid_rows": len(validation_set)}


def fine_tuned_name(row: dict[str, Any], base: str) -> str:
    """`ft:<base>:<suffix>:<job>` as the platform names a tuned model."""
    short = row["id"].removeprefix("ftjob-")[:8]
    name = Path(base.partition(":")[2].partition("+")[0]).name or "model"
    return f"ft:{name}:{row['suffix'] or 'flywheel'}:{short}"


class FineTuningRunner:
    """Runs `fine_tuning` jobs with the local trainers."""

    def run(self, ctx: JobContext) -> None:
        from flywheel.api.fine_tuning import model_for
        from flywheel.train.dpo import build_dpo_trainer
        from flywheel.train.formats import load_training_file
        from flywheel.train.local import run_local
        from flywheel.train.rft import build_rft_trainer
        from flywheel.train.sft import build_sft_trainer

        store = ctx.store
        row = store.api_get("api_fine_tuning_jobs", ctx.job["object_id"])
        files = {name: store.api_get("api_files", row[name]) if row[name] else None
                 for name in ("training_file", "validation_file")}
        for name, file_row in files.items():
            if row[name] and file_row is None:
                raise FlywheelError(f"{name} {row[name]} was deleted")
        resume = json.loads(row["resume_json"]) if row.get("resume_json") else None
        store.api_update("api_fine_tuning_jobs", row["id"], status="running")
        ctx.event(f"Fine-tuning job resumed from step {resume['step']}." if resume else
                  "Fine-tuning job started." if ctx.job["attempts"] == 1 else "Fine-tuning job restarted.")
        method_type = json.loads(row["method_json"])["type"]
        kind = KINDS[method_type]
        builder = {"sft": build_sft_trainer, "dpo": build_dpo_trainer, "rft": build_rft_trainer}[kind]
        training_set = load_training_file(kind, files["training_file"]["path"])
        config = train_config(row)
        base = model_for(store, row["model"], row.get("project") or "default")
        start = base
        offset, total = 0, None
        if resume:
            # Continue the adapter saved at the pause for the steps that were left.
            start = f"{base.partition('+')[0]}+{resume['adapter']}"
            offset, total = resume["step"], resume["total_steps"]
            config = config.model_copy(update={"max_steps": max(1, total - offset)})
        # RESUME_HOOK: a job killed with the server trains again from `start`. When
        # flywheel.train.local can resume a Trainer from its own periodic checkpoints (the
        # `validate` work), pass the job's checkpoint folder here instead of starting over.
        spec = job_spec(row, base, files["training_file"]["path"])
        pause_dir = store.artefact_dir / "api" / "paused" / row["id"] / f"attempt-{ctx.job['attempts']}"
        extra = {"spec": spec} if kind == "rft" else {}
        grader = json.loads(row["method_json"]).get("reinforcement", {}).get("grader")

        def build(model, tokenizer, output_dir, bf16):
            built = builder(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=True, **extra)
            built.trainer.add_callback(_watch(ctx, pause_dir, offset, total, grader))
            return built

        with local_turn(store):  # local training and local eval runs take turns on the cores
            result = run_local(kind, spec, store, training_set, base=start, config=config, build=build,
                               evaluate=False, quiet=True)
            metrics = {k: result.metrics.get(k) for k in ("train_loss", "last_loss", "steps", "mean_reward")
                       if result.metrics.get(k) is not None}
            # VALIDATION_HOOK: when flywheel.train.local takes an eval dataset (validation during
            # training, the `validate` work), pass the validation set to run_local here and report its
            # periodic `valid_loss` per step; until then the finished adapter is scored once, below.
            if files["validation_file"]:
                ctx.event("Scoring the adapter on the validation file.")
                validation_set = load_training_file(kind, files["validation_file"]["path"])
                found = validation_metrics(kind, builder, config, result.checkpoint.model_ref, validation_set, spec,
                                           store.artefact_dir / "tmp")
                metrics.update(found)
                step = offset + int(result.metrics.get("steps") or 0)
                shown = ", ".join(f"{k}={v:.4g}" for k, v in found.items() if k != "valid_rows")
                data = {"step": step, "total_steps": total or step, **found}
                if kind == "rft":
                    data["scores"] = {"valid_reward_mean": found["valid_reward_mean"], "graders": [
                        {"name": grader.get("name"), "type": grader.get("type"),
                         "valid_reward_mean": found["valid_reward_mean"]}]}
                ctx.event(f"Step {step}/{total or step}: {shown}", type="metrics", data=data)
                checkpoint = store.get_checkpoint(result.checkpoint.id)
                stored = json.loads(checkpoint.get("metrics_json") or "{}")
                store.update_checkpoint(result.checkpoint.id, metrics_json=json.dumps({**stored, **found}))
        fine_tuned = fine_tuned_name(row, base)
        store.api_update("api_fine_tuning_jobs", row["id"], fine_tuned_model=fine_tuned,
                         checkpoint_id=result.checkpoint.id, metrics_json=json.dumps(metrics),
                         trained_tokens=int(result.metrics.get("tokens") or result.metrics.get("train_tokens") or 0))
        ctx.event(f"New fine-tuned model created: {fine_tuned}", data={"checkpoint": result.checkpoint.id,
                                                                          "model_ref": result.checkpoint.model_ref})

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        row = store.api_get("api_fine_tuning_jobs", job["object_id"])
        if row is None:
            return
        if status == "paused":
            resume = json.loads(row["resume_json"]) if row.get("resume_json") else {}
            store.api_update("api_fine_tuning_jobs", row["id"], status="paused")
            where = f" at step {resume['step']}/{resume['total_steps']}" if resume else ""
            store.add_api_event(row["id"], f"The job was paused{where}; resume continues from there.",
                                created_at=unix_now())
            return
        fields: dict[str, Any] = {"status": status, "finished_at": unix_now()}
        if error:
            fields["error_json"] = json.dumps({"code": "training_failed", "message": error, "param": None})
        store.api_update("api_fine_tuning_jobs", row["id"], **fields)
        message = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled.",
                   "failed": f"The job failed: {error}"}[status]
        store.add_api_event(row["id"], message, created_at=unix_now(),
                            level="error" if status == "failed" else "info")
