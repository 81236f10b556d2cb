"""What every local training method shares: load the base (+adapter), record the job and its logs,
train, register the adapter, and evaluate it with the harness against its parent.

`sft.py`, `dpo.py` and `rft.py` each build one TRL trainer; `run_local` does the rest:

    result = run_local("sft", spec, store, training_set, base="local:smollm2", config=cfg, build=build)
    result.checkpoint.model_ref    # local:smollm2+.flywheel/ckpt/sft-...
    result.evals                   # valid and test: score, CI, paired difference vs the base

Under `accelerate launch` (several GPUs) every process trains; only the main process writes the
store, saves the adapter and evaluates.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError, TrainingError
from flywheel.harness import item_scores, run_eval
from flywheel.models import load_model, parse_model_ref
from flywheel.models.loading import LocalWeights, load_adapters, load_base
from flywheel.models.memory import release_memory
from flywheel.promotion import describe_test, significantly_better
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.stats import paired_stats
from flywheel.store import Checkpoint, Store
from flywheel.train.checkpoints import resolve_base
from flywheel.train.config import LoraSpec, TrainConfig, quantization_config, resolve_bf16
from flywheel.train.datachecks import preflight
from flywheel.train.formats import TrainingSet
from flywheel.train.launch import is_main_process
from flywheel.train.sets import record_training_set
from flywheel.train.validation import (JobValidation, Monitor, broadcast, copy_adapter, last_saved_step, lock_job_folder,
                                       saved_steps, training_prompt)


@dataclass
class BuiltTrainer:
    """What a method's `build` returns: the TRL trainer, statistics to record with the job's metrics,
    and what to release after training (e.g. the RFT reward graders' sandboxes and judges)."""

    trainer: Any
    stats: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


@dataclass
class SplitEval:
    """A checkpoint measured on one split, paired with its parent model on the same items."""

    split: str
    iteration_id: str
    parent_iteration_id: str
    n: int
    score: float
    ci: tuple[float, float]
    parent_score: float
    diff: float
    diff_ci: tuple[float, float]
    p_mcnemar: float
    improvements: int
    regressions: int
    decision: str


@dataclass
class TrainResult:
    method: str
    checkpoint: Checkpoint
    job_id: str
    training_set_id: str
    metrics: dict[str, Any]
    evals: list[SplitEval] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # every step saved: losses, score, kept
    best_reason: str | None = None  # why `checkpoint` is the best of them
    stop_reason: str | None = None  # early stopping or a monitor (None: the schedule ended)
    reused: bool = False  # an identical earlier job's checkpoint, not trained again (flywheel.train.run)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainResult":
        """The result `to_dict` wrote (e.g. by flywheel.train.worker's main process)."""
        ci = ("ci", "diff_ci")
        evals = [SplitEval(**{k: tuple(v) if k in ci else v for k, v in e.items()}) for e in data.get("evals") or []]
        return cls(**{**data, "checkpoint": Checkpoint(**data["checkpoint"]), "evals": evals})

    def summary_lines(self) -> list[str]:
        """What `flywheel train` prints: the checkpoint, the loss, and each split against the parent."""
        m = self.metrics
        lines = [f"{self.method} checkpoint {self.checkpoint.id}: {self.checkpoint.model_ref}",
                 f"  trained on {self.training_set_id} ({m.get('rows', '?')} rows)"
                 + (f", {m['steps']} steps in {m['wall_s']:.0f}s" if m.get("wall_s") else "")
                 + (f", loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}" if m.get("first_loss") is not None
                    and m.get("last_loss") is not None else "")]
        if self.stop_reason:
            lines.append(f"  stopped: {self.stop_reason}")
        if len(self.checkpoints) > 1 or any(c.get("valid_loss") is not None or c.get("valid_score") is not None
                                            for c in self.checkpoints):
            lines.append(f"  checkpoints (best: {self.best_reason}):")
            for c in self.checkpoints:
                parts = [f"{name} {c[key]:.4g}" for key, name in (("train_loss", "train loss"),
                         ("valid_loss", "valid loss"), ("valid_score", "valid score")) if c.get(key) is not None]
                mark = "*" if c["best"] else " "
                lines.append(f"   {mark} {c['id']} step {c['step']}: " + (", ".join(parts) or "not measured")
                             + ("" if c["kept"] else " (folder pruned)"))
        for e in self.evals:
            lines.append(f"  {e.split:<5} {e.score:.3f} [{e.ci[0]:.3f}, {e.ci[1]:.3f}] vs parent {e.parent_score:.3f}:"
                         f" diff {e.diff:+.3f} [{e.diff_ci[0]:+.3f}, {e.diff_ci[1]:+.3f}], McNemar p={e.p_mcnemar:.3g}"
                         f" ({e.improvements} up, {e.regressions} down) -> {e.decision}")
        if self.evals:
            lines.append(f"  report: flywheel report {self.checkpoint.id} -o report.html")
        return lines


# -- loading ---------------------------------------------------------------------------------------
def load_for_training(base_ref: str, *, bf16: bool, quantize: str | None = None):
    """(model, tokenizer or processor) of a `local:` ref for LoRA training, through the one loader
    (flywheel.models.loading): a `local:BASE+ADAPTER` reference continues training that adapter
    (checked against BASE); the frozen base weights are loaded in bf16 when training in bf16 (the
    LoRA weights stay fp32), or in 4-bit on the GPU with `quantize` (QLoRA)."""
    scheme, name, adapter = parse_model_ref(base_ref)
    if scheme != "local":
        raise TrainingError(f"{base_ref}: local training needs a local: model (openai: models train with the "
                            "hosted backend)")
    weights = LocalWeights.of(base_ref, name, adapter)
    _ = weights.adapter  # a combination of adapters cannot train on: refused before anything loads
    quantization = device_map = None
    if quantize:  # QLoRA: the frozen base in 4-bit on the GPU (flywheel.train.config.require_quantization)
        import torch

        quantization = quantization_config(LoraSpec(quantize_base=quantize), bf16)
        device_map = {"": torch.cuda.current_device()}
    model, processor = load_base(weights, dtype="bf16" if bf16 else "fp32", quantization=quantization,
                                 device_map=device_map)
    return load_adapters(weights, model, trainable=True), processor


def _event_logger(store: Store, job_id: str, history: list[dict[str, Any]]):
    from transformers import TrainerCallback

    class EventLogger(TrainerCallback):
        """Every trainer log line becomes a `metrics` event of the job (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            data = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()}
            data["step"] = state.global_step
            history.append(data)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if isinstance(v, float) and k != "step")
            store.add_training_events(job_id, [{"type": "metrics", "message": f"step {state.global_step}: {shown}",
                                                "data": data}])

    return EventLogger()


def _progress_bar(method: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc=f"train {method}", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "reward") if isinstance(logs.get(k), (int, float))}
                if shown:
                    self.bar.set_postfix(shown)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Bar()


def step_reporter(on_step: Callable[[int, int, float | None], None]):
    """A transformers `TrainerCallback` telling `on_step(step, max_steps, latest loss)` after each
    optimiser step (main process only): the progress callback a caller of `flywheel.train.run`
    passes in `TrainRequest.callbacks` (the wheel's live view)."""
    from transformers import TrainerCallback

    class StepReporter(TrainerCallback):
        loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The trainer logs a step's loss after that step's on_step_end: report it when it comes.
            if logs and isinstance(logs.get("loss"), (int, float)) and state.is_world_process_zero:
                self.loss = float(logs["loss"])
                on_step(state.global_step, state.max_steps, self.loss)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                on_step(state.global_step, state.max_steps, self.loss)

    return StepReporter()


def _adapter_weights(model) -> dict[str, Any]:
    return {name: param.detach().float().clone() for name, param in model.named_parameters()
            if "lora_" in name and ".default." in name}


def _summarise_history(history: list[dict[str, Any]], loss_key: str) -> dict[str, Any]:
    losses = [h[loss_key] for h in history if isinstance(h.get(loss_key), float)]
    rewards = [h["reward"] for h in history if isinstance(h.get("reward"), float)]  # GRPO: mean group reward
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    out = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "train_loss": final.get("train_loss"), "runtime_s": final.get("train_runtime"),
           "steps": max((h.get("step", 0) for h in history), default=0), "logged": len(losses),
           # passes over the set (fractional when max_steps stops mid-epoch): trained tokens count them all
           "epochs": max((h["epoch"] for h in history if isinstance(h.get("epoch"), float)), default=None)}
    if rewards:
        out.update(first_reward=rewards[0], last_reward=rewards[-1], mean_reward=sum(rewards) / len(rewards))
    return out


# -- the run ---------------------------------------------------------------------------------------
def _job(store: Store, method: str, training_set: TrainingSet, base_ref: str, config: TrainConfig,
         resume: str | None, fresh: bool = False) -> tuple[str, tuple[int, Path] | None, Any]:
    """(job id, (step, trainer checkpoint folder) to resume from or None, the job folder's lock) on
    the main process.

    `resume` names a job to continue; otherwise, with `save_steps`, an unfinished job of the same
    method, set, base and config (killed part-way: its folder is not locked by a live process) is
    resumed (unless `fresh`); else a new job is created."""

    config_json = config.model_dump_json()
    if resume:
        try:
            job = store.get_training_job(resume)
        except FlywheelError as exc:
            raise TrainingError(str(exc)) from None
        if job.backend != "local" or job.method != method:
            raise TrainingError(f"job {resume} is a {job.backend} {job.method} job, not a local {method} job")
        if job.status == "succeeded":
            raise TrainingError(f"job {resume} already finished: its checkpoint is {job.checkpoint_id}")
        if job.training_set_id != training_set.id or job.config_json != config_json:
            raise TrainingError(f"job {resume} was trained on {job.training_set_id} with another config; resume it "
                                "with its own (flywheel train METHOD SPEC --resume JOB, without --data or -s)")
        saved = last_saved_step(job.output_dir)
        if saved is None:
            raise TrainingError(f"job {resume}: no saved step to resume from in {job.output_dir} (a job is "
                                "resumable when it trains with save_steps)")
        lock = lock_job_folder(job.output_dir)
        if lock is None:
            raise TrainingError(f"job {resume} is still training in another process; wait for it, or stop it first")
        return resume, saved, lock
    if config.save_steps and not fresh:
        job = store.find_resumable_job(method=method, training_set_id=training_set.id or "", base_model=base_ref,
                                       config_json=config_json)
        saved = last_saved_step(job.output_dir) if job else None
        if job and saved:
            lock = lock_job_folder(job.output_dir)
            if lock is not None:  # else it is alive in another process: train a job of our own
                return job.id, saved, lock
    job_id = store.create_training_job(backend="local", method=method, training_set_id=training_set.id,
                                       base_model=base_ref, config_json=config_json)
    lock = None
    if config.save_steps:
        folder = store.artefact_dir / "jobs" / job_id
        store.update_training_job(job_id, output_dir=str(folder))
        lock = lock_job_folder(folder)
    return job_id, None, lock


def _earlier_history(store: Store, job_id: str, up_to_step: int) -> list[dict[str, Any]]:
    """The metrics a resumed job logged before the step it resumes from."""
    out = []
    for event in store.training_events(job_id):
        if event["type"] == "metrics" and event["data_json"]:
            data = json.loads(event["data_json"])
            if data.get("step", 0) <= up_to_step and "train_runtime" not in data:
                out.append(data)
    return out


def run_local(method: str, spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
              config: TrainConfig, build: Callable[..., Any], evaluate: bool = True,
              splits: Sequence[str] = ("valid", "test"), quiet: bool = False,
              loss_key: str = "loss", prompt: Prompt | None = None, monitor: Monitor | None = None,
              resume: str | None = None, callbacks: Sequence[Any] = (), fresh: bool = False,
              on_job: Callable[[str], None] | None = None) -> TrainResult | None:
    """Train with the `BuiltTrainer` that `build(model, tokenizer, output_dir, bf16)` returns, then
    register, choose the best checkpoint and evaluate it. Returns None on non-main processes.

    With `save_steps` a checkpoint is registered every N steps (flywheel.train.validation) and the
    job is resumable: `resume` (a job id), or the same call after a kill, continues from its last
    saved step with the trainer's optimizer, scheduler and data position. `monitor` sees every
    validation point and may stop the job (a search's pruner). `callbacks`: extra transformers
    `TrainerCallback`s added to the trainer (e.g. the search's pruning reporter,
    flywheel.train.search); an exception one raises fails the job and propagates. `fresh`: never pick
    up another unfinished job of the same inputs (a caller that tracks its own jobs, as the API does,
    resumes them by id). `on_job(job_id)`: called on the main process once the training job exists
    (or is resumed), before the model loads (the API links its fine-tuning job to it)."""

    preflight(config)  # trackers, QLoRA hardware: one clean error before anything is stored or loaded

    main = is_main_process()
    base_ref, parent_id = resolve_base(store, base)
    if main:
        record_training_set(store, training_set)
    job_id, saved, lock = _job(store, method, training_set, base_ref, config, resume, fresh) if main else ("", None, None)
    output_dir = str(store.artefact_dir / "jobs" / job_id) if main and config.save_steps else None
    job_id, saved, output_dir = broadcast((job_id, saved, output_dir))
    if main and on_job is not None:
        on_job(job_id)
    bf16 = resolve_bf16(config.precision)
    # transformers 5 warns about its own deprecated gradient-checkpointing names on every step
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    work = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=f"{method}-", dir=_scratch(store)))
    work.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    succeeded = False
    tracker = None
    try:
        if main and saved:
            history += _earlier_history(store, job_id, saved[0])
            store.update_training_job(job_id, status="running", error=None)
            store.add_training_events(job_id, [{"type": "resume", "message": f"resumed from step {saved[0]} ({saved[1]})",
                                                "data": {"from_step": saved[0], "folder": str(saved[1])}}])
        prompt = training_prompt(spec, store, training_set, prompt)
        base_model_ref = _without_adapter(base_ref)
        validation = JobValidation(store=store, job_id=job_id, method=method, spec=spec, config=config, prompt=prompt,
                                   base_model=base_model_ref, parent_id=parent_id, training_set=training_set,
                                   history=history, main=main, monitor=monitor,
                                   log=None if quiet else lambda message: print(message, file=sys.stderr))
        if saved and main:
            validation.replay(saved[0])
            # A kill between the trainer's save and its registration: register what is on disk.
            for step, folder in saved_steps(work):
                if step not in validation.registered_steps():
                    validation.register(step, lambda target, folder=folder: copy_adapter(folder, target))
        if quiet:
            import datasets

            datasets.disable_progress_bars()
        model, tokenizer = load_for_training(base_ref, bf16=bf16, quantize=config.lora.quantize_base)
        built: BuiltTrainer = build(model, tokenizer, work, bf16)
        trainer, extra = built.trainer, built.stats
        # The Trainer prints every log dict to stdout (with or without its bar): show one bar on
        # stderr with the latest loss instead; the logs themselves go to the store.
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if not quiet:
            trainer.add_callback(_progress_bar(method))
        if main:
            trainer.add_callback(_event_logger(store, job_id, history))
            from flywheel.tracking import tracking_callback

            tracker = tracking_callback(config, store, job_id, method=method, eval_name=spec.name)
            if tracker is not None:
                trainer.add_callback(tracker)
        trainer.add_callback(validation.callback())
        for callback in callbacks:
            trainer.add_callback(callback)
        before = _adapter_weights(trainer.model)
        started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(saved[1]) if saved else None)
        finally:
            built.close()
        wall = time.perf_counter() - started
        after = _adapter_weights(trainer.model)
        changed = sum(1 for k in before if not bool((before[k] == after.get(k, before[k])).all()))
        metrics = {**_summarise_history(history, loss_key), "wall_s": wall, "bf16": bf16,
                   "processes": trainer.accelerator.num_processes,
                   "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
                   "liger": bool(trainer.args.use_liger_kernel),
                   "adapter_tensors": len(before), "adapter_tensors_changed": changed,
                   "rows": len(training_set), **extra}
        if saved:
            metrics["resumed_from_step"] = saved[0]
        if metrics["last_loss"] is not None and not math.isfinite(metrics["last_loss"]):
            raise TrainingError(f"{method}: the loss diverged ({metrics['last_loss']}); lower learning_rate")

        def save(folder: Path) -> None:
            trainer.model.save_pretrained(str(folder), selected_adapters=["default"])

        final_step = trainer.state.global_step
        validation.register(final_step, save)  # unless the trainer saved this step already
        if not main:
            return None
        last = next(c for c in reversed(validation.checkpoints()) if c.step == final_step)
        # The run's summary joins the last checkpoint's own metrics (its train_loss is the loss logged at
        # its step, not the run's mean, which stays in the result's metrics).
        store.update_checkpoint(last.id, metrics_json=json.dumps({**metrics, **last.metrics}, default=str))
        checkpoint, best_reason, _ = validation.finish()
        succeeded = True
    except BaseException as exc:
        if tracker is not None:
            tracker.close(ok=False)
        if main and job_id:
            store.update_training_job(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if succeeded or not output_dir:  # a failed job keeps its folder: the same command resumes it
            shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            lock.close()
    trainer = model = built = None  # free the trained weights before evaluation loads models
    release_memory()  # and hand the freed heap back, so the evaluation does not stack on training's peak
    result = TrainResult(method=method, checkpoint=checkpoint, job_id=job_id, training_set_id=training_set.id or "",
                         metrics=metrics, checkpoints=_checkpoint_rows(validation.checkpoints(), checkpoint.id),
                         best_reason=best_reason, stop_reason=validation.stop_reason)
    if evaluate:
        result.evals = evaluate_checkpoint(spec, store, checkpoint, parent_ref=base_ref, splits=splits)
        result.checkpoint = store.get_checkpoint(checkpoint.id)  # with its evals
    return result


def _without_adapter(base_ref: str) -> str:
    """`local:BASE` of `local:BASE+ADAPTER` (the base a new adapter is registered on)."""
    scheme, name, _ = parse_model_ref(base_ref)
    return f"{scheme}:{name}"


def _checkpoint_rows(checkpoints: list[Checkpoint], best_id: str) -> list[dict[str, Any]]:
    return [{"id": c.id, "step": c.step, "train_loss": c.metrics.get("train_loss"),
             "valid_loss": c.metrics.get("valid_loss"), "valid_score": c.metrics.get("valid_score"),
             "kept": not c.pruned_at, "best": c.id == best_id, "model_ref": c.model_ref} for c in checkpoints]


def _scratch(store: Store) -> Path:
    folder = store.artefact_dir / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- evaluation ------------------------------------------------------------------------------------
def _local_options(spec: EvalSpec) -> dict[str, Any]:
    return dict(spec.model_options) if spec.model.startswith("local:") else {}


def evaluate_checkpoint(spec: EvalSpec, store: Store, checkpoint: Checkpoint, *, parent_ref: str,
                        splits: Sequence[str] = ("valid", "test"), progress=None,
                        model_options: dict[str, Any] | None = None) -> list[SplitEval]:
    """Evaluate a checkpoint on each split as a new iteration, paired with its parent model.

    The parent's run is usually answered by the completion cache. On `valid` the iteration is
    `promoted` when it beats the parent significantly (paired bootstrap CI or McNemar), else
    `rejected`; on `test` it is only `reported`. Results are stored on the checkpoint row too (its
    `evals`: read it again, `store.get_checkpoint`, to see them)."""
    if model_options is None:
        model_options = _local_options(spec) if checkpoint.backend == "local" else {}
    options = model_options
    # The parent runs with the same options when it is the same kind of model (local or remote).
    same_kind = parent_ref.split(":", 1)[0] == checkpoint.model_ref.split(":", 1)[0]
    parent_options = options if same_kind else (dict(spec.model_options) if spec.model == parent_ref else {})
    out: list[SplitEval] = []
    for split in splits:
        parent_model = load_model(parent_ref, parent_options)
        parent = run_eval(spec, store, split=split, model=parent_model, stage="eval", progress=progress)
        parent_model.close()
        model = load_model(checkpoint.model_ref, options)
        new = run_eval(spec, store, split=split, model=model, stage=checkpoint.method, progress=progress)
        model.close()
        a, b = item_scores(store, parent.iteration_id, spec), item_scores(store, new.iteration_id, spec)
        keys = sorted(set(a) & set(b))

        def value(score: float, passed: bool) -> float:
            return float(passed) if spec.objective.metric == "pass_rate" else score

        stats = paired_stats([value(*a[k]) for k in keys], [value(*b[k]) for k in keys],
                             [a[k][1] for k in keys], [b[k][1] for k in keys])
        better = significantly_better(stats, spec.objective.metric)
        decision = ("promoted" if better else "rejected") if split == "valid" else "reported"
        reason = (f"{checkpoint.id} vs {parent_ref} on {split}: {stats['mean_b']:.3f} vs {stats['mean_a']:.3f}, "
                  f"diff {stats['diff']:+.3f} [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]; "
                  + ("significantly better: " if better else "not significantly better: ")
                  + describe_test(stats, spec.objective.metric))
        store.update_iteration(new.iteration_id, parent_id=parent.iteration_id, decision=decision, reason=reason)
        iteration = store.get_iteration(new.iteration_id)
        out.append(SplitEval(
            split=split, iteration_id=new.iteration_id, parent_iteration_id=parent.iteration_id, n=stats["n"],
            score=new.objective, ci=(iteration.ci_low, iteration.ci_high), parent_score=parent.objective,
            diff=stats["diff"], diff_ci=(stats["ci_low"], stats["ci_high"]), p_mcnemar=stats["p_mcnemar"],
            improvements=stats["improvements"], regressions=stats["regressions"], decision=decision))
    evals = dict(checkpoint.evals)
    evals.update({e.split: asdict(e) for e in out})
    store.update_checkpoint(checkpoint.id, eval_json=json.dumps(evals, default=str))
    return out
