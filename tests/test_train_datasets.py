"""Training sets from the store: SFT rows, DPO pairs, RFT prompts; platform JSONL, HF datasets,
content hashes, recorded lineage; the loss mask; and the bad inputs that must be clear errors."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_eval

from flywheel.distill import capture
from flywheel.harness import run_eval
from flywheel.reviews import add_review
from flywheel.store import SampleRecord
from flywheel.train import (
    TrainingDataError,
    TrainingSet,
    build_dpo_set,
    build_rft_set,
    build_sft_set,
    load_training_file,
    load_training_set,
    record_training_set,
    to_hf_dataset,
)
from flywheel.train.formats import tokenize_sft


def _fake_capture(store, spec, outputs: dict[str, list[str]], ungraded: frozenset[str] = frozenset()):
    """A capture whose teacher said `outputs[item_key]` (graded by the spec's real graders, except the
    items in `ungraded`, stored without grades)."""
    from flywheel.distill import _record
    from flywheel.data import load_dataset
    from flywheel.grading import GraderSet
    from flywheel.harness import register_eval
    from flywheel.prompt import Prompt

    import graders

    dataset = load_dataset(spec)
    items = {i.key: i for i in dataset.items}
    eval_id = register_eval(store, spec, dataset)
    prompt = Prompt(messages=spec.messages())
    store.save_prompt(prompt, origin="spec")
    run_id = store.create_run(kind="capture", config_key="fake", eval_id=eval_id, dataset_id=dataset.content_hash,
                              model_ref="fake", split="train")
    iteration_id = store.iteration_for(run_id, 0, stage="capture", model_ref="fake", prompt_id=prompt.id,
                                       split="train")
    grader_set = GraderSet(spec.graders)
    records = []
    for key, texts in outputs.items():
        for repeat, text in enumerate(texts):
            grades = [] if key in ungraded else grader_set.grade([graders.make_sample(text)], [items[key].fields])[0]
            records.append(SampleRecord(iteration_id=iteration_id, item_key=key, repeat=repeat,
                                        input_json=json.dumps(prompt.render(items[key])), output_text=text,
                                        grades=grades))
    store.write_samples(records)
    return _record(store, spec, "fake", "fake", run_id, iteration_id, prompt.id, max(map(len, outputs.values())),
                   1.0, 0, 0.0)


@pytest.fixture
def spec(tmp_path, tiny_model_dir):
    return tiny_eval(tmp_path, tiny_model_dir)


def test_sft_rows_are_passing_outputs_with_the_eval_prompt(spec, store):
    _fake_capture(store, spec, {"train-0": ["no idea", "card_arrival", "It is card_arrival, surely"],
                                "train-1": ["nope"], "train-2": ["exchange_rate"]})
    sft = build_sft_set(spec, store)
    assert [r["messages"][-1] for r in sft.rows] == [
        {"role": "assistant", "content": "card_arrival"}, {"role": "assistant", "content": "exchange_rate"}]
    assert sft.rows[0]["messages"][0]["role"] == "system"
    assert sft.source["counts"]["passing"] == 3 and sft.source["counts"]["items_with_pass"] == 2
    assert len(build_sft_set(spec, store, max_per_item=2)) == 3


def test_an_ungraded_output_is_not_passing_training_data(spec, store):
    _fake_capture(store, spec, {"train-0": ["card_arrival"], "train-2": ["exchange_rate"]}, ungraded=frozenset({"train-2"}))
    sft = build_sft_set(spec, store)
    assert [r["messages"][-1]["content"] for r in sft.rows] == ["card_arrival"]
    assert sft.source["counts"]["passing"] == 1


def test_dpo_pairs_best_vs_worst_with_a_minimum_margin(tmp_path, tiny_model_dir, store):
    fuzzy = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
             "reference": "{{item.label}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.9}
    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[fuzzy], objective={"metric": "mean_score"})
    _fake_capture(store, spec, {"train-0": ["card_arrival", "card arrival", "xyz"],   # gap ~1
                                "train-1": ["pin_blocked", "pin_blockd"],              # gap ~0.05
                                "train-2": ["exchange_rate"]})                         # one output: no pair
    pairs = build_dpo_set(spec, store, min_margin=0.5)
    assert len(pairs) == 1
    row = pairs.rows[0]
    assert row["preferred_output"] == [{"role": "assistant", "content": "card_arrival"}]
    assert row["non_preferred_output"] == [{"role": "assistant", "content": "xyz"}]
    assert row["input"]["messages"][-1]["role"] == "user"
    assert len(build_dpo_set(spec, store, min_margin=0.01)) == 2
    with pytest.raises(TrainingDataError, match="min_margin=1.5"):
        build_dpo_set(spec, store, min_margin=1.5)


def test_reviewer_corrections_of_train_items_only(spec, store):
    _fake_capture(store, spec, {"train-0": ["card_arrival"]})
    train = capture(spec, store, "reference:label")
    train_sample = store.db.execute("select id from samples where iteration_id = ? and item_key = 'train-1'",
                                    [train.iteration_id]).fetchone()[0]
    add_review(store, train_sample, correction="pin_blocked, the card PIN is blocked")
    test_run = run_eval(spec, store, split="test")
    test_sample = store.db.execute("select id from samples where iteration_id = ? limit 1",
                                   [test_run.iteration_id]).fetchone()[0]
    add_review(store, test_sample, correction="a correction of a TEST item")
    sft = build_sft_set(spec, store)
    targets = [r["messages"][-1]["content"] for r in sft.rows]
    assert "pin_blocked, the card PIN is blocked" in targets
    assert not any("TEST" in t for t in targets)  # test items are reported, never trained on
    assert sft.source["counts"]["rows_from_reviews"] == 1
    dpo = build_dpo_set(spec, store)  # the correction is preferred over the reviewed output
    assert [r["preferred_output"][0]["content"] for r in dpo.rows] == ["pin_blocked, the card PIN is blocked"]


def _ids(store, capture_result) -> dict[str, int]:
    return {s.item_key: s.id for s in store.samples_with_grades(capture_result.iteration_id)}


def test_reviewer_preferences_become_dpo_pairs_in_preference_format(spec, store):
    a = _fake_capture(store, spec, {"train-0": ["card_arrival"], "train-1": ["wrong one"], "train-2": ["x"]})
    b = _fake_capture(store, spec, {"train-0": ["bad answer"], "train-1": ["pin_blocked"], "train-2": ["x"]})
    ia, ib = _ids(store, a), _ids(store, b)
    add_review(store, ib["train-0"], other_sample_id=ia["train-0"], preference="other")   # A preferred
    add_review(store, ib["train-1"], other_sample_id=ia["train-1"], preference="sample")  # B preferred
    add_review(store, ib["train-2"], other_sample_id=ia["train-2"], preference="tie")     # no pair

    def pairs():  # one capture only: a single output per item gives no best-vs-worst pair
        dpo = build_dpo_set(spec, store, captures=[a.id])
        for row in dpo.rows:
            assert set(row) == {"input", "preferred_output", "non_preferred_output"}
            assert row["preferred_output"][0]["role"] == row["non_preferred_output"][0]["role"] == "assistant"
        return dpo, [(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]) for r in dpo.rows]

    dpo, got = pairs()
    assert got == [("card_arrival", "bad answer"), ("pin_blocked", "wrong one")]
    assert dpo.source["counts"]["pairs_from_reviews"] == 2
    rft = build_rft_set(spec).rows  # train items in order: the eval's own prompt, rendered for the item
    assert [r["input"]["messages"] for r in dpo.rows] == [rft[0]["messages"], rft[1]["messages"]]
    # Changing one's mind replaces the pair, it does not add one.
    add_review(store, ia["train-1"], other_sample_id=ib["train-1"], preference="sample")
    assert pairs()[1] == [("card_arrival", "bad answer"), ("wrong one", "pin_blocked")]
    with pytest.raises(TrainingDataError):
        build_dpo_set(spec, store, captures=[a.id], include_reviews=False)


def test_a_pass_verdict_adds_the_reviewed_output_to_sft(spec, store):
    a = _fake_capture(store, spec, {"train-0": ["card_arrival"], "train-1": ["pin blocked, I think"]})
    add_review(store, _ids(store, a)["train-1"], verdict="pass")
    sft = build_sft_set(spec, store)
    assert [r["messages"][-1]["content"] for r in sft.rows] == ["card_arrival", "pin blocked, I think"]
    assert sft.source["counts"]["rows_from_reviews"] == 1
    assert [r["messages"][-1]["content"] for r in build_sft_set(spec, store, include_reviews=False).rows] == [
        "card_arrival"]


def test_rft_prompts_carry_the_item_fields(spec, tmp_path, tiny_model_dir):
    rft = build_rft_set(spec)
    assert len(rft) == 4
    row = rft.rows[0]
    assert row["label"] == "card_arrival" and row["messages"][-1]["role"] == "user"
    hf = to_hf_dataset(rft)
    assert set(hf.column_names) >= {"prompt", "label", "text"} and "messages" not in hf.column_names
    clash = tiny_eval(tmp_path / "clash", tiny_model_dir, dataset={"path": "data.jsonl", "id_field": "id",
                                                                   "columns": {"id": "id", "text": "text",
                                                                               "messages": "label", "split": "split"}},
                      graders=[{"type": "string_check", "name": "m", "input": "{{sample.output_text}}",
                                "reference": "{{item.messages}}", "operation": "eq"}])
    with pytest.raises(TrainingDataError, match="reinforcement format reserves"):
        build_rft_set(clash)


def test_sets_are_hashed_recorded_exported_and_verified(spec, store, tmp_path):
    capture(spec, store, "reference:label")
    first = record_training_set(store, build_sft_set(spec, store))
    again = record_training_set(store, build_sft_set(spec, store))
    assert first.id == again.id and first.id.startswith("ts-sft-")
    row = store.db.execute("select kind, n_rows, content_hash, path, source_json from training_sets").fetchall()
    assert len(row) == 1 and row[0][:2] == ("sft", 4)
    assert json.loads(row[0][4])["teachers"] == ["reference:label"]
    lines = [json.loads(line) for line in open(row[0][3], encoding="utf-8")]
    assert lines == first.rows and set(lines[0]) == {"messages"}
    assert load_training_set(store, first.id).content_hash == first.content_hash
    with open(row[0][3], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": [{"role": "assistant", "content": "sneaked in"}]}) + "\n")
    with pytest.raises(TrainingDataError, match="content changed since it was recorded"):
        load_training_set(store, first.id)
    hf = to_hf_dataset(first)
    assert hf.column_names == ["messages"] and len(hf) == 4


def test_bad_training_files_name_the_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TrainingDataError, match="empty training set"):
        load_training_file("sft", empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(TrainingDataError, match=r"bad.jsonl:1: an SFT row needs an assistant message"):
        load_training_file("sft", bad)
    bad.write_text('{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": []}\n')
    with pytest.raises(TrainingDataError, match="bad.jsonl:1: preferred_output must be a list"):
        load_training_file("dpo", bad)
    bad.write_text("{not json\n")
    with pytest.raises(TrainingDataError, match="bad.jsonl:1: invalid JSON"):
        load_training_file("rft", bad)
    rows = [{"messages": [{"role": "user", "content": f"a{sep}b"}, {"role": "assistant", "content": "ok"}]}
            for sep in ("\u2028", "\u2029", "\u0085")]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_training_file("sft", good).rows == rows  # one row per "\n", whatever the strings hold


def test_nothing_captured_or_nothing_passing_says_what_to_do(spec, store):
    with pytest.raises(TrainingDataError, match="no captures for eval 'tiny'.*flywheel capture"):
        build_sft_set(spec, store)
    _fake_capture(store, spec, {"train-0": ["wrong", "also wrong"], "train-1": ["nope"]})
    with pytest.raises(TrainingDataError, match="none of the 3 captured samples .* all captures failed"):
        build_sft_set(spec, store)
    with pytest.raises(TrainingDataError, match="no DPO pairs"):
        build_dpo_set(spec, store)


def test_loss_mask_covers_assistant_turns_only(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"messages": [{"role": "system", "content": "Label it."}, {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "first", "weight": 0},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "card_arrival"}]}]
    tokenised, stats = tokenize_sft(TrainingSet("sft", rows), tokenizer)
    ids, labels = tokenised[0]["input_ids"], tokenised[0]["labels"]
    learned = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert learned == "card_arrival<|im_end|>\n"  # the answer and the end of the turn; not "first"
    assert stats["trained_tokens"] < stats["tokens"]
    # Training input must match what the model sees at inference: the generation prompt is a prefix.
    prompt = tokenizer.apply_chat_template(rows[0]["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids).startswith(prompt)
    everything, _ = tokenize_sft(TrainingSet("sft", rows), tokenizer, loss="all")
    assert everything[0]["labels"] == ids
    rows[0]["messages"][-1]["weight"] = 0
    with pytest.raises(TrainingDataError, match="no trainable tokens"):
        tokenize_sft(TrainingSet("sft", rows), tokenizer)
