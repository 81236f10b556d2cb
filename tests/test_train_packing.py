"""Padding-free packing, gradient checkpointing by memory, Liger by availability (flywheel.train.config)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from train_helpers import quick_sft

from flywheel.errors import TrainingError
from flywheel.train import TrainingSet
from flywheel.train.config import (activation_bytes, checkpointing_needed, resolve_gradient_checkpointing,
                                   resolve_liger, sft_args)


def _sft_set(n: int) -> TrainingSet:
    words = ["alpha", "bravo", "charlie delta", "echo foxtrot golf", "hotel", "india juliet"]
    return TrainingSet("sft", [{"messages": [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": f"question {i}: " + " ".join(words[: 1 + i % len(words)])},
        {"role": "assistant", "content": words[i % len(words)]}]} for i in range(n)])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(tiny_model_dir, tmp_path, attention):
    """The same rows as one padded batch and as one padding-free packed sequence (position ids restart
    at each example) through the trainer's own collator and loss: the same loss, so no example
    attends across its boundary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.train.sft import build_sft_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    training_set = _sft_set(6)
    losses = {}
    for packing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model.config._attn_implementation = attention
        config = quick_sft(packing=packing, batch_size=6, max_length=1024, gradient_checkpointing=False)
        trainer = build_sft_trainer(model, tokenizer, training_set, config, tmp_path / f"p{packing}",
                                    bf16=False, quiet=True).trainer
        [batch] = list(trainer.get_train_dataloader())
        assert ("position_ids" in batch and "attention_mask" not in batch) == packing
        if packing:  # one row holding all six examples, positions restarting at each
            assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"][0] == 0).sum()) == 6
        trainer.model.eval()
        with torch.no_grad():
            losses[packing] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_packed_sequences_do_not_see_each_other_and_unpacked_would(tiny_model_dir):
    """The check above can fail: with the packed mask's boundaries ignored (a cache present, as in
    generation), the second example's logits change."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    first, second = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 5:]
        leaky = model(input_ids=ids, position_ids=positions, past_key_values=DynamicCache(config=model.config),
                      use_cache=True).logits[0, 5:]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_activation_estimate_and_the_checkpointing_rule():
    qwen_05b = dict(hidden=896, layers=24, intermediate=4864, vocab=151936)
    small = activation_bytes(**qwen_05b, tokens=2048)
    large = activation_bytes(**qwen_05b, tokens=32768)
    assert large == 16 * small  # linear in tokens
    assert activation_bytes(**qwen_05b, tokens=2048, dtype_bytes=4) > small
    h100 = 80 * 2**30
    assert not checkpointing_needed(small, h100)
    assert checkpointing_needed(large, h100)  # ~61 GiB of activations on an 80 GiB card
    assert checkpointing_needed(small, h100, share=0.01)


def test_gradient_checkpointing_auto_sizes_the_step_on_the_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert resolve_gradient_checkpointing(quick_sft(), model, bf16=False) is False  # a tiny model fits
    assert resolve_gradient_checkpointing(quick_sft(gradient_checkpointing=True), model, bf16=False) is True
    # a step of 2**40 tokens cannot fit any machine: auto turns recomputation on
    huge = quick_sft(batch_size=2**20, max_length=2**20)
    assert resolve_gradient_checkpointing(huge, model, bf16=False) is True
    assert sft_args(huge, tmp_path, bf16=False, model=model).activation_checkpointing is True
    assert sft_args(quick_sft(), tmp_path, bf16=False, model=model).activation_checkpointing is False


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available(),
                    reason="Liger and a GPU are here")
def test_liger_true_without_liger_or_a_gpu_is_one_clean_line(tmp_path):
    assert resolve_liger("auto") is False and resolve_liger(False) is False
    with pytest.raises(TrainingError) as caught:
        sft_args(quick_sft(liger=True), tmp_path, bf16=False)
    assert "liger=true" in str(caught.value) and "\n" not in str(caught.value)
    assert sft_args(quick_sft(liger="auto"), tmp_path, bf16=False).use_liger_kernel is False
