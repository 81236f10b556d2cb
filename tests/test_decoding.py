"""The continuous-batching decoder against transformers' own greedy `generate`, in fp32."""

from __future__ import annotations

import pytest
import torch

from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.models.decoding import Decoder
from flywheel.models.local import RUNNING_BATCH_FACTOR

SYSTEM = {"role": "system", "content": "You sort customer messages into labels. " * 4}


def requests(n: int, max_tokens: int = 8, **sampling) -> list[ChatRequest]:
    return [ChatRequest([SYSTEM, {"role": "user", "content": "message " * (1 + (7 * i) % 11)}],
                        Sampling(max_tokens=max_tokens, **sampling)) for i in range(n)]


def hf_greedy(model, rows: list[list[int]], max_tokens: int, eos: int) -> list[list[int]]:
    """One unpadded `generate` call per row: the reference the decoder must reproduce."""
    hf_model, tokenizer = model.load()
    out = []
    with torch.inference_mode():
        for row in rows:
            # An explicit mask: without one, generate masks every prompt token equal to the pad
            # token whenever pad != eos (here, the chat template's <|im_end|>).
            ids = hf_model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                    max_new_tokens=max_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                    temperature=None, top_p=None, top_k=None)[0, len(row):].tolist()
            out.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
    return out


def token_rows(model, reqs) -> list[list[int]]:
    _, tokenizer = model.load()
    return [tokenizer(model.render_prompt(r.messages), add_special_tokens=False).input_ids for r in reqs]


def test_continuous_batching_matches_hf_generate_token_for_token(chatty_dir):
    # batch_size 1: a running batch of RUNNING_BATCH_FACTOR rows and prefill chunks of 1, so 11
    # requests must join mid-way, some only when others have left.
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 1})
    reqs = requests(11)
    completions = model.generate(reqs)
    stats = model._last_decode_stats
    assert stats.joins > 0 and stats.peak_rows == RUNNING_BATCH_FACTOR < len(reqs)
    _, tokenizer = model.load()
    expected = hf_greedy(model, token_rows(model, reqs), 8, tokenizer.eos_token_id)
    assert [c.text for c in completions] == [tokenizer.decode(e, skip_special_tokens=True).strip()
                                             for e in expected]
    assert len({c.text for c in completions}) > 3  # varied, real words
    reference = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "engine": "hf", "batch_size": 4})
    assert [c.text for c in reference.generate(reqs)] == [c.text for c in completions]


def test_rows_leave_the_batch_at_eos(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    hf_model, tokenizer = model.load()
    rows = token_rows(model, requests(9))
    plain = hf_greedy(model, rows, 10, tokenizer.eos_token_id)
    # Make a token that some rows emit mid-answer the stop token, so they finish early.
    eos = plain[0][3]
    expected = hf_greedy(model, rows, 10, eos)
    decoder = Decoder(hf_model, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, max_batch=4,
                      prefill_batch=2)
    results = decoder.run(rows, max_new_tokens=10)
    assert [r.tokens for r in results] == expected
    assert [r.finish_reason for r in results] == ["stop" if e[-1] == eos else "length" for e in expected]
    assert any(len(e) < 10 for e in expected) and any(len(e) == 10 for e in expected)


def test_prefix_cache_off_gives_the_same_tokens(chatty_dir):
    reqs = requests(6)
    cached = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 2})
    plain = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 2, "prefix_cache": False})
    assert [c.text for c in cached.generate(reqs)] == [c.text for c in plain.generate(reqs)]
    assert cached._prefix_memo is not None and plain._prefix_memo is None


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 2})
    greedy = [c.text for c in model.generate(requests(5))]
    hot = [c.text for c in model.generate(requests(5, temperature=1.5, seed=3))]
    assert hot == [c.text for c in model.generate(requests(5, temperature=1.5, seed=3))]
    assert hot != [c.text for c in model.generate(requests(5, temperature=1.5, seed=4))]
    assert hot != greedy
    # top_p keeps the smallest set of tokens whose probability reaches p: near 0, only the argmax.
    assert [c.text for c in model.generate(requests(5, temperature=1.5, top_p=1e-9))] == greedy


