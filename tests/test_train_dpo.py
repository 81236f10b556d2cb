"""DPO with TRL on the tiny model: pairs from best-vs-worst captures, trained from an SFT adapter
(which DPO continues, against a frozen copy of itself), and from a bare base."""

from __future__ import annotations

import pytest
from train_helpers import events, quick_dpo, quick_sft, tiny_eval

from flywheel.distill import capture
from flywheel.train import TrainingDataError, TrainingSet, build_dpo_set, build_sft_set
from flywheel.train.dpo import train_dpo
from flywheel.train.sft import train_sft


@pytest.fixture
def captured(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    capture(spec, store, "reference:label")             # passing outputs
    capture(spec, store, spec.model, n=2, temperature=1.0)  # the student's failing ones
    return spec


def test_dpo_from_an_sft_checkpoint_continues_that_adapter(captured, store):
    spec = captured
    sft = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=quick_sft(max_steps=2),
                    evaluate=False, quiet=True)
    pairs = build_dpo_set(spec, store)
    assert len(pairs) == 4 and pairs.source["counts"]["mean_margin"] == 1.0
    result = train_dpo(spec, store, pairs, base=sft.checkpoint.id, config=quick_dpo(), evaluate=False, quiet=True)
    m = result.metrics
    assert m["steps"] == 3 and m["adapter_tensors_changed"] == m["adapter_tensors"] > 0
    assert m["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 1
    assert m["last_loss"] < m["first_loss"]
    assert result.checkpoint.parent_id == sft.checkpoint.id
    assert result.checkpoint.base_model == spec.model  # still an adapter on the same base
    assert any("rewards/margins" in e for e in events(store, result.job_id))


def test_dpo_needs_pairs(captured, store):
    with pytest.raises(TrainingDataError, match="empty DPO training set"):
        train_dpo(captured, store, TrainingSet("dpo", []), base=captured.model)


def test_dpo_validates_on_a_validation_file_of_pairs(captured, store, tmp_path):
    spec = captured
    pairs = build_dpo_set(spec, store)
    valid = pairs.to_jsonl(tmp_path / "valid_pairs.jsonl")
    result = train_dpo(spec, store, pairs, base=spec.model, evaluate=False, quiet=True,
                       config=quick_dpo(max_steps=4, eval_steps=2, save_steps=2, validation_file=str(valid)))
    logged = events(store, result.job_id)
    assert [e["step"] for e in logged if "eval_loss" in e] == [2, 4]
    assert [c["step"] for c in result.checkpoints] == [2, 4]
    assert all(c["valid_loss"] > 0 for c in result.checkpoints)
    assert result.best_reason.startswith("lowest valid loss")
