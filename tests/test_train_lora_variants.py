"""LoRA variants PEFT offers (DoRA, rsLoRA) as config keys, trained for real on the tiny model and
loaded back by evaluation; QLoRA's 4-bit base is refused where bitsandbytes cannot run (no CUDA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_helpers import quick_sft, tiny_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.models.local import LocalModel
from flywheel.store import Store
from flywheel.train import build_sft_set, load_train_config
from flywheel.train.config import to_peft
from flywheel.train.sft import train_sft


def test_the_keys_reach_peft():
    lora = load_train_config("sft", overrides=["lora.use_dora=true", "lora.use_rslora=true", "lora.r=4"]).lora
    peft = to_peft(lora)
    assert peft.use_dora is True and peft.use_rslora is True and peft.r == 4
    assert to_peft(load_train_config("sft").lora).use_dora is False
    with pytest.raises(Exception, match="lora.quantize_base: Input should be '4bit'"):
        load_train_config("sft", overrides=["lora.quantize_base=8bit"])


def _logits(model, tokenizer, text: str = "question 1 about pin blocked"):
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_a_variant_trains_is_saved_and_evaluation_loads_it(tmp_path, tiny_model_dir, variant):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=6, model_options={"dtype": "fp32"})
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    config = quick_sft(max_steps=4, lora={"r": 4, "alpha": 8, variant: True})
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=config, splits=("valid",),
                       quiet=True)
    m = result.metrics
    assert m["last_loss"] < m["first_loss"] and m["adapter_tensors_changed"] == m["adapter_tensors"] > 0
    folder = Path(result.checkpoint.path)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved[variant] is True and saved["use_dora" if variant == "use_rslora" else "use_rslora"] is False
    assert store.get_checkpoint(result.checkpoint.id).config["lora"][variant] is True
    # evaluation loaded it: one valid iteration of the checkpoint's model
    [valid] = result.evals
    assert valid.split == "valid" and valid.n == 6
    assert store.get_iteration(valid.iteration_id).model_ref == result.checkpoint.model_ref
    # and what it loads (the adapter merged into the base) computes what the trained PEFT model does
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = _logits(base, tokenizer)
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    if variant == "use_rslora":
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha/sqrt(r), not alpha/r
    else:
        assert "default" in layer.lora_magnitude_vector  # DoRA's magnitude, trained and saved
    expected = _logits(peft, tokenizer)
    local = LocalModel(result.checkpoint.model_ref, str(tiny_model_dir), str(folder), dtype="fp32")
    merged, _ = local.load()
    got = _logits(merged, tokenizer)
    assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(got, before, atol=1e-3)
    store.close()


def test_qlora_without_cuda_is_one_line_before_anything_loads(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    spec = tiny_eval(tmp_path, tiny_model_dir)
    db = tmp_path / "flywheel.db"
    assert CliRunner().invoke(main, ["capture", spec.source, "--teacher", "reference:label",
                                     "--db", str(db)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", "sft", spec.source, "--base", spec.model,
                                       "-s", "lora.quantize_base=4bit", "--db", str(db)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: lora.quantize_base=4bit: QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); none here: unset "
        "lora.quantize_base to train the base in bf16/fp32"]
    store = Store.open(db)
    assert store.db["training_jobs"].count == 0 and store.db["training_sets"].count == 0
    store.close()