def test_a_small_kv_budget_runs_fewer_rows_at_once_with_the_same_tokens(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    hf_model, tokenizer = model.load()
    rows = token_rows(model, requests(9))
    wide = Decoder(hf_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = [r.tokens for r in wide.run(rows, max_new_tokens=6)]
    assert wide.stats.peak_rows == 9
    per_row = (max(len(r) for r in rows) + 7) * wide._kv_bytes_per_token()
    narrow = Decoder(hf_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     kv_budget=3 * per_row)
    assert [r.tokens for r in narrow.run(rows, max_new_tokens=6)] == expected
    assert 1 <= narrow.stats.peak_rows <= 3
    # A budget below one row still decodes, one row at a time.
    tiny = Decoder(hf_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, kv_budget=1)
    assert [r.tokens for r in tiny.run(rows, max_new_tokens=6)] == expected and tiny.stats.peak_rows == 1


def test_a_long_stream_hands_freed_heap_back_between_steps_with_the_same_tokens(chatty_dir, monkeypatch):
    import flywheel.models.decoding as decoding

    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    hf_model, tokenizer = model.load()
    rows = token_rows(model, requests(9))
    decoder = Decoder(hf_model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_batch=3)
    expected = [r.tokens for r in decoder.run(rows, max_new_tokens=6)]
    trims: list[bool] = []
    real = decoding.release_memory

    def counted(*, collect: bool = True) -> bool:
        trims.append(collect)
        return real(collect=collect)

    monkeypatch.setattr(decoding, "release_memory", counted)
    monkeypatch.setattr(decoding, "TRIM_EVERY_S", 0.0)  # every step
    assert [r.tokens for r in decoder.run(rows, max_new_tokens=6)] == expected
    assert len(trims) >= decoder.stats.steps > 0 and not any(trims)  # no gc pass inside the loop


def test_bf16_decodes_on_the_shared_prefix_path(chatty_dir):
    # The prefix keys are read in fp32 for the decode step and in bf16 by SDPA in prefill: no dtype
    # may leak from one path to the other.
    model = load_model(f"local:{chatty_dir}", {"dtype": "bf16", "batch_size": 2})
    completions = model.generate(requests(7, max_tokens=5))
    assert model.load()[0].dtype == torch.bfloat16 and model._prefix_memo is not None
    assert all(c.completion_tokens >= 1 and not c.error for c in completions)
    assert model._last_decode_stats.joins > 0


def test_one_token_and_empty_requests(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    assert model.generate([]) == []
    one = model.generate(requests(3, max_tokens=1))
    assert all(c.completion_tokens == 1 for c in one)


@pytest.mark.slow
def test_smollm2_banking77_matches_hf_generate_in_fp32(smollm2_dir):
    from flywheel.data import load_dataset
    from flywheel.harness import render_messages
    from flywheel.spec import load_eval_spec
    from pathlib import Path

    spec = load_eval_spec(Path(__file__).parents[1] / "evals" / "banking77" / "eval.yaml")
    items = load_dataset(spec).split("test")[:24]
    model = load_model("local:smollm2", {"dtype": "fp32", "batch_size": 4})
    reqs = [ChatRequest(render_messages(spec.messages(), item), Sampling(max_tokens=12)) for item in items]
    completions = model.generate(reqs)
    assert model._last_decode_stats.joins > 0
    _, tokenizer = model.load()
    expected = hf_greedy(model, token_rows(model, reqs), 12, tokenizer.eos_token_id)
    assert [c.text for c in completions] == [tokenizer.decode(e, skip_special_tokens=True).strip()
                                             for e in expected]
    assert [c.completion_tokens for c in completions] == [len(e) for e in expected]


def test_stream_yields_rows_as_they_finish_and_the_model_is_free_between_them(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 1})
    reqs = requests(9, max_tokens=6)
    expected = [c.text for c in model.generate(reqs)]
    other = requests(3, max_tokens=4)
    other_expected = [c.text for c in model.generate(other)]
    assert model.streams
    seen, nested = {}, []
    for index, completion in model.stream(reqs):
        seen[index] = completion.text
        if len(seen) in (1, 5):  # the same model, mid-stream (a model-graded grader does this)
            nested.append([c.text for c in model.generate(other)])
    assert sorted(seen) == list(range(9)) and [seen[i] for i in range(9)] == expected
    assert nested == [other_expected, other_expected]


class _Clock:
    """A clock that ticks once per reading: the loop's time is counted in readings, not seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_latency_is_each_rows_own_time_not_the_batch_average(chatty_dir, monkeypatch):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    hf_model, tokenizer = model.load()
    rows = token_rows(model, requests(9))
    plain = hf_greedy(model, rows, 10, tokenizer.eos_token_id)
    eos = plain[0][3]  # some rows stop at this token early, the others run to 10 tokens
    clock = _Clock()
    monkeypatch.setattr("flywheel.models.decoding.time.perf_counter", clock)
    decoder = Decoder(hf_model, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, max_batch=16,
                      prefill_batch=16)
    results = {}
    for index, result in decoder.stream(rows, max_new_tokens=10):
        results[index] = result
        clock.now += 1e6  # the consumer holds each row a long time: not the rows' own time
    assert decoder.stats.prefills == 1  # every row admitted together
    short = [r.latency_s for r in results.values() if len(r.tokens) < 10]
    long = [r.latency_s for r in results.values() if len(r.tokens) == 10]
    assert short and long
    assert max(short) < min(long) < 1e6
    assert all(r.latency_s > 0 for r in results.values())
    # A row's latency grows with its own steps: a row that stopped after k tokens saw k - 1 steps.
    by_length = sorted((len(r.tokens), r.latency_s) for r in results.values())
    assert [latency for _, latency in by_length] == sorted(latency for _, latency in by_length)


def test_a_streamed_completion_carries_its_rows_latency(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32", "batch_size": 1})
    completions = model.generate(requests(9, max_tokens=6))
    assert all(c.latency_s > 0 for c in completions)
