"""Validation during training: the validation loss, the graders' score at each checkpoint, early
stopping, and the checkpoints a job saves every `save_steps` (registered, ranked, pruned).

`run_local` (flywheel.train.local) builds a `JobValidation` for a job and adds its callback to the
TRL trainer. At every `eval_steps` the trainer's validation loss (TRL's `eval_loss`) becomes a
`validation` event of the job; at every saved step the adapter is registered as a checkpoint
(step, train loss, valid loss) and, with `valid_subset`, generated on the first N valid items
through the harness (greedy, the training prompt) and graded, which gives its `valid_score`.
Early stopping watches either metric; a `monitor` (a hyper-parameter search's pruner) sees every
point too and may stop the job. When training ends the best checkpoint is chosen by the eval's
objective (`choose_best`) and the others are pruned per `keep`.

    config = SFTSpec(eval_steps=5, save_steps=5, valid_subset=16, keep="best",
                     early_stopping={"metric": "valid_score", "patience": 2})
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.data import load_dataset
from flywheel.harness import run_eval
from flywheel.models import load_model
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.store import Checkpoint, Store, now
from flywheel.train.checkpoints import register_checkpoint
from flywheel.train.config import EarlyStoppingSpec, TrainConfig
from flywheel.train.formats import TrainingDataError, TrainingSet, load_training_file

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class ValidationPoint:
    """One measurement during training, as a monitor (e.g. a search's pruner) sees it."""

    step: int
    metric: str  # "valid_loss" or "valid_score"
    value: float
    train_loss: float | None = None
    checkpoint_id: str | None = None


# A monitor sees every point; a truthy answer stops the job (a string says why).
Monitor = Callable[[ValidationPoint], "bool | str | None"]


# -- the validation set ----------------------------------------------------------------------------
def training_prompt(spec: EvalSpec, store: Store, training_set: TrainingSet, prompt: Prompt | None = None) -> Prompt:
    """The prompt the model is trained (and so validated) with: `prompt`, else the one the set was
    built with (recorded in its source), else the eval's."""
    if prompt is not None:
        return prompt
    prompt_id = (training_set.source or {}).get("prompt_id")
    if prompt_id and store.prompt_row(prompt_id):
        return Prompt.from_json(store.get_prompt(prompt_id))
    return Prompt(messages=spec.messages())


def default_reference(spec: EvalSpec) -> str | None:
    """The answer of a valid item, when the spec says what it is: the objective grader's `reference`
    when it only reads item fields (e.g. `{{item.label}}`); for items from the proxy's captures, the
    captured reply (`{{item.output}}`); for a python objective grader, the one item field its
    `grade(sample, item)` reads that the prompt does not show the model. Else None."""
    grader = next((g for g in spec.graders if g.get("name") == spec.objective_grader), None) or {}
    reference = grader.get("reference")
    if isinstance(reference, str) and "{{" in reference and "sample." not in reference:
        return reference
    if spec.dataset.captures is not None:
        return "{{item.output}}"
    if grader.get("type") == "python" and isinstance(grader.get("source"), str):
        shown = json.dumps(spec.messages())
        hidden = [f for f in python_item_fields(grader["source"]) if f"item.{f}" not in shown]
        if len(hidden) == 1:
            return f"{{{{item.{hidden[0]}}}}}"
    return None


def python_item_fields(source: str) -> list[str]:
    """The item fields a python grader's `grade(sample, item)` reads by a constant key (`item["x"]`,
    `item.get("x")`), in order of first use; [] when the source does not parse."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    grade = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"), None)
    if grade is None or len(grade.args.args) < 2:
        return []
    item = grade.args.args[1].arg
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(grade):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == item:
            key = node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == item and node.args):
            key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.append((node.lineno, node.col_offset, key.value))
    return list(dict.fromkeys(field for _, _, field in sorted(found)))


def validation_set(method: str, spec: EvalSpec, config: TrainConfig, prompt: Prompt) -> TrainingSet | None:
    """The rows the validation loss is computed on, or None when `eval_steps` is unset.

    `validation_file` (the method's training format) when given; for SFT otherwise the eval's
    valid split rendered with `prompt` and answered by `validation_reference`."""
    if not config.eval_steps:
        return None
    if method == "rft":
        raise TrainingDataError("rft: GRPO has no validation loss; unset eval_steps and measure with "
                                "valid_subset (the graders' score at each checkpoint) instead")
    if config.validation_file:
        return load_training_file(method, config.validation_file)
    if method != "sft":
        raise TrainingDataError(f"{method}: eval_steps needs validation_file (preference pairs in the {method} "
                                "format); only SFT builds its validation rows from the valid split")

    reference = config.validation_reference or default_reference(spec)
    dataset = load_dataset(spec)
    items = dataset.split("valid")
    if not reference:
        fields = list(items[0].fields) if items else []
        # The answer is likely a field the prompt does not show the model (nor the split column).
        shown = json.dumps(spec.messages())
        answers = [f for f in fields if f"item.{f}" not in shown and f not in ("split", "id", "key")]
        field = (answers or fields or ["label"])[0]
        raise TrainingDataError(
            "eval_steps: no validation rows: the objective grader names no reference to answer a valid item "
            "with; set validation_file, or validation_reference to the field holding the answer, e.g. "
            f"`flywheel train ... -s validation_reference={{{{item.{field}}}}}` (a wheel stage: its "
            f"config.validation_reference; fields of a valid item: {', '.join(fields) or 'none'})")
    if not items:
        raise TrainingDataError(f"{dataset.path}: eval_steps: the valid split has no items; set validation_file")
    answer = Prompt(messages=[{"role": "assistant", "content": reference}])
    rows = []
    for item in items:
        try:
            rows.append({"messages": [*prompt.render(item), *answer.render_base(item)]})
        except Exception as exc:  # noqa: BLE001 - a template naming a missing field
            raise TrainingDataError(f"{dataset.path}: valid item {item.key!r}: validation_reference "
                                    f"{reference!r}: {exc}") from None
    return TrainingSet("sft", rows, {"eval": spec.name, "split": "valid", "reference": reference})


# -- choosing and pruning --------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def choose_best(checkpoints: list[Checkpoint]) -> tuple[Checkpoint, str]:
    """The best of a job's checkpoints and why: the highest valid score (the eval's objective on the
    valid subset) when measured, ties to the lower valid loss then the later step; else the lowest
    valid loss; else the last step."""
    if not checkpoints:
        raise ValueError("no checkpoints to choose from")
    scored = [c for c in checkpoints if _finite(c.metrics.get("valid_score"))]
    if scored:
        best = max(scored, key=lambda c: (c.metrics["valid_score"], -c.metrics.get("valid_loss", math.inf)
                                           if _finite(c.metrics.get("valid_loss")) else -math.inf, c.step or 0))
        tied = [c.step for c in scored if c is not best and c.metrics["valid_score"] == best.metrics["valid_score"]]
        if not tied:
            return best, f"highest valid score {best.metrics['valid_score']:.4g} (step {best.step})"
        loss = best.metrics.get("valid_loss")
        tie = (f"lowest valid loss {loss:.4g} of those" if _finite(loss) else "the latest of those")
        return best, (f"highest valid score {best.metrics['valid_score']:.4g} (step {best.step}; tied with step"
                      f"{'s' if len(tied) > 1 else ''} {', '.join(str(t) for t in sorted(tied, key=lambda t: t or 0))}"
                      f": {tie})")
    with_loss = [c for c in checkpoints if _finite(c.metrics.get("valid_loss"))]
    if with_loss:
        best = min(with_loss, key=lambda c: (c.metrics["valid_loss"], -(c.step or 0)))
        return best, f"lowest valid loss {best.metrics['valid_loss']:.4g} (step {best.step})"
    best = max(checkpoints, key=lambda c: (c.step or 0, c.created_at or ""))
    return best, f"last step ({best.step}); nothing validated"


def ranked(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Checkpoints best first, by `choose_best`'s rule."""
    rest, out = list(checkpoints), []
    while rest:
        best, _ = choose_best(rest)
        out.append(best)
        rest = [c for c in rest if c.id != best.id]
    return out


def prune_checkpoints(store: Store, checkpoints: list[Checkpoint], keep: str, *, latest: bool = False) -> list[str]:
    """Delete the adapter folders `keep` (best | all | N best) does not keep; their rows stay, marked
    `pruned_at`. Returns the ids pruned. `latest`: keep the N latest steps instead of the N best (as
    the platform keeps a fine-tuning job's last checkpoints)."""
    if keep == "all" or not checkpoints:
        return []
    n = 1 if keep == "best" else int(keep)
    order = sorted(checkpoints, key=lambda c: (c.step or 0, c.created_at or ""), reverse=True) if latest \
        else ranked(checkpoints)
    pruned = []
    for checkpoint in order[n:]:
        if checkpoint.path and not checkpoint.pruned_at:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            store.update_checkpoint(checkpoint.id, pruned_at=now())
            pruned.append(checkpoint.id)
    return pruned


# -- early stopping --------------------------------------------------------------------------------
class EarlyStopper:
    """Counts measurements without improvement of one metric; says why once patience runs out."""

    def __init__(self, spec: EarlyStoppingSpec):
        self.spec = spec
        self.lower_is_better = spec.metric == "valid_loss"
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def update(self, step: int, value: float) -> str | None:
        """Record a measurement; the stop reason when patience is exhausted, else None."""
        delta = self.spec.min_delta
        improved = self.best is None or (value < self.best - delta if self.lower_is_better
                                         else value > self.best + delta)
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
            return None
        self.bad += 1
        if self.bad < self.spec.patience:
            return None
        return (f"early stopping at step {step}: {self.spec.metric} did not improve by more than {delta:g} in "
                f"{self.bad} measurements (best {self.best:.4g} at step {self.best_step}, now {value:.4g})")


# -- the job's validation --------------------------------------------------------------------------
class JobValidation:
    """Everything a job measures while it trains, and the checkpoints it registers (main process
    writes; every process takes the same stop decisions)."""

    def __init__(self, *, store: Store, job_id: str, method: str, spec: EvalSpec, config: TrainConfig,
                 prompt: Prompt, base_model: str, parent_id: str | None, training_set: TrainingSet,
                 history: list[dict[str, Any]], main: bool = True, monitor: Monitor | None = None,
                 log: Callable[[str], None] | None = None):
        self.store, self.job_id, self.method, self.spec, self.config = store, job_id, method, spec, config
        self.prompt, self.base_model, self.parent_id, self.training_set = prompt, base_model, parent_id, training_set
        self.history, self.main, self.monitor = history, main, monitor
        self.log = log or (lambda message: None)
        self.stop_reason: str | None = None
        self.valid_loss: dict[int, float] = {}
        self.stopper = EarlyStopper(config.early_stopping) if config.early_stopping else None
        if config.early_stopping and config.early_stopping.metric == "valid_score" and not (
                config.save_steps and config.valid_subset):
            raise TrainingDataError("early_stopping on valid_score needs save_steps and valid_subset (the score is "
                                    "measured at each saved checkpoint)")
        if config.early_stopping and config.early_stopping.metric == "valid_loss" and not config.eval_steps:
            raise TrainingDataError("early_stopping on valid_loss needs eval_steps (and validation rows)")

    # -- resuming: what the job measured before it was killed ----------------------------------------
    def replay(self, up_to_step: int) -> None:
        """Rebuild the early-stopping state and valid losses from the job's stored events up to a step."""
        for event in self.store.training_events(self.job_id):
            if event["type"] != "validation" or not event["data_json"]:
                continue
            data = json.loads(event["data_json"])
            if data.get("step", 0) > up_to_step:
                continue
            if "valid_loss" in data:
                self.valid_loss[data["step"]] = data["valid_loss"]
            metric = self.stopper.spec.metric if self.stopper else None
            if metric and metric in data:
                self.stopper.update(data["step"], data[metric])

    def _train_loss(self, step: int) -> float | None:
        losses = [h for h in self.history if isinstance(h.get("loss"), float) and h.get("step", 0) <= step]
        return losses[-1]["loss"] if losses else None

    def _point(self, point: ValidationPoint) -> None:
        """Record, check early stopping and ask the monitor; sets `stop_reason` to stop."""
        if self.main:
            data = {"step": point.step, point.metric: point.value, "train_loss": point.train_loss}
            if point.checkpoint_id:
                data["checkpoint_id"] = point.checkpoint_id
            self.store.add_training_events(self.job_id, [{"type": "validation", "data": data, "message":
                                                          f"step {point.step}: {point.metric}={point.value:.4g}"}])
        if self.stop_reason:
            return
        if self.stopper and self.stopper.spec.metric == point.metric:
            self.stop_reason = self.stopper.update(point.step, point.value)
        if not self.stop_reason and self.monitor is not None:
            answer = self.monitor(point)
            if answer:
                self.stop_reason = answer if isinstance(answer, str) else f"stopped by the monitor at step {point.step}"
        if self.stop_reason and self.main:
            self.store.add_training_events(self.job_id, [{"type": "stop", "message": self.stop_reason,
                                                          "data": {"step": point.step, "reason": self.stop_reason}}])
            self.log(self.stop_reason)

    def on_valid_loss(self, step: int, value: float) -> None:
        self.valid_loss[step] = value
        self._point(ValidationPoint(step, "valid_loss", value, self._train_loss(step)))

    # -- checkpoints -------------------------------------------------------------------------------
    def registered_steps(self) -> set[int]:
        return {c.step for c in self.store.job_checkpoints(self.job_id) if c.step is not None}

    def register(self, step: int, save: Callable[[Path], None]) -> Checkpoint | None:
        """Register the adapter saved at `step` (main process), score it on the valid subset, and
        feed the score to early stopping and the monitor. Every process returns the same decision."""
        checkpoint, score = None, None
        if self.main and step not in self.registered_steps():
            metrics = {"step": step, "train_loss": self._train_loss(step), "valid_loss": self.valid_loss.get(step)}
            checkpoint = register_checkpoint(
                self.store, method=self.method, base_model=self.base_model, save=save,
                training_set_id=self.training_set.id, training_set_hash=self.training_set.content_hash,
                config=self.config.model_dump(), metrics=metrics, parent_id=self.parent_id, job_id=self.job_id,
                step=step, finish_job=False)
            if self.config.valid_subset:
                score = self.score(checkpoint)
        score = broadcast(score)
        if score is not None:
            self._point(ValidationPoint(step, "valid_score", score, self._train_loss(step),
                                        checkpoint.id if checkpoint else None))
        return checkpoint

    def score(self, checkpoint: Checkpoint) -> float:
        """The eval's objective on the first `valid_subset` valid items: generated greedily with the
        training prompt through the harness (stored as a `validation` iteration) and graded."""
        greedy = self.spec.model_copy(update={"sampling": self.spec.sampling.model_copy(
            update={"temperature": 0.0, "repeats": 1})})
        options = dict(self.spec.model_options) if self.spec.model.startswith("local:") else {}
        model = load_model(checkpoint.model_ref, options)
        try:
            result = run_eval(greedy, self.store, split="valid", limit=self.config.valid_subset, model=model,
                              prompt=self.prompt, stage="validation")
        finally:
            model.close()
        metrics = {**checkpoint.metrics, "valid_score": result.objective, "valid_n": result.n_samples,
                   "valid_iteration_id": result.iteration_id}
        self.store.update_checkpoint(checkpoint.id, metrics_json=json.dumps(metrics, default=str))
        return result.objective

    def checkpoints(self) -> list[Checkpoint]:
        return self.store.job_checkpoints(self.job_id)

    def finish(self) -> tuple[Checkpoint, str, list[str]]:
        """Choose the best checkpoint, prune per `keep`, mark the job succeeded with it."""
        checkpoints = [c for c in self.checkpoints() if not c.pruned_at]
        best, why = choose_best(checkpoints)
        pruned = prune_checkpoints(self.store, checkpoints, self.config.keep)
        reason = self.stop_reason or "end of the schedule"
        self.store.add_training_events(self.job_id, [{"type": "best", "message": f"best checkpoint {best.id}: {why}",
                                                      "data": {"checkpoint_id": best.id, "reason": why,
                                                               "pruned": pruned}}])
        self.store.finish_training_job(self.job_id, checkpoint_id=best.id, stop_reason=reason)
        return best, why, pruned

    # -- the TRL callback --------------------------------------------------------------------------
    def callback(self):
        """A transformers TrainerCallback that feeds this object and stops the trainer when told."""
        from transformers import TrainerCallback

        validation = self

        class ValidationCallback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                loss = (metrics or {}).get("eval_loss")
                if _finite(loss):
                    validation.on_valid_loss(state.global_step, float(loss))
                if validation.stop_reason:
                    control.should_training_stop = True
                    if args.save_strategy != "no":
                        control.should_save = True  # the step it stopped at is a checkpoint too

            def on_save(self, args, state, control, **kwargs):
                folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                validation.register(state.global_step, lambda target: copy_adapter(folder, target))
                if validation.stop_reason:
                    control.should_training_stop = True

        return ValidationCallback()


def copy_adapter(source: Path, target: Path) -> None:
    """Copy the PEFT adapter files of a trainer checkpoint folder (not its optimizer state)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith("adapter_") or path.name in ("README.md",):
            shutil.copy2(path, target / path.name)


def broadcast(value: Any) -> Any:
    """The main process's value on every process (one process: the value itself)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    except ImportError:
        return value


# -- resuming --------------------------------------------------------------------------------------
def lock_job_folder(folder: str | Path) -> Any:
    """An exclusive lock on a job's folder for as long as the returned handle stays open (the OS
    drops it when the process dies, even on kill -9); None when another process holds it, i.e. the
    job is still training there. Without fcntl (Windows) every lock is granted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "w")  # noqa: SIM115 - held open for the whole training run
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def last_saved_step(output_dir: str | Path | None) -> tuple[int, Path] | None:
    """The newest complete trainer checkpoint under a job's folder, as (step, folder), or None."""
    found = saved_steps(output_dir) if output_dir else []
    return found[-1] if found else None


def saved_steps(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every complete trainer checkpoint under a job's folder, by step (trainer_state.json is
    written last, so a folder a kill interrupted is skipped)."""
    out: list[tuple[int, Path]] = []
    if not Path(output_dir).is_dir():
        return out
    for folder in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = folder.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (folder / "trainer_state.json").is_file():
            out.append((int(suffix), folder))
    return sorted(out)
