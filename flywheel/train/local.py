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

import gc
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError, ModelError
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.checkpoints import Checkpoint, register_checkpoint, resolve_base
from flywheel.train.config import TrainConfig, resolve_bf16
from flywheel.train.formats import TrainingSet
from flywheel.train.sets import record_training_set


class TrainingError(FlywheelError):
    """Training could not start or did not finish (bad base model, diverged loss, failed job)."""


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))

    def summary_lines(self) -> list[str]:
        """What `flywheel train` prints: the checkpoint, the loss, and each split against the parent."""
        m = self.metrics
        lines = [f"{self.method} checkpoint {self.checkpoint.id}: {self.checkpoint.model_ref}",
                 f"  trained on {self.training_set_id} ({m.get('rows', '?')} rows)"
                 + (f", {m['steps']} steps in {m['wall_s']:.0f}s" if m.get("wall_s") else "")
                 + (f", loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}" if m.get("first_loss") is not None
                    and m.get("last_loss") is not None else "")]
        for e in self.evals:
            lines.append(f"  {e.split:<5} {e.score:.3f} [{e.ci[0]:.3f}, {e.ci[1]:.3f}] vs parent {e.parent_score:.3f}:"
                         f" diff {e.diff:+.3f} [{e.diff_ci[0]:+.3f}, {e.diff_ci[1]:+.3f}], McNemar p={e.p_mcnemar:.3g}"
                         f" ({e.improvements} up, {e.regressions} down) -> {e.decision}")
        return lines


