"""Training: captured outputs become SFT rows, DPO pairs and RFT prompts; TRL + PEFT train a LoRA
adapter locally (or the hosted platform trains remotely); the result is registered and evaluated.

`methods.py` is the table of methods (sft, dpo, rft); one file per method, TRL style: `sft.py`,
`dpo.py`, `rft.py` (GRPO); `sets.py` builds training sets out of the store, `formats.py` holds the
platform's JSONL formats and TRL's forms, `config.py` our configs (TRL/PEFT configs are built there
and nowhere else), `checkpoints.py` registers adapters, `local.py` is the shared local run,
`hosted.py` the fine-tuning API backend.

    from flywheel.train import train
    result = train("sft", spec, store, base="local:smollm2")   # set from the store, train, evaluate
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.checkpoints import Checkpoint, CheckpointError, load_checkpoint, register_checkpoint
from flywheel.train.config import DPOSpec, LoraSpec, RFTSpec, SFTSpec, TrainConfig
from flywheel.train.formats import TrainingDataError, TrainingSet, load_training_file, to_hf_dataset
from flywheel.train.methods import METHODS, TrainingMethod, load_train_config, training_method
from flywheel.train.sets import build_dpo_set, build_rft_set, build_sft_set, load_training_set, record_training_set
from flywheel.train.local import SplitEval, TrainingError, TrainResult, evaluate_checkpoint

__all__ = [
    "METHODS", "Checkpoint", "CheckpointError", "DPOSpec", "LoraSpec", "RFTSpec", "SFTSpec", "SplitEval",
    "TrainConfig", "TrainingMethod", "training_method",
    "TrainResult", "TrainingDataError", "TrainingError", "TrainingSet", "build_dpo_set", "build_rft_set",
    "build_sft_set", "build_training_set", "evaluate_checkpoint", "load_checkpoint", "load_train_config",
    "load_training_file", "load_training_set", "record_training_set", "register_checkpoint", "to_hf_dataset",
    "train",
]


def build_training_set(method: str, spec: EvalSpec, store: Store, *, data: str | None = None,
                       **options: Any) -> TrainingSet:
    """The set a method trains on: a platform JSONL file or recorded set id (`data`), else built
    from the store by the method (SFT: passing captures; DPO: best-vs-worst pairs; RFT: the train
    prompts); `options` go to the method's builder (min_score, max_per_item, min_margin, captures)."""
    chosen = training_method(method)
    if data:
        if data.startswith("ts-"):
            loaded = load_training_set(store, data)
            if loaded.kind != chosen.name:
                raise TrainingDataError(f"{data} is a {loaded.kind} set; {method} needs a {chosen.name} set")
            return loaded
        return load_training_file(chosen.name, data)
    return chosen.build_set(spec, store, **options)


def train(method: str, spec: EvalSpec, store: Store, *, base: str | None, config: TrainConfig | None = None,
          data: str | None = None, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"),
          quiet: bool = False, hosted_options: dict[str, Any] | None = None, resume: str | None = None,
          monitor: Any = None, search=None, log: Callable[[str], None] | None = None, **set_options: Any):
    """Build (or load) the training set, check it, train with `method` from `base`, register and evaluate.

    `base` is a `local:` model (trained here with TRL), a checkpoint id, or an `openai:` model
    (a hosted fine-tuning job; `hosted_options` go to `hosted.HostedBackend`). The data checks
    (`flywheel.train.datachecks`) go to `log` and are stored with the set; a failed one raises
    TrainingDataError before training. `resume` continues a killed local job from its last saved
    step, with the job's own set, base and config. `monitor(point)` sees each validation point
    (flywheel.train.validation) and may stop the job. With `search` (a `search.SearchSpec`) it runs a
    hyper-parameter search instead and returns its `SearchResult`; `log` receives one line per trial."""
    from flywheel.train.checkpoints import resolve_base
    from flywheel.train.datachecks import preflight, run_data_checks

    chosen = training_method(method)
    if resume:
        job = _resumable(store, resume, chosen.name)
        config = chosen.config.model_validate_json(job["config_json"])
        training_set = load_training_set(store, job["training_set_id"])
        return chosen.train(spec, store, training_set, base=job["base_model"], config=config, evaluate=evaluate,
                            splits=splits, quiet=quiet, monitor=monitor, resume=resume)
    if not base:
        raise TrainingError(f"{method}: give --base (a local: model, a checkpoint id or openai:MODEL), or --resume JOB")
    base_ref, _ = resolve_base(store, base)
    config = config or load_train_config(method)
    preflight(config)
    training_set = build_training_set(method, spec, store, data=data, **set_options)
    run_data_checks(training_set, config, spec=spec, store=store, base=base, log=log)
    if search is not None:
        from flywheel.train.search import run_search

        return run_search(method, spec, store, training_set, search, base=base, config=config, splits=splits,
                          log=log)
    if base_ref.startswith("openai:"):
        from flywheel.train.hosted import train_hosted

        return train_hosted(method, spec, store, training_set, base=base_ref, config=config,
                            evaluate=evaluate, splits=splits, **(hosted_options or {}))
    return chosen.train(spec, store, training_set, base=base, config=config, evaluate=evaluate, splits=splits,
                        quiet=quiet, monitor=monitor)


def _resumable(store: Store, job_id: str, method: str) -> dict[str, Any]:
    from flywheel.errors import FlywheelError

    try:
        job = store.get_training_job(job_id)
    except FlywheelError as exc:
        raise TrainingError(str(exc)) from None
    if job["method"] != method or job["backend"] != "local":
        raise TrainingError(f"job {job_id} is a {job['backend']} {job['method']} job; resume it with "
                            f"`flywheel train {job['method']} SPEC --resume {job_id}` (local jobs only)")
    return job
