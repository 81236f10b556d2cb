"""The one training door: `run(TrainRequest)` for the CLI (`flywheel train`), the wheel's weight
stages (flywheel.stages.training) and the API's fine-tuning jobs (flywheel.api.runners.fine_tuning).

A request names the method (flywheel.train.methods.METHODS), the eval, the store, the base and the
settings, and where the rows come from: a platform JSONL file, a recorded set id (`ts-...`), a set
already loaded, or (none of these) the method's builder over the store. `run`:

1. continues a killed local job (`resume`, with the job's own set, base and config), or
2. builds (or loads) the set, and with `reuse` returns the checkpoint (or search) an identical
   earlier job registered (a wheel killed after training never trains twice), else
3. checks the data (flywheel.train.datachecks), then runs a hyper-parameter search
   (flywheel.train.search), a hosted job (`openai:` base, flywheel.train.hosted), the method's
   local trainer in this process, or every process of `accelerate launch` through
   `python -m flywheel.train.worker REQUEST.json RESULT.json` (flywheel.train.launch).

    from flywheel.train import TrainRequest, run
    result = run(TrainRequest(method="sft", spec=spec, store=store, base="local:smollm2"))
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError, SpecError, TrainingError
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.checkpoints import load_checkpoint, resolve_base
from flywheel.train.config import TrainConfig
from flywheel.train.datachecks import preflight, run_data_checks
from flywheel.train.formats import TrainingDataError, TrainingSet, load_training_file
from flywheel.train.launch import LaunchSpec, launch_training
from flywheel.train.local import TrainResult, evaluate_checkpoint
from flywheel.train.methods import TrainingMethod, load_train_config, training_method
from flywheel.train.sets import load_training_set, record_training_set
from flywheel.train.validation import last_saved_step


@dataclass
class TrainRequest:
    """Everything one training run needs. Only `method`, `spec` and `store` are required; `base`
    unless `resume` is given."""

    method: str  # a row of flywheel.train.methods.METHODS: sft, dpo, rft
    spec: EvalSpec
    store: Store
    base: str | None = None  # local:MODEL[+ADAPTER], a checkpoint id, or openai:MODEL (hosted)
    config: TrainConfig | None = None  # the method's settings (default: its defaults)
    data: str | TrainingSet | None = None  # a platform JSONL file, a set id (ts-...), a loaded set; None: build
    set_options: dict[str, Any] = field(default_factory=dict)  # the builder's: min_score, max_per_item, ...
    prompt: Any = None  # flywheel.prompt.Prompt the rows are rendered, trained and measured with
    dataset: Any = None  # the eval's loaded flywheel.data.Dataset (a caller that holds one: parsed once)
    grader_set: Any = None  # the eval's open flywheel.grading.GraderSet (RFT rewards reuse its graders)
    evaluate: bool = True  # evaluate the checkpoint on `splits` against its parent
    splits: Sequence[str] = ("valid", "test")
    resume: str | None = None  # a training job id: continue it from its last saved step
    reuse: bool = False  # return the checkpoint (or search) an identical earlier job chose, if any
    check_data: bool = True  # run the data checks before training
    fresh: bool = False  # never pick up another unfinished job of the same inputs (the caller resumes by id)
    search: Any = None  # a flywheel.train.search.SearchSpec: a hyper-parameter search instead of one job
    run_id: str | None = None  # the wheel run a search belongs to (its reuse looks there)
    launch: LaunchSpec = field(default_factory=LaunchSpec)  # local, or accelerate launch
    hosted_options: dict[str, Any] = field(default_factory=dict)  # flywheel.train.hosted options
    callbacks: Sequence[Any] = ()  # transformers TrainerCallbacks: progress events, cancel, step checkpoints
    on_job: Callable[[str], None] | None = None  # told the training job's id once it exists (local training)
    monitor: Any = None  # sees each validation point; may stop the job (flywheel.train.validation)
    quiet: bool = False  # no progress bar
    log: Callable[[str], None] | None = None  # one line per data check, reuse, trial


def run(request: TrainRequest):
    """Train as `request` says and return the TrainResult (a search's SearchResult, a hosted job's
    TrainResult or HostedJob); None on a non-main process of `accelerate launch`.

    Raises TrainingError (no base, a bad resume), TrainingDataError (a failed data check, a set of
    another method) or SpecError (a launcher the request cannot use)."""
    method = training_method(request.method)
    if request.resume:
        return _resume(request, method)
    if not request.base:
        raise TrainingError(f"{method.name}: give --base (a local: model, a checkpoint id or openai:MODEL), "
                            "or --resume JOB")
    check_launch(request.launch, searching=request.search is not None)

    base_ref, parent_id = resolve_base(request.store, request.base)
    config = request.config or load_train_config(method.name)
    preflight(config)
    training_set = training_set_for(request, method)
    if request.reuse:
        reused = _reused(request, method, training_set, config, base_ref, parent_id)
        if reused is not None:
            return reused
    if request.check_data:
        run_data_checks(training_set, config, spec=request.spec, store=request.store, base=request.base,
                        dataset=request.dataset, log=request.log)
    if request.search is not None:
        from flywheel.train.search import run_search

        return run_search(method.name, request.spec, request.store, training_set, request.search,
                          base=request.base, config=config, splits=request.splits, run_id=request.run_id,
                          log=request.log)
    if base_ref.startswith("openai:"):
        from flywheel.train.hosted import train_hosted

        return train_hosted(method.name, request.spec, request.store, training_set, base=base_ref, config=config,
                            evaluate=request.evaluate, splits=request.splits, **request.hosted_options)
    if request.launch.kind == "accelerate":
        return _launch(request, method, training_set, config)
    return method.train(request.spec, request.store, training_set, base=request.base, config=config,
                        **_trainer_options(request))


def check_launch(launch: LaunchSpec, *, searching: bool) -> None:
    """SpecError when the launcher cannot run this request (a search's trials train in this process)."""
    if launch.kind == "accelerate" and searching:
        raise SpecError("launcher: a search's trials train in this process; drop `launcher` or `search`")


def training_set_for(request: TrainRequest, method: TrainingMethod | None = None) -> TrainingSet:
    """The set `request` trains on: its loaded set, a platform JSONL file or recorded set id (`data`),
    else built from the store by the method (SFT: passing captures; DPO: best-vs-worst pairs; RFT:
    the train prompts) with `set_options` and `prompt`."""
    method = method or training_method(request.method)
    data, store = request.data, request.store
    if isinstance(data, TrainingSet):
        if data.kind != method.name:
            raise TrainingDataError(f"a {data.kind} set was given; {method.name} needs a {method.name} set")
        return data
    if data:
        if data.startswith("ts-"):
            loaded = load_training_set(store, data)
            if loaded.kind != method.name:
                raise TrainingDataError(f"{data} is a {loaded.kind} set; {method.name} needs a {method.name} set")
            return loaded
        return load_training_file(method.name, data)
    options = dict(request.set_options)
    if request.prompt is not None:
        options["prompt"] = request.prompt
    if request.dataset is not None:
        options["dataset"] = request.dataset
    return method.build_set(request.spec, store, **options)


def _trainer_options(request: TrainRequest) -> dict[str, Any]:
    method = training_method(request.method)
    options: dict[str, Any] = {"evaluate": request.evaluate, "splits": request.splits, "quiet": request.quiet,
                               "monitor": request.monitor, "callbacks": request.callbacks, "fresh": request.fresh,
                               "on_job": request.on_job}
    if request.prompt is not None:
        options["prompt"] = request.prompt
    if request.grader_set is not None and method.grader_rewards:
        options["grader_set"] = request.grader_set
    return options


@dataclass
class ResumePoint:
    """Where a training job stands for a caller that resumes its own jobs by id (the API)."""

    job_id: str
    finished: bool  # it finished training (its chosen checkpoint is registered)
    step: int | None  # the last complete saved step it can continue from; None: nothing to resume

    @property
    def resumable(self) -> bool:
        return not self.finished and self.step is not None


def resume_point(store: Store, job_id: str | None) -> ResumePoint | None:
    """The ResumePoint of training job `job_id`, or None when there is no such job."""
    if not job_id:
        return None
    try:
        job = store.get_training_job(job_id)
    except FlywheelError:
        return None
    finished = job.status == "succeeded"
    saved = None if finished else last_saved_step(job.output_dir)
    return ResumePoint(job_id, finished, saved[0] if saved else None)


def _resume(request: TrainRequest, method: TrainingMethod):
    store, job_id = request.store, request.resume
    try:
        job = store.get_training_job(job_id)
    except FlywheelError as exc:
        raise TrainingError(str(exc)) from None
    if job.method != method.name or job.backend != "local":
        raise TrainingError(f"job {job_id} is a {job.backend} {job.method} job; resume it with "
                            f"`flywheel train {job.method} SPEC --resume {job_id}` (local jobs only)")
    if request.launch.kind == "accelerate":
        return _launch(request, method, None, None)
    config = method.config.model_validate_json(job.config_json)
    training_set = load_training_set(store, job.training_set_id)
    return method.train(request.spec, store, training_set, base=job.base_model, config=config,
                        **{**_trainer_options(request), "resume": job_id})


# -- reuse: never train the same job twice ---------------------------------------------------------
def _reused(request: TrainRequest, method: TrainingMethod, training_set: TrainingSet, config: TrainConfig,
            base_ref: str, parent_id: str | None):
    """The result an identical earlier job (or, for a search, the same search of this wheel run)
    finished, or None."""
    store, say = request.store, request.log or (lambda line: None)
    if request.search is not None:
        from flywheel.train.search import SearchResult

        if request.run_id is None:
            return None
        training_set = record_training_set(store, training_set)  # its id names the search's data
        done = [s for s in store.training_searches([request.run_id])
                if s["status"] == "succeeded" and s["method"] == method.name and s["base_model"] == base_ref
                and s["training_set_id"] == training_set.id
                and s["settings_json"] == request.search.model_dump_json() and s["best_checkpoint_id"]]
        if not done:
            return None
        row = done[-1]
        say(f"reusing search {row['id']}, finished before")
        return SearchResult(id=row["id"], method=method.name, sampler=row["sampler"], signal="", metric="",
                            trials=[], best=None, checkpoint=load_checkpoint(store, row["best_checkpoint_id"]),
                            reason=row["reason"], comparisons=[], stopped_by="", wall_s=0.0, budget_s=None)
    checkpoint = store.find_checkpoint(method=method.name, training_set_hash=training_set.content_hash,
                                       config_json=json.dumps(config.model_dump()),
                                       base_model=base_ref.split("+", 1)[0])
    if checkpoint is None or checkpoint.parent_id != parent_id:
        return None
    say(f"reusing {checkpoint.id}, trained before")
    return TrainResult(method=method.name, checkpoint=checkpoint, job_id=checkpoint.job_id or "",
                       training_set_id=checkpoint.training_set_id or "", metrics=checkpoint.metrics, reused=True)


# -- accelerate launch: every process runs `run` through flywheel.train.worker ---------------------
def _launch(request: TrainRequest, method: TrainingMethod, training_set: TrainingSet | None,
            config: TrainConfig | None) -> TrainResult:
    """Run the request on every process of `accelerate launch` (`python -m flywheel.train.worker`);
    rank 0 registers the checkpoint and writes the result file read back here. The set is recorded
    (and checked) here once; the checkpoint is evaluated here, in one process."""
    import tempfile

    store = request.store
    if not Path(request.spec.source).is_file():
        raise SpecError(f"accelerate launch: the eval spec {request.spec.source!r} is no file the processes can load")
    scratch = store.artefact_dir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    worker_request = {"method": method.name, "spec": str(Path(request.spec.source).resolve()),
                      "db": str(Path(store.path).resolve()), "resume": request.resume, "quiet": request.quiet}
    if training_set is not None:
        worker_request.update(base=request.base, data=record_training_set(store, training_set).id,
                              config=config.model_dump(mode="json"))
    launch = request.launch
    say = request.log or (lambda line: None)
    say(f"{method.name}: accelerate launch, {launch.num_processes or 'config'} processes"
        + (" on CPU" if launch.cpu else ""))
    with tempfile.TemporaryDirectory(prefix=f"launch-{method.name}-", dir=scratch) as folder:
        request_path, result_path = Path(folder) / "request.json", Path(folder) / "result.json"
        request_path.write_text(json.dumps(worker_request), encoding="utf-8")
        launch_training(launch, ["flywheel.train.worker", str(request_path), str(result_path)],
                        stdout=_stderr_fd())
        try:
            result = TrainResult.from_dict(json.loads(result_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"{method.name}: accelerate launch wrote no result ({exc})") from None
    if request.evaluate:
        result.evals = evaluate_checkpoint(request.spec, store, result.checkpoint,
                                           parent_ref=_parent_ref(store, result), splits=request.splits)
        result.checkpoint = store.get_checkpoint(result.checkpoint.id)  # with its evals
    return result


def _parent_ref(store: Store, result: TrainResult) -> str:
    return store.get_training_job(result.job_id).base_model


def _stderr_fd() -> int | None:
    """The workers' stdout goes to this process's stderr, so a `--json` result alone is on stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
