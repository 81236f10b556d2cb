"""Helpers for the capture and training tests: a tiny eval on disk, quick training configs.

Training runs real TRL steps on `tiny_model_dir` (a random 2-layer Llama with SmolLM2's tokenizer),
in fp32 with a high learning rate so a handful of steps visibly moves the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import make_rows, spec_dict, write_jsonl

from flywheel.spec import load_eval_spec
from flywheel.train import DPOSpec, RFTSpec, SFTSpec

QUICK = dict(precision="fp32", logging_steps=1, batch_size=4)


def quick_sft(**overrides) -> SFTSpec:
    return SFTSpec(**{**QUICK, "max_steps": 6, "learning_rate": 2e-2, **overrides})


def quick_dpo(**overrides) -> DPOSpec:
    return DPOSpec(**{**QUICK, "max_steps": 3, "learning_rate": 5e-3, **overrides})


def quick_rft(**overrides) -> RFTSpec:
    return RFTSpec(**{**QUICK, "max_steps": 2, "batch_size": 2, "num_generations": 4, "learning_rate": 2e-2,
                      "max_completion_length": 6, **overrides})


def write_eval(folder: Path, model: str, n_per_split: int = 4, **overrides) -> Path:
    """An eval spec (and its data) in `folder`; returns the spec path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data.jsonl", make_rows(n_per_split))
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump(spec_dict(model, **overrides)), encoding="utf-8")
    return path


def tiny_eval(folder: Path, model_dir: Path, **overrides):
    return load_eval_spec(write_eval(folder, f"local:{model_dir}", **overrides))


def events(store, job_id: str) -> list[dict]:
    return [json.loads(e["data_json"]) for e in store.training_events(job_id) if e["type"] == "metrics"]
