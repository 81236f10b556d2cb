"""model_options.engine: one registry of engines (flywheel.models.engines), clean errors, the cache key."""

from __future__ import annotations

import importlib.util

import pytest

from flywheel.errors import ModelError
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.models.engines import ENGINES, engine_named


def test_the_registry_names_every_engine_with_a_description():
    assert list(ENGINES) == ["continuous", "hf", "vllm"]
    assert all(engine.description for engine in ENGINES.values())
    assert ENGINES["vllm"].extra == "vllm" and ENGINES["continuous"].package is None


def test_engine_picks_the_local_decoding_path(tiny_model_dir):
    ref = f"local:{tiny_model_dir}"
    assert load_model(ref, {}).decoder == "continuous"
    assert load_model(ref, {"engine": "hf"}).decoder == "hf"


def test_an_unknown_engine_is_one_line_listing_the_known_ones(tiny_model_dir):
    with pytest.raises(ModelError, match=r"model_options\.engine: unknown engine 'fast'; use one of continuous, hf, vllm"):
        load_model(f"local:{tiny_model_dir}", {"engine": "fast"})


def test_the_old_decoder_option_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ModelError, match="unknown option.*decoder"):
        load_model(f"local:{tiny_model_dir}", {"decoder": "hf"})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_without_the_package_is_one_clean_line_naming_the_extra(tiny_model_dir):
    with pytest.raises(ModelError) as caught:
        load_model(f"local:{tiny_model_dir}", {"engine": "vllm"})
    message = str(caught.value)
    assert "\n" not in message
    assert "needs the vllm package" in message and "pip install 'flywheel[vllm]'" in message
    with pytest.raises(ModelError, match="needs the vllm package"):
        engine_named("vllm")


def test_compile_is_an_hf_option_only_and_keys_the_cache(tiny_model_dir):
    from flywheel.harness import cache_key

    ref = f"local:{tiny_model_dir}"
    with pytest.raises(ModelError, match="unknown option.*compile"):
        load_model(ref, {"compile": True})  # the continuous engine takes no compile option
    with pytest.raises(ModelError, match="compile must be true or false"):
        load_model(ref, {"engine": "hf", "compile": "yes"})
    request = ChatRequest([{"role": "user", "content": "hi"}], Sampling(max_tokens=4))
    keys = {cache_key(load_model(ref, options).fingerprint, request)
            for options in ({"engine": "hf"}, {"engine": "hf", "compile": True}, {"engine": "continuous"})}
    assert len(keys) == 3


@pytest.mark.slow
def test_hf_with_static_cache_and_compile_answers_as_plain_hf(tiny_model_dir):
    """The compiled path runs on CPU too (inductor); greedy outputs match the uncompiled hf engine."""
    ref = f"local:{tiny_model_dir}"
    requests = [ChatRequest([{"role": "user", "content": text}], Sampling(max_tokens=6))
                for text in ("hello there", "what is two and two", "name a colour")]
    plain = load_model(ref, {"engine": "hf", "dtype": "fp32", "batch_size": 4}).generate(requests)
    compiled = load_model(ref, {"engine": "hf", "dtype": "fp32", "batch_size": 4, "compile": True}).generate(requests)
    assert [c.text for c in compiled] == [c.text for c in plain]
    assert all(c.completion_tokens > 0 for c in compiled)
