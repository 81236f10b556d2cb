"""The KV cache is passed and read by its current transformers name: a model command prints no
`past_key_values` deprecation warning (transformers logs it once per process, so a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import make_rows, spec_dict, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_an_eval_with_a_shared_prefix_cache_prints_no_cache_deprecation(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    spec = tmp_path / "eval.yaml"
    # a long shared system prompt: generation reuses its KV cache (the path that passed the old name)
    data = spec_dict(f"local:{tiny_model_dir}")
    data["input"][0]["content"] = "You route support tickets. " * 4 + data["input"][0]["content"]
    spec.write_text(yaml.safe_dump(data), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    ran = subprocess.run([sys.executable, "-m", "flywheel", "eval", str(spec), "--split", "valid",
                          "--db", str(tmp_path / "x.db")], capture_output=True, text=True, env=env, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "model calls 4" in ran.stdout
    assert "past_key_values" not in ran.stderr + ran.stdout


def test_the_cache_name_follows_the_models_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    import torch

    from flywheel.models.kv_cache import cache_kwarg, output_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        cache = output_cache(first)
        assert cache is not None and cache.get_seq_length() == 3
        second = model(input_ids=torch.tensor([[4]]), use_cache=True, **{name: cache})
    assert output_cache(second).get_seq_length() == 4
