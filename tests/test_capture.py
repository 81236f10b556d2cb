"""Capture from a teacher: reference answers, best-of-K from an OpenAI-compatible server and from
the student itself, lineage, and the failures that must be clear errors.

The OpenAI-compatible teacher is a real Starlette server on 127.0.0.1 (serving_helpers) that
answers choice i of a request with n choices as "echo: <user message> i", so exactly one of the K
samples per item passes the grader below: rejection sampling has something to reject.
"""

from __future__ import annotations

import json

import pytest
from serving_helpers import ScriptedUpstream, free_port
from train_helpers import quick_sft, tiny_eval

from flywheel.capture import CaptureError, best_prompt, capture
from flywheel.data import load_dataset
from flywheel.harness import run_eval
from flywheel.prompt import Prompt
from flywheel.web import BackgroundServer
from flywheel.train import TrainingDataError, build_sft_set

ECHO_ONE = {"type": "string_check", "name": "echo_one", "input": "{{sample.output_text}}",
            "reference": "echo: {{item.text}} 1", "operation": "eq"}


@pytest.fixture
def upstream():
    scripted = ScriptedUpstream()
    with BackgroundServer(scripted.app) as running:
        scripted.url = running.url + "/v1"
        yield scripted


def test_reference_capture_is_graded_and_recorded(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    result = capture(spec, store, "reference:label")
    assert (result.n_items, result.n_samples, result.n_passed, result.n_errors) == (4, 4, 4, 0)
    row = store.db.execute("select teacher, n, iteration_id, prompt_id, split from teacher_captures").fetchone()
    assert row[0] == "reference:label" and row[1] == 1 and row[4] == "train"
    iteration = store.get_iteration(row[2])
    assert iteration["stage"] == "capture" and iteration["split"] == "train"
    sample = store.db.execute("select input_json, output_text from samples where iteration_id = ? order by id",
                              [row[2]]).fetchone()
    messages = json.loads(sample[0])
    assert messages[-1] == {"role": "user", "content": "question 0 about card arrival"}
    assert sample[1] == "card_arrival"
    # A template works too, and a missing field is a recorded error, not a crash.
    assert capture(spec, store, "reference:{{item.label}}").n_passed == 4
    with pytest.raises(CaptureError, match="all 4 teacher calls failed"):
        capture(spec, store, "reference:nope")


def test_best_of_k_from_an_openai_compatible_teacher_keeps_only_passing_outputs(tmp_path, tiny_model_dir, store,
                                                                                 upstream):
    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[ECHO_ONE])
    result = capture(spec, store, "openai:teacher", n=3, teacher_options={"base_url": upstream.url, "max_retries": 0})
    assert (result.n_samples, result.n_passed, result.items_with_pass) == (12, 4, 4)
    assert result.temperature == 1.0
    assert upstream.bodies[0]["n"] == 3  # K samples of one prompt go out as one call
    rows = build_sft_set(spec, store).rows
    assert len(rows) == 4
    assert all(r["messages"][-1]["content"].endswith(" 1") for r in rows)
    # The training input is the eval's own prompt, rendered for the item.
    first_item = load_dataset(spec).split("train")[0]
    assert rows[0]["messages"][:2] == Prompt(messages=spec.messages()).render_base(first_item)


def test_self_capture_samples_k_outputs_per_item_and_reruns_from_cache(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    first = capture(spec, store, spec.model, n=2, temperature=1.0)
    assert first.n_samples == 8 and first.model_calls == 8
    outputs = store.db.execute("select item_key, repeat, output_text from samples where iteration_id = ?",
                               [first.iteration_id]).fetchall()
    assert sorted({r[1] for r in outputs}) == [0, 1]
    by_item = {}
    for key, _, text in outputs:
        by_item.setdefault(key, set()).add(text)
    assert any(len(texts) == 2 for texts in by_item.values())  # sampling, not K copies of one output
    again = capture(spec, store, spec.model, n=2, temperature=1.0)
    assert again.model_calls == 0 and again.id != first.id
    # The random tiny model never passes: building SFT rows says all captures failed.
    with pytest.raises(TrainingDataError, match="all captures failed"):
        build_sft_set(spec, store)


def test_capture_refuses_what_would_leak_or_waste(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    with pytest.raises(CaptureError, match="only from the train split"):
        capture(spec, store, spec.model, split="test")
    with pytest.raises(CaptureError, match="needs temperature > 0"):
        capture(spec, store, spec.model, n=4, temperature=0)
    with pytest.raises(CaptureError, match="reference:FIELD needs a field"):
        capture(spec, store, "reference:")


def test_a_teacher_that_always_fails_is_a_clear_error(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(CaptureError, match=r"all 4 teacher calls failed \(openai:teacher\)"):
        capture(spec, store, "openai:teacher", n=1, teacher_options={"base_url": dead, "max_retries": 0,
                                                                     "timeout": 5})
    row = store.db.execute("select n_errors, n_samples from teacher_captures").fetchone()
    assert row == (4, 4)  # recorded, so the failure is visible later


def test_capture_uses_the_best_prompt_on_valid(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    assert best_prompt(store, spec)[1] == "spec"
    better = Prompt(messages=[{"role": "system", "content": "Reply with the label only."},
                              {"role": "user", "content": "{{item.text}}"}])
    result = run_eval(spec, store, split="valid", prompt=better)
    store.update_iteration(result.iteration_id, score=0.9)  # as if prompt search had found it
    chosen, origin = best_prompt(store, spec)
    assert chosen.id == better.id and origin.startswith("best on valid")
    captured = capture(spec, store, "reference:label")
    assert captured.prompt_id == Prompt(messages=spec.messages()).id  # labels need no prompt: the spec's
    sampled = capture(spec, store, spec.model, n=1, limit=1)
    assert sampled.prompt_id == better.id


@pytest.mark.slow
def test_best_of_k_capture_trains_end_to_end(tmp_path, tiny_model_dir, store, upstream):
    """Rejection-sampled captures -> SFT rows -> a registered, evaluated adapter."""
    from flywheel.train.sft import train_sft

    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[ECHO_ONE])
    capture(spec, store, "openai:teacher", n=3, teacher_options={"base_url": upstream.url, "max_retries": 0})
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=quick_sft(max_steps=3),
                       splits=("valid",), quiet=True)
    assert result.checkpoint.training_set_id.startswith("ts-sft-")
    assert [e.split for e in result.evals] == ["valid"]
