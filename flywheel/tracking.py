"""Experiment tracking: training metrics and wheel runs in TensorBoard, MLflow or Weights & Biases.

Two uses, one set of trackers:

* **while training** — `report_to: [tensorboard, mlflow]` in a training config adds a trainer
  callback (`tracking_callback`) that writes every logged metric (train loss, learning rate, grad
  norm, validation loss) of the job to each tracker, main process only:

      flywheel train sft eval.yaml --base local:smollm2 -s report_to=tensorboard,mlflow
      tensorboard --logdir .flywheel/tracking          # one folder per training job
      mlflow ui --backend-store-uri ./mlruns           # a local file store beside flywheel.db

* **after a wheel run** — `export_tracking(store, run_id, "mlflow")` (`flywheel export-tracking RUN
  --to mlflow|tensorboard`) writes the run's iterations (score and CI, cost, tokens, lap, stage,
  decision) as one parent run with a child run per iteration (MLflow), or as scalars by iteration
  number (TensorBoard).

Each tracker is an optional extra, named once in `TRACKERS`; a missing package is a one-line
`TrackingError` before anything trains. W&B runs offline (files under the tracking dir; `wandb sync`
uploads them later) unless WANDB_API_KEY is set. Trackers are driven through their own clients
(`torch.utils.tensorboard.SummaryWriter`, `MlflowClient`, `wandb.init`) with explicit folders and
URIs, never through process-wide environment variables, so two jobs in one process do not mix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from flywheel.errors import FlywheelError


class TrackingError(FlywheelError):
    """A tracker that cannot be used here (package missing, store unreadable, run not a wheel run)."""


class Tracker(Protocol):
    """One open run in a tracking backend."""

    location: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def finish(self, ok: bool = True) -> None: ...


@dataclass(frozen=True)
class TrackerKind:
    """A tracking backend: its `report_to` name, the module it needs and the pip extra that brings it."""

    name: str
    module: str
    extra: str
    summary: str


TRACKERS: dict[str, TrackerKind] = {t.name: t for t in (
    TrackerKind("tensorboard", "tensorboard", "tensorboard", "TensorBoard event files (tensorboard --logdir DIR)"),
    TrackerKind("mlflow", "mlflow", "mlflow", "an MLflow tracking store (default: a local file store, mlruns/)"),
    TrackerKind("wandb", "wandb", "wandb", "Weights & Biases (offline files unless WANDB_API_KEY is set)"),
)}


def require_trackers(names: Sequence[str]) -> None:
    """Every named tracker's package is importable here; else one TrackingError naming the extra."""
    for name in names:
        kind = TRACKERS.get(name)
        if kind is None:
            raise TrackingError(f"report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(kind.module) is None:
            raise TrackingError(f"report_to: {name} needs the {kind.module} package, not installed here: "
                                f"pip install 'flywheel[{kind.extra}]' (or remove {name} from report_to)")


# -- where things go -------------------------------------------------------------------------------
def default_tracking_dir(store) -> Path:
    """`.flywheel/tracking/` beside the store."""
    return store.artefact_dir / "tracking"


def default_mlflow_uri(store) -> str:
    """A local MLflow file store: `mlruns/` beside the store's database file."""
    return (store.artefact_dir.parent / "mlruns").resolve().as_uri()


def _uri(value: str) -> str:
    # A bare folder is a file store; anything with a scheme (file:, http:, sqlite:, databricks) stands.
    return value if "://" in value or value.startswith("file:") else Path(value).expanduser().resolve().as_uri()


# -- the trackers ----------------------------------------------------------------------------------
class TensorBoardTracker:
    """Scalars (and the config as text) in TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.location = str(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if params:
            self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def text(self, tag: str, value: str, step: int) -> None:
        self.writer.add_text(tag, value, step)

    def finish(self, ok: bool = True) -> None:  # noqa: ARG002 - the event files have no status
        self.writer.flush()
        self.writer.close()


class MLflowTracker:
    """One MLflow run (created with the client, so nothing global is set) in `experiment`."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless told: a local
            # folder is what a user without a tracking server has, so we opt in (sqlite:/http: URIs work too).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.location = f"{uri} experiment {experiment!r} run {self.run_id}"
        flat = _flatten(params)
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in list(flat.items())
                                                       [start:start + 100]])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), v, stamp, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker:
    """A W&B run: offline files under `folder` unless WANDB_API_KEY is set."""

    def __init__(self, folder: Path, project: str, run_name: str, params: dict[str, Any]):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=project, name=run_name, dir=str(folder), config=params, mode=mode,
                              reinit="create_new")
        self.location = f"{folder} (W&B {mode}{'; upload with `wandb sync`' if mode == 'offline' else ''})"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def _mlflow_key(key: str) -> str:
    # MLflow names allow letters, digits, _ - . space / only
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def open_trackers(names: Sequence[str], *, store, name: str, experiment: str, params: dict[str, Any],
                  tracking_dir: str | None = None, mlflow_uri: str | None = None,
                  tags: dict[str, str] | None = None) -> list[Tracker]:
    """One open run per named tracker for the job or wheel run `name`; folders under `tracking_dir`
    (default .flywheel/tracking/), MLflow at `mlflow_uri` (default mlruns/ beside the store)."""
    require_trackers(names)
    folder = Path(tracking_dir).expanduser() if tracking_dir else default_tracking_dir(store)
    opened: list[Tracker] = []
    kind_name = ""
    try:
        for kind_name in names:
            if kind_name == "tensorboard":
                opened.append(TensorBoardTracker(folder / name, params))
            elif kind_name == "mlflow":
                opened.append(MLflowTracker(_uri(mlflow_uri) if mlflow_uri else default_mlflow_uri(store),
                                            experiment, name, params, tags))
            elif kind_name == "wandb":
                opened.append(WandbTracker(folder, experiment, name, params))  # runs in FOLDER/wandb/
    except Exception as exc:
        for done in opened:
            done.finish(ok=False)
        if isinstance(exc, FlywheelError):
            raise
        raise TrackingError(f"report_to: {kind_name}: cannot open a run: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return opened


# -- during training -------------------------------------------------------------------------------
def metric_name(key: str) -> str:
    """A trainer log key as trackers show it (as transformers' own callbacks name them): `eval_loss`
    -> `eval/loss`, `loss` -> `train/loss`, the end-of-run `train_loss` -> `train/train_loss`."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


def tracking_callback(config, store, job_id: str, *, method: str, eval_name: str | None = None):
    """A TrainerCallback logging to `config.report_to`'s trackers, or None when it names none.

    Create it on the main process only; `close(ok)` ends the runs (the callback also ends them when
    training ends)."""
    if not config.report_to:
        return None
    from transformers import TrainerCallback

    trackers = open_trackers(
        config.report_to, store=store, name=job_id,
        experiment=config.mlflow_experiment or f"flywheel-{eval_name or method}",
        params={"method": method, "job_id": job_id, **config.model_dump(mode="json")},
        tracking_dir=config.tracking_dir, mlflow_uri=config.mlflow_tracking_uri,
        tags={"flywheel.job_id": job_id, "flywheel.method": method})

    class TrackingCallback(TrainerCallback):
        """Every trainer log line, as numbers, to every tracker."""

        locations = [t.location for t in trackers]
        closed = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            numbers = {metric_name(k): float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
            for tracker in trackers:
                tracker.log(numbers, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.close(ok=True)

        def close(self, ok: bool = True) -> None:
            if not self.closed:
                self.closed = True
                for tracker in trackers:
                    tracker.finish(ok=ok)

    return TrackingCallback()


# -- exporting a wheel run -------------------------------------------------------------------------
EXPORT_TARGETS = ("mlflow", "tensorboard", "wandb")

_ITERATION_NUMBERS = ("score", "ci_low", "ci_high", "n", "cost", "prompt_tokens", "completion_tokens",
                      "latency_s", "wall_s", "lap")


class TrackingExport(BaseModel):
    """What `export_tracking` wrote."""

    run_id: str = Field(description="The wheel run exported.")
    to: str = Field(description="The tracker written to.")
    location: str = Field(description="Where: the event-file folder, or the MLflow URI, experiment and run.")
    iterations: int = Field(description="Iterations written (one step, and for MLflow one child run, each).")
    metrics: list[str] = Field(description="Metric names written.")
    child_runs: list[str] = Field(default_factory=list, description="MLflow: the child run id of each iteration.")

    def summary_lines(self) -> list[str]:
        """What `flywheel export-tracking` prints."""
        return [f"exported wheel run {self.run_id}: {self.iterations} iterations to {self.to}",
                f"  {self.location}", f"  metrics: {', '.join(self.metrics)}"]


def iteration_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one iteration's columns (`Iteration.to_dict()`), cost and tokens also per item,
    keyed by its split. (A dict: tracking sits below the store and does not import its rows.)

    >>> iteration_metrics({"split": "valid", "score": 0.5, "n": 4, "cost": 2.0, "lap": 1})
    {'valid/score': 0.5, 'valid/n': 4.0, 'valid/cost': 2.0, 'valid/lap': 1.0, 'valid/cost_per_item': 0.5}
    """
    split = row.get("split") or "all"
    out = {f"{split}/{key}": float(row[key]) for key in _ITERATION_NUMBERS
           if isinstance(row.get(key), (int, float)) and math.isfinite(float(row[key]))}
    n = row.get("n") or 0
    if n:
        for key in ("cost", "prompt_tokens", "completion_tokens", "latency_s"):
            if isinstance(row.get(key), (int, float)):
                out[f"{split}/{key}_per_item"] = float(row[key]) / n
    return out


def export_tracking(store, run_id: str, to: str, *, folder: str | None = None,
                    mlflow_uri: str | None = None, experiment: str | None = None) -> TrackingExport:
    """Write a wheel run's iterations to `to` (mlflow, tensorboard or wandb); step = iteration number.

    MLflow: a parent run named after the wheel run (params: eval, status, stop reason, the result's
    headline numbers) and a child run per iteration (params: stage, lap, split, model, prompt,
    decision; metrics: score, CI, cost and tokens, also per item). TensorBoard and W&B: the same
    numbers as `<split>/<metric>` scalars at step = iteration number (TensorBoard also a text line
    per iteration: stage, model, prompt, decision)."""
    if to not in EXPORT_TARGETS:
        raise TrackingError(f"--to: unknown tracker {to!r}; known: {', '.join(EXPORT_TARGETS)}")
    run = store.get_run(run_id)
    if run.kind != "wheel":
        raise TrackingError(f"{store.path}: run {run.id} is not a wheel run (kind: {run.kind}); "
                            "export-tracking writes wheel runs (flywheel run)")
    rows = store.iterations(run.id)
    if not rows:
        raise TrackingError(f"{store.path}: wheel run {run.id} has no iterations yet")
    summary = json.loads(run.summary_json or "{}")
    summary = summary.get("result") or summary  # a finished wheel run's result (flywheel.wheel.WheelState)
    eval_row = store.get_eval(run.eval_id)
    eval_name = eval_row["name"] if eval_row else None
    params = {"wheel_run": run.id, "status": run.status, "eval": eval_name,
              "model_ref": run.model_ref, "started_at": run.started_at,
              "finished_at": run.finished_at,
              **{k: summary.get(k) for k in ("stopped", "winner_model", "winner_prompt_id", "baseline_valid",
                                              "winner_valid", "model_calls", "tokens", "cost", "wall_s")
                 if not isinstance(summary.get(k), (dict, list))}}
    name = f"wheel-{run.id}"
    experiment = experiment or f"flywheel-{eval_name or 'wheel'}"
    metrics: set[str] = set()
    children: list[str] = []
    [tracker] = open_trackers([to], store=store, name=name, experiment=experiment, params=params,
                              tracking_dir=folder, mlflow_uri=mlflow_uri, tags={"flywheel.run_id": run.id})
    ok = False
    try:
        for row in rows:
            numbers = iteration_metrics(row.to_dict())
            metrics.update(numbers)
            tracker.log(numbers, row.seq)
            line = (f"#{row.seq} lap {row.lap} {row.stage} on {row.split}: {row.model_ref} "
                    f"prompt {row.prompt_id} -> {row.decision or '-'}")
            if isinstance(tracker, TensorBoardTracker):
                tracker.text("iterations", line, row.seq)
            elif isinstance(tracker, MLflowTracker):
                child = MLflowTracker(tracker.uri, experiment,
                                      f"{row.seq}-{row.stage}-{row.split}",
                                      {k: getattr(row, k) for k in ("id", "seq", "stage", "lap", "split", "model_ref",
                                                               "prompt_id", "parent_id", "decision", "reason")},
                                      tags={"flywheel.run_id": run.id, "flywheel.iteration_id": row.id,
                                            "flywheel.stage": row.stage},
                                      parent_run_id=tracker.run_id)
                child.log({k.split("/", 1)[1]: v for k, v in numbers.items()}, row.seq)
                child.finish()
                children.append(child.run_id)
        ok = True
    finally:
        tracker.finish(ok=ok)
    return TrackingExport(run_id=run.id, to=to, location=tracker.location, iterations=len(rows),
                          metrics=sorted(metrics), child_runs=children)
