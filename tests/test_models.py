import json
from pathlib import Path

import pytest

from flywheel.errors import ModelError
from flywheel.models import ChatRequest, Sampling, load_model, parse_model_ref

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_parse_model_refs():
    assert parse_model_ref("local:smollm2") == ("local", "smollm2", None)
    assert parse_model_ref("local:smollm2+ckpt/sft-3") == ("local", "smollm2", "ckpt/sft-3")
    assert parse_model_ref("openai:gpt-4o-mini") == ("openai", "gpt-4o-mini", None)


@pytest.mark.parametrize("ref", ["smollm2", "hf:gpt2", "local:", "foo:bar"])
def test_unknown_model_reference(ref):
    with pytest.raises(ModelError, match="unknown model reference"):
        load_model(ref)


def test_unknown_local_model():
    with pytest.raises(ModelError, match="unknown local model 'nosuchmodel'"):
        load_model("local:nosuchmodel")


def test_fingerprint_needs_no_weights(tiny_model_dir):
    model = load_model(f"local:{tiny_model_dir}")
    assert model.fingerprint.startswith("dir:")
    assert model._model is None  # computing the fingerprint loaded nothing


def test_batched_greedy_is_deterministic_and_matches_single(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    sampling = Sampling(max_tokens=5)
    prompts = [[{"role": "user", "content": "word " * n}] for n in (1, 7, 3, 12)]
    batch = model.generate([ChatRequest(p, sampling) for p in prompts])
    again = model.generate([ChatRequest(p, sampling) for p in prompts])
    single = [model.generate([ChatRequest(p, sampling)])[0] for p in prompts]
    assert all(c.text for c in batch) and len({c.text for c in batch}) > 1  # real, varied words
    assert [c.text for c in batch] == [c.text for c in again]
    assert [c.text for c in batch] == [c.text for c in single]
    assert all(c.completion_tokens <= 5 for c in batch)
    assert [c.prompt_tokens for c in batch] == [c.prompt_tokens for c in single]


def test_lora_adapter_on_top_changes_output_and_fingerprint(chatty_dir, tmp_path):
    tiny_model_dir = chatty_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")

    sampling = Sampling(max_tokens=6)
    plain = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32"})
    tuned = load_model(f"local:{tiny_model_dir}+{tmp_path / 'adapter'}", {"dtype": "fp32"})
    assert tuned.fingerprint.startswith(plain.fingerprint + "+adapter:")
    assert tuned.generate([ChatRequest(QUESTION, sampling)])[0].text != plain.generate([ChatRequest(QUESTION, sampling)])[0].text

    # Merged for inference: plain weights, no autograd state, and the output head reads a contiguous
    # input (a strided one with frozen weights sends torch's matmul down a per-row weight copy).
    model, _ = tuned.load()
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not any(param.requires_grad for param in model.parameters())
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].is_contiguous()))
    for decoder in ("continuous", "hf"):
        tuned.decoder = decoder
        tuned.generate([ChatRequest(QUESTION, sampling),
                        ChatRequest([{"role": "user", "content": "Name three rivers of Europe, please."}], sampling)])
    hook.remove()
    assert seen and all(seen)


def test_adapter_folder_must_exist(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        load_model(f"local:{tiny_model_dir}+{tmp_path}")


def test_adapter_for_another_base_is_refused(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "meta-llama/Llama-3-8B", "r": 4,
         "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    model = load_model(f"local:{tiny_model_dir}+{adapter}")
    with pytest.raises(ModelError, match="adapter was trained on 'meta-llama/Llama-3-8B'"):
        model.load()


@pytest.mark.slow
def test_embedded_smollm2_answers_and_is_deterministic(smollm2_dir):
    assert (Path(smollm2_dir) / "model.safetensors").exists()
    model = load_model("local:smollm2")
    assert model.fingerprint.startswith("embedded:smollm2:")
    requests = [ChatRequest(QUESTION, Sampling(max_tokens=12)),
                ChatRequest([{"role": "user", "content": "Name a colour."}], Sampling(max_tokens=12))]
    first = model.generate(requests)
    assert "Paris" in first[0].text
    assert [c.text for c in model.generate(requests)] == [c.text for c in first]
    assert model.chat([QUESTION], max_tokens=12) == [first[0].text]


def test_shared_prefix_cache_gives_the_same_outputs(chatty_dir):
    tiny_model_dir = chatty_dir
    system = {"role": "system", "content": "You sort customer messages into labels. " * 4}
    requests = [ChatRequest([system, {"role": "user", "content": "message " * n}], Sampling(max_tokens=5))
                for n in (1, 9, 4, 2, 6)]
    cached = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32", "batch_size": 3})
    plain = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32", "batch_size": 3, "prefix_cache": False})
    rows = [cached.load()[1](cached.render_prompt(r.messages), add_special_tokens=False).input_ids for r in requests]
    assert cached._shared_prefix(rows) > 8  # the system prompt really is shared and reused
    with_prefix = cached.generate(requests)
    assert cached._prefix_memo is not None
    assert all(c.text for c in with_prefix) and len({c.text for c in with_prefix}) > 1
    assert [c.text for c in with_prefix] == [c.text for c in plain.generate(requests)]
    assert [c.prompt_tokens for c in with_prefix] == [len(r) for r in rows]


# -- one model cache per process -------------------------------------------------------------------
def test_the_cache_keeps_one_model_per_reference_and_options(tiny_model_dir, tmp_path):
    import shutil

    from flywheel.models import ModelCache, cached_model

    ref = f"local:{tiny_model_dir}"
    cache = ModelCache(keep=2)
    fp32 = cache.get(ref, {"dtype": "fp32"})
    assert cache.get(ref, {"dtype": "fp32"}) is fp32
    assert cache.get(ref, {"dtype": "bf16"}) is not fp32  # other options, another model
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    cache.get(f"local:{copy}")  # a third model: the least recently used (fp32) goes
    assert len(cache) == 2 and cache.get(ref, {"dtype": "fp32"}) is not fp32
    # weights rewritten in place under the same path: built again, with the new fingerprint
    before = cache.get(f"local:{copy}")
    printed = before.fingerprint
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    after = cache.get(f"local:{copy}")
    assert after is not before and after.fingerprint != printed
    assert cached_model(ref, {"dtype": "fp32"}) is cached_model(ref, {"dtype": "fp32"})  # the process's cache
    with pytest.raises(ModelError, match="unknown local model"):
        cache.get("local:nosuchmodel")


def test_threads_sharing_a_cached_model_get_what_one_thread_gets(tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    from flywheel.models import ModelCache

    model = ModelCache().get(f"local:{tiny_model_dir}", {"dtype": "fp32"})
    requests = [ChatRequest([{"role": "user", "content": f"question {i}"}], Sampling(max_tokens=6)) for i in range(4)]
    alone = [c.text for c in model.generate(requests)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: [c.text for c in model.generate(requests)], range(4)))
    assert together == [alone] * 4
