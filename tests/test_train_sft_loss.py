"""The compact SFT loss (labelled positions only) against TRL's own loss: same curve, same adapter."""

from __future__ import annotations

import pytest
import torch
from train_helpers import quick_sft, tiny_eval

from flywheel.distill import capture
from flywheel.store import Store
from flywheel.train import build_sft_set
from flywheel.train.sft import build_sft_trainer
from flywheel.train.sft_loss import CompactLossSFTTrainer


@pytest.fixture(scope="module")
def sft_set(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("sft-loss")
    spec = tiny_eval(folder, tiny_model_dir, n_per_split=8)
    store = Store.open(folder / "flywheel.db")
    capture(spec, store, "reference:label")
    training_set = build_sft_set(spec, store)
    store.close()
    return training_set


def run(tiny_model_dir, training_set, tmp_path, *, compact: bool, loss: str = "assistant"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = quick_sft(max_steps=5, loss=loss, seed=3)
    trainer = build_sft_trainer(model, tokenizer, training_set, config, tmp_path / f"out-{compact}",
                                bf16=False, quiet=True, compact_loss=compact).trainer
    assert isinstance(trainer, CompactLossSFTTrainer) == compact
    seen = set()
    attention = next(m for name, m in model.named_modules() if name.endswith("self_attn"))
    attention.register_forward_hook(lambda module, args, out: seen.add(module.config._attn_implementation))
    trainer.train()
    assert seen == ({"eager"} if compact else {"sdpa"})  # eager while training on CPU...
    assert model.config._attn_implementation == "sdpa"  # ...and SDPA again afterwards
    logs = [e for e in trainer.state.log_history if "loss" in e]
    adapter = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    return logs, adapter


@pytest.mark.parametrize("loss", ["assistant", "all"])
def test_compact_loss_gives_the_same_loss_curve_and_adapter(tiny_model_dir, sft_set, tmp_path, loss):
    trl_logs, trl_adapter = run(tiny_model_dir, sft_set, tmp_path, compact=False, loss=loss)
    ours_logs, ours_adapter = run(tiny_model_dir, sft_set, tmp_path, compact=True, loss=loss)
    assert len(trl_logs) == len(ours_logs) == 5
    trl_loss = [e["loss"] for e in trl_logs]
    assert trl_loss[-1] < trl_loss[0]  # a real curve, not a constant
    assert [e["loss"] for e in ours_logs] == pytest.approx(trl_loss, rel=1e-4)
    for key in ("mean_token_accuracy", "entropy", "num_tokens"):
        assert [e[key] for e in ours_logs] == pytest.approx([e[key] for e in trl_logs], rel=1e-3, abs=1e-4)
    assert trl_adapter.keys() == ours_adapter.keys()
    # Compared as a whole: Adam turns a near-zero gradient's rounding into a full-size step for that
    # one element, so single elements may differ while the adapter as a whole is the same.
    difference = sum((ours_adapter[k] - v).norm() ** 2 for k, v in trl_adapter.items()) ** 0.5
    size = sum(v.norm() ** 2 for v in trl_adapter.values()) ** 0.5
    assert difference / size < 1e-3
