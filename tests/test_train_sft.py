"""SFT with TRL + PEFT on the tiny model: real steps, the loss falls, the adapter changes, the
checkpoint is registered with its lineage and evaluated by the harness as a new iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import events, quick_sft, tiny_eval

from flywheel.distill import capture
from flywheel.errors import ModelError
from flywheel.models import ChatRequest, load_model
from flywheel.store import Store
from flywheel.train import TrainingDataError, TrainingSet, build_sft_set
from flywheel.train.local import load_for_training
from flywheel.train.sft import train_sft


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One SFT run (6 steps) on labelled answers, evaluated on valid."""
    folder = tmp_path_factory.mktemp("sft")
    spec = tiny_eval(folder, tiny_model_dir, n_per_split=6)
    store = Store.open(folder / "flywheel.db")
    capture(spec, store, "reference:label")
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=quick_sft(),
                       splits=("valid",), quiet=True)
    yield spec, store, result
    store.close()


def test_loss_falls_and_the_adapter_changes(trained):
    _, store, result = trained
    m = result.metrics
    assert m["steps"] == 6 and m["logged"] == 6
    assert m["last_loss"] < m["first_loss"]
    assert m["adapter_tensors"] > 0 and m["adapter_tensors_changed"] == m["adapter_tensors"]
    assert m["trained_tokens"] < m["tokens"]  # assistant-only loss
    logged = events(store, result.job_id)
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_is_registered_with_lineage(trained):
    spec, store, result = trained
    ckpt = result.checkpoint
    stored = store.get_checkpoint(ckpt.id)
    assert stored.base_model == spec.model and stored.method == "sft" and stored.backend == "local"
    ts = store.db.execute("select content_hash, n_rows from training_sets where id = ?",
                          [stored.training_set_id]).fetchone()
    assert ts == (stored.training_set_hash, 6)
    assert stored.config["lora"]["r"] == 16
    assert stored.metrics["last_loss"] == result.metrics["last_loss"]
    job = store.db.execute("select status, checkpoint_id from training_jobs where id = ?", [result.job_id]).fetchone()
    assert job == ("succeeded", ckpt.id)
    folder = Path(ckpt.path)
    assert folder.parent.name == "ckpt" and folder.parent.parent.name == ".flywheel"
    assert (folder / "adapter_config.json").exists() and (folder / "flywheel_checkpoint.json").exists()
    assert not (folder / "ref").exists()  # only the trained adapter is saved
    lineage = json.loads((folder / "flywheel_checkpoint.json").read_text())
    assert lineage["training_set_hash"] == stored.training_set_hash


def test_the_adapter_loads_and_is_evaluated_as_a_new_iteration(trained):
    spec, store, result = trained
    model = load_model(result.checkpoint.model_ref, {"dtype": "fp32"})
    [completion] = model.generate([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
    assert completion.error is None
    [valid] = result.evals
    iteration = store.get_iteration(valid.iteration_id)
    assert iteration.stage == "sft" and iteration.split == "valid"
    assert iteration.model_ref == result.checkpoint.model_ref
    parent = store.get_iteration(iteration.parent_id)
    assert parent.model_ref == spec.model and parent.split == "valid"
    assert iteration.decision in ("promoted", "rejected") and "McNemar" in iteration.reason
    assert valid.n == 6 and valid.ci[0] - 1e-9 <= valid.score <= valid.ci[1] + 1e-9
    assert store.get_checkpoint(result.checkpoint.id).evals["valid"]["iteration_id"] == valid.iteration_id


def test_adapter_on_the_wrong_base_is_refused(trained, smollm2_dir):
    _, _, result = trained
    with pytest.raises(ModelError, match="adapter was trained on .* not on"):
        load_for_training(f"local:{smollm2_dir}+{result.checkpoint.path}", bf16=False)


def test_packed_training_runs_padding_free_on_sdpa_and_eager(trained):
    """Packing was refused on SDPA/eager models; transformers' masks honour packed position ids
    (tests/test_train_packing.py proves the losses agree), so it trains and the loss falls."""
    spec, store, _ = trained
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=quick_sft(packing=True),
                       evaluate=False, quiet=True)
    m = result.metrics
    assert m["steps"] >= 1 and m["adapter_tensors_changed"] == m["adapter_tensors"]
    assert m["gradient_checkpointing"] is False and m["liger"] is False  # auto, on this CPU with a tiny model


def test_empty_or_wrong_sets_are_refused(trained):
    spec, store, _ = trained
    with pytest.raises(TrainingDataError, match="empty SFT training set"):
        train_sft(spec, store, TrainingSet("sft", []), base=spec.model)
    with pytest.raises(TrainingDataError, match="SFT needs an SFT training set"):
        train_sft(spec, store, TrainingSet("dpo", [{"input": {"messages": [{"role": "user", "content": "q"}]},
                                                    "preferred_output": [{"role": "assistant", "content": "a"}],
                                                    "non_preferred_output": [{"role": "assistant", "content": "b"}]}]),
                  base=spec.model, config=quick_sft(), evaluate=False, quiet=True)