# -- loading ---------------------------------------------------------------------------------------
def load_for_training(base_ref: str, *, bf16: bool, quantize: str | None = None):
    """(model, tokenizer, base model ref without adapter, adapter dir or None) for a `local:` ref.

    A `local:BASE+ADAPTER` reference continues training that adapter (checked against BASE); the
    frozen base weights are loaded in bf16 when training in bf16 (the LoRA weights stay fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from flywheel.models import parse_model_ref
    from flywheel.models.local import LocalModel, _check_adapter_base

    scheme, name, adapter = parse_model_ref(base_ref)
    if scheme != "local":
        raise TrainingError(f"{base_ref}: local training needs a local: model (openai: models train with the "
                            "hosted backend)")
    local = LocalModel(base_ref, name, adapter)  # validates the base and the adapter folder
    path = local.base_path()
    hf_logging.disable_progress_bar()
    from flywheel.models.vision import is_vision_model

    if is_vision_model(path):  # a vision-language model: its processor stands in for the tokenizer
        from flywheel.train.vision import load_vision_for_training

        model, processor = load_vision_for_training(base_ref, path, local.adapter, bf16=bf16)
        return model, processor, f"local:{name}", local.adapter
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if quantize:  # QLoRA: the frozen base in 4-bit on the GPU (flywheel.train.config.require_quantization)
            from flywheel.train.config import LoraSpec, quantization_config

            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=quantization_config(LoraSpec(quantize_base=quantize), bf16),
                device_map={"": torch.cuda.current_device()}, dtype=torch.bfloat16 if bf16 else torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    except OSError as exc:
        raise ModelError(f"{base_ref}: cannot load {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if local.adapter is not None:
        from peft import PeftConfig, PeftModel

        adapter_base = PeftConfig.from_pretrained(str(local.adapter)).base_model_name_or_path
        _check_adapter_base(base_ref, adapter_base, name, path)
        model = PeftModel.from_pretrained(model, str(local.adapter), is_trainable=True)
    return model, tokenizer, f"local:{name}", local.adapter


def is_main_process() -> bool:
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # Under `accelerate launch` on CPUs (flywheel.train.launch), the state must know it is a
        # CPU run before the Trainer asks, or it settles on one process.
        return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process
    except Exception:  # noqa: BLE001 - without accelerate state there is one process
        return True


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


def _adapter_weights(model) -> dict[str, Any]:
    return {name: param.detach().float().clone() for name, param in model.named_parameters()
            if "lora_" in name and ".default." in name}


def _summarise_history(history: list[dict[str, Any]], loss_key: str) -> dict[str, Any]:
    losses = [h[loss_key] for h in history if isinstance(h.get(loss_key), float)]
    rewards = [h["reward"] for h in history if isinstance(h.get("reward"), float)]  # GRPO: mean group reward
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    out = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "train_loss": final.get("train_loss"), "runtime_s": final.get("train_runtime"),
           "steps": max((h.get("step", 0) for h in history), default=0), "logged": len(losses)}
    if rewards:
        out.update(first_reward=rewards[0], last_reward=rewards[-1], mean_reward=sum(rewards) / len(rewards))
    return out


# -- the run ---------------------------------------------------------------------------------------
def run_local(method: str, spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
              config: TrainConfig, build: Callable[..., Any], evaluate: bool = True,
              splits: Sequence[str] = ("valid", "test"), quiet: bool = False,
              loss_key: str = "loss") -> TrainResult | None:
    """Train with the `BuiltTrainer` that `build(model, tokenizer, output_dir, bf16)` returns, then
    register and evaluate. Returns None on non-main processes."""
    from flywheel.train.datachecks import preflight

    preflight(config)  # trackers, QLoRA hardware: one clean error before anything is stored or loaded
    main = is_main_process()
    base_ref, parent_id = resolve_base(store, base)
    if main:
        record_training_set(store, training_set)
    job_id = store.create_training_job(
        backend="local", method=method, training_set_id=training_set.id, base_model=base_ref,
        config_json=config.model_dump_json()) if main else ""
    bf16 = resolve_bf16(config.precision)
    # transformers 5 warns about its own deprecated gradient-checkpointing names on every step
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    work = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=_scratch(store)))
    tracker = None
    try:
        if quiet:
            import datasets

            datasets.disable_progress_bars()
        model, tokenizer, base_model, _ = load_for_training(base_ref, bf16=bf16, quantize=config.lora.quantize_base)
        built: BuiltTrainer = build(model, tokenizer, work, bf16)
        trainer, extra = built.trainer, built.stats
        # The Trainer prints every log dict to stdout (with or without its bar): show one bar on
        # stderr with the latest loss instead; the logs themselves go to the store.
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if not quiet:
            trainer.add_callback(_progress_bar(method))
        history: list[dict[str, Any]] = []
        if main:
            trainer.add_callback(_event_logger(store, job_id, history))
            from flywheel.tracking import tracking_callback

            tracker = tracking_callback(config, store, job_id, method=method, eval_name=spec.name)
            if tracker is not None:
                trainer.add_callback(tracker)
        before = _adapter_weights(trainer.model)
        started = time.perf_counter()
        try:
            trainer.train()
        finally:
            built.close()
        wall = time.perf_counter() - started
        after = _adapter_weights(trainer.model)
        changed = sum(1 for k in before if not bool((before[k] == after.get(k, before[k])).all()))
        metrics = {**_summarise_history(history, loss_key), "wall_s": wall, "bf16": bf16,
                   "processes": trainer.accelerator.num_processes,
                   "adapter_tensors": len(before), "adapter_tensors_changed": changed,
                   "rows": len(training_set), **extra}
        if metrics["last_loss"] is not None and not math.isfinite(metrics["last_loss"]):
            raise TrainingError(f"{method}: the loss diverged ({metrics['last_loss']}); lower learning_rate")
        if not main:
            return None

        def save(folder: Path) -> None:
            trainer.model.save_pretrained(str(folder), selected_adapters=["default"])

        checkpoint = register_checkpoint(
            store, method=method, base_model=base_model, save=save, training_set_id=training_set.id,
            training_set_hash=training_set.content_hash, config=config.model_dump(), metrics=metrics,
            parent_id=parent_id, job_id=job_id)
    except BaseException as exc:
        if tracker is not None:
            tracker.close(ok=False)
        if main and job_id:
            store.update_training_job(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trainer = model = built = None  # free the trained weights before evaluation loads models
    gc.collect()
    result = TrainResult(method=method, checkpoint=checkpoint, job_id=job_id, training_set_id=training_set.id or "",
                         metrics=metrics)
    if evaluate:
        result.evals = evaluate_checkpoint(spec, store, checkpoint, parent_ref=base_ref, splits=splits)
    return result


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
    `rejected`; on `test` it is only `reported`. Results are stored on the checkpoint row too."""
    from flywheel.harness import item_scores, run_eval
    from flywheel.models import load_model
    from flywheel.promotion import describe_test, significantly_better
    from flywheel.stats import paired_stats

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
            score=new.objective, ci=(iteration["ci_low"], iteration["ci_high"]), parent_score=parent.objective,
            diff=stats["diff"], diff_ci=(stats["ci_low"], stats["ci_high"]), p_mcnemar=stats["p_mcnemar"],
            improvements=stats["improvements"], regressions=stats["regressions"], decision=decision))
    evals = dict(checkpoint.evals)
    evals.update({e.split: asdict(e) for e in out})
    store.update_checkpoint(checkpoint.id, eval_json=json.dumps(evals, default=str))
    checkpoint.evals = evals
    return out
