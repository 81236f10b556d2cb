"""Shared fixtures: a temp store, a tiny real model built from a config, small eval specs.

The tiny model is a real transformers LlamaForCausalLM (SmolLM2's tokenizer and chat template,
random 2-layer weights), so harness tests exercise the real local backend in milliseconds. Tests
that need the embedded SmolLM2 itself are marked `slow`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from flywheel.store import Store

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]

# Training tests train on a handful of rows to stay fast; the platform's minimum of 10 examples
# (flywheel.train.datachecks) is lowered for them here, in this process and the CLI subprocesses it
# starts. tests/test_train_datachecks.py sets min_examples explicitly to test the check itself.
os.environ.setdefault("FLYWHEEL_MIN_EXAMPLES", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from flywheel.models.loading import materialise_embedded

    return materialise_embedded("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def chatty_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Like tiny_model_dir, but with large random weights so greedy replies are varied words
    (tiny_model_dir mostly emits special tokens, which decode to ""): for tests comparing texts."""
    from serving_helpers import build_chatty_model

    return build_chatty_model(tmp_path_factory.mktemp("chatty"), tiny_model_dir)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.open(tmp_path / "flywheel.db")
    yield s
    s.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_rows(n_per_split: int = 4) -> list[dict]:
    rows = []
    for split in ("train", "valid", "test"):
        for i in range(n_per_split):
            label = LABELS[i % len(LABELS)]
            rows.append({"id": f"{split}-{i}", "text": f"question {i} about {label.replace('_', ' ')}",
                         "label": label, "split": split})
    return rows


def spec_dict(model: str, **overrides) -> dict:
    spec = {
        "name": "tiny",
        "dataset": {"path": "data.jsonl", "id_field": "id"},
        "split": {"column": "split"},
        "input": [
            {"role": "system", "content": "Answer with one label: " + ", ".join(LABELS)},
            {"role": "user", "content": "{{item.text}}"},
        ],
        "model": model,
        "sampling": {"temperature": 0, "max_tokens": 6},
        "graders": [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                     "reference": "{{item.label}}", "operation": "ilike"}],
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def tiny_spec(tmp_path, tiny_model_dir) -> Path:
    """An eval spec on disk: 12 items (4 per split) answered by the tiny model."""
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec_dict(f"local:{tiny_model_dir}")), encoding="utf-8")
    return path
