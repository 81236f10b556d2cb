"""Training: captured outputs become SFT rows, DPO pairs and RFT prompts; TRL + PEFT train a LoRA
adapter locally (or the hosted platform trains remotely); the result is registered and evaluated.

`methods.py` is the table of methods (sft, dpo, rft); one file per method, TRL style: `sft.py`,
`dpo.py`, `rft.py` (GRPO); `sets.py` builds training sets out of the store, `formats.py` holds the
platform's JSONL formats and TRL's forms, `config.py` our configs (TRL/PEFT configs are built there
and nowhere else), `checkpoints.py` registers adapters, `local.py` is the shared local run,
`hosted.py` the fine-tuning API backend, and `run.py` the one door every caller trains through
(the CLI, the wheel's weight stages and the API's fine-tuning jobs).

    from flywheel.train import TrainRequest, run
    result = run(TrainRequest(method="sft", spec=spec, store=store, base="local:smollm2"))  # build, train, evaluate
"""

from __future__ import annotations

from flywheel.errors import TrainingError
from flywheel.train.checkpoints import Checkpoint, CheckpointError, load_checkpoint, register_checkpoint
from flywheel.train.config import DPOSpec, LoraSpec, RFTSpec, SFTSpec, TrainConfig
from flywheel.train.formats import TrainingDataError, TrainingSet, load_training_file, to_hf_dataset
from flywheel.train.methods import METHODS, TrainingMethod, load_train_config, training_method
from flywheel.train.sets import build_dpo_set, build_rft_set, build_sft_set, load_training_set, record_training_set
from flywheel.train.local import SplitEval, TrainResult, evaluate_checkpoint
from flywheel.train.run import TrainRequest, run

__all__ = [
    "METHODS", "Checkpoint", "CheckpointError", "DPOSpec", "LoraSpec", "RFTSpec", "SFTSpec", "SplitEval",
    "TrainConfig", "TrainRequest", "TrainingMethod", "training_method",
    "TrainResult", "TrainingDataError", "TrainingError", "TrainingSet", "build_dpo_set", "build_rft_set",
    "build_sft_set", "evaluate_checkpoint", "load_checkpoint", "load_train_config",
    "load_training_file", "load_training_set", "record_training_set", "register_checkpoint", "run",
    "to_hf_dataset",
]
