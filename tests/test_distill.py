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

from flywheel.distill import CaptureError, best_prompt, capture
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
    assert iteration.stage == "capture" and iteration.split == "train"
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


def _unlabelled(tmp_path, texts):
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps({"id": f"u{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_unlabelled_inputs_are_voted_by_self_consistency_and_leaks_dropped(tmp_path, chatty_dir, store):
    from collections import Counter

    from flywheel.distill import InputsSpec, capture_unlabelled, load_inputs

    spec = tiny_eval(tmp_path, chatty_dir)
    valid_text = load_dataset(spec).split("valid")[0].fields["text"]
    path = _unlabelled(tmp_path, ["where is my new card", "my pin is blocked", valid_text])
    inputs = load_inputs(spec, InputsSpec(path=str(path), id_field="id"), store)
    assert [i.key for i in inputs.items] == ["u:u0", "u:u1", "u:u2"] and {i.split for i in inputs.items} == {"unlabelled"}
    prompt = Prompt(messages=spec.messages())
    result = capture_unlabelled(spec, store, f"local:{chatty_dir}", inputs=inputs, prompt=prompt, n=3,
                                temperature=1.0, min_agreement=0.6)
    samples = store.samples_with_grades(result.iteration_id)
    # The input equal to a valid item is never sampled: training on it would leak what selection measures.
    assert sorted({s.item_key for s in samples}) == ["u:u0", "u:u1"] and len(samples) == 6
    assert all([g.grader for g in s.grades] == ["self_consistency"] for s in samples)
    accepted = 0
    for key in ("u:u0", "u:u1"):
        outputs = [" ".join((s.output_text or "").split()).casefold() for s in samples if s.item_key == key]
        answer, count = Counter(o for o in outputs if o).most_common(1)[0] if any(outputs) else (None, 0)
        accepted += bool(answer) and count / 3 >= 0.6
        for s in samples:
            if s.item_key == key:
                mine = " ".join((s.output_text or "").split()).casefold()
                assert bool(s.grades[0].passed) == (bool(answer) and count / 3 >= 0.6 and mine == answer)
    assert result.items_with_pass == accepted and result.n_items == 2
    row = store.db.execute("select split, n from teacher_captures where id = ?", [result.id]).fetchone()
    assert tuple(row) == ("unlabelled", 3)
    # Same call again: resumed from the store, no model call.
    again = capture_unlabelled(spec, store, f"local:{chatty_dir}", inputs=inputs, prompt=prompt, n=3,
                               temperature=1.0, min_agreement=0.6)
    assert again.model_calls == 0 and again.items_with_pass == accepted


def test_inputs_spec_needs_one_source_and_a_real_vote():
    from pydantic import ValidationError

    from flywheel.distill import InputsSpec

    with pytest.raises(ValidationError, match="exactly one of `path` or `captures`"):
        InputsSpec()
    with pytest.raises(ValidationError):
        InputsSpec(path="x.jsonl", min_agreement=0.5)  # a tie is not a majority


@pytest.mark.slow
def test_smollm2_teacher_labels_unlabelled_inputs_and_sft_rows_use_the_student_prompt(tmp_path, store):
    from flywheel.distill import InputsSpec, capture_unlabelled, load_inputs

    from train_helpers import write_eval

    from flywheel.spec import load_eval_spec

    # The prompted teacher: demonstrations in the messages make SmolLM2 echo the word consistently.
    spec = load_eval_spec(write_eval(tmp_path, "local:smollm2", input=[
        {"role": "system", "content": "Repeat the user's word, nothing else."},
        {"role": "user", "content": "cat"}, {"role": "assistant", "content": "cat"},
        {"role": "user", "content": "house"}, {"role": "assistant", "content": "house"},
        {"role": "user", "content": "{{item.text}}"}]))
    path = _unlabelled(tmp_path, ["apple", "river", "seven", "window"])
    inputs = load_inputs(spec, InputsSpec(path=str(path), id_field="id"), store)
    teacher_prompt = Prompt(messages=spec.messages())
    result = capture_unlabelled(spec, store, "local:smollm2", inputs=inputs, prompt=teacher_prompt, n=4,
                                temperature=0.7, min_agreement=0.6)
    assert result.items_with_pass >= 2, result  # SmolLM2 repeats a word consistently
    student = Prompt(messages=[{"role": "user", "content": "{{item.text}}"}])
    training_set = build_sft_set(spec, store, prompt=student)
    words = {"apple", "river", "seven", "window"}
    unlabelled_rows = [r for r in training_set.rows if r["messages"][0]["content"] in words]
    assert len(unlabelled_rows) == result.items_with_pass
    assert all(r["messages"][-1]["content"].strip(". ").casefold() == r["messages"][0]["content"]
               for r in unlabelled_rows)  # the accepted majority answer is the target
    assert training_set.source["counts"]["unlabelled_items_with_pass"] == result.items_with_pass
    assert all(r["messages"][:-1] == [{"role": "user", "content": r["messages"][0]["content"]}] for r in unlabelled_rows)


def test_capture_cli_takes_unlabelled_inputs(tmp_path, chatty_dir):
    from click.testing import CliRunner
    from train_helpers import write_eval

    from flywheel.cli import main

    spec_path = write_eval(tmp_path, f"local:{chatty_dir}")
    inputs = _unlabelled(tmp_path, ["card not here yet", "cannot use my pin"])
    args = ["capture", str(spec_path), "--teacher", f"local:{chatty_dir}", "--inputs", str(inputs), "--id-field", "id",
            "--db", str(tmp_path / "x.db")]
    out = CliRunner().invoke(main, [*args, "--n", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert (data["n_items"], data["n_samples"], data["n"]) == (2, 4, 2)
    one = CliRunner().invoke(main, [*args, "--n", "1"])
    assert one.exit_code == 1 and "at least 2" in one.output and "Traceback" not in one.output


def test_proxy_captures_become_unlabelled_inputs_filtered_by_metadata(tmp_path, tiny_model_dir, store):
    from flywheel.distill import CaptureError, InputsSpec, load_inputs

    spec = tiny_eval(tmp_path, tiny_model_dir)

    def request(text):
        return json.dumps({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": text}]})

    store.insert_captures([
        {"endpoint": "/v1/chat/completions", "model": "m", "status": 200, "request_json": request("card late"),
         "metadata_json": json.dumps({"app": "support"})},
        {"endpoint": "/v1/chat/completions", "model": "m", "status": 200, "request_json": request("other app"),
         "metadata_json": json.dumps({"app": "sales"})},
        {"endpoint": "/v1/chat/completions", "model": "m", "status": 502, "request_json": request("failed call"),
         "metadata_json": json.dumps({"app": "support"}), "error": "upstream down"}])
    inputs = load_inputs(spec, InputsSpec(captures={"field": "text", "metadata": {"app": "support"}}), store)
    # Only the successful call of the chosen app; its last user message becomes the item's field.
    assert [item.fields for item in inputs.items] == [{"text": "card late"}]
    assert inputs.items[0].key.startswith("u:cap-") and inputs.items[0].split == "unlabelled"
    with pytest.raises(CaptureError, match="no proxy captures match"):
        load_inputs(spec, InputsSpec(captures={"field": "text", "metadata": {"app": "nobody"}}), store)
