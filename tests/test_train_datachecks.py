"""Training data checks: size, tokens against max_length and the context, duplicates, the graders'
pass share; printed before training, stored with the set, and a failed check stops training."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import LABELS, make_rows, write_jsonl
from train_helpers import tiny_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.store import Store
from flywheel.train import SFTSpec, TrainingDataError, TrainingSet, build_sft_set
from flywheel.train.datachecks import check_training_set, run_data_checks, token_counts, tokenizer_and_context


def sft_row(text: str, answer: str, system: str = "Answer with one label: " + ", ".join(LABELS)) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]}


def test_fewer_than_min_examples_is_an_error_and_fewer_than_50_a_warning():
    rows = [sft_row(f"q{i}", "card_arrival") for i in range(9)]
    check = check_training_set(TrainingSet("sft", rows), SFTSpec(min_examples=10))
    assert check.errors == ["9 examples; at least 10 are needed (min_examples; the platform's minimum is 10): "
                            "capture more, or lower min_examples to train anyway"]
    with pytest.raises(TrainingDataError, match="^ts-x: 9 examples; at least 10"):
        check.raise_for_errors("ts-x")
    ok = check_training_set(TrainingSet("sft", rows + [sft_row("q9", "pin_blocked")]), SFTSpec(min_examples=10))
    assert ok.errors == [] and ok.warnings == ["only 10 examples: 50 or more usually train better"]
    ok.raise_for_errors()
    many = check_training_set(TrainingSet("sft", [sft_row(f"q{i}", "x") for i in range(50)]), SFTSpec())
    assert many.warnings == [] and many.errors == []


def test_duplicates_are_counted_with_their_lines():
    rows = [sft_row("a", "card_arrival"), sft_row("b", "pin_blocked"), sft_row("a", "card_arrival"),
            sft_row("a", "card_arrival"), sft_row("a", "exchange_rate")]
    check = check_training_set(TrainingSet("sft", rows), SFTSpec(min_examples=1))
    assert check.duplicates == 2 and check.duplicate_lines == [3, 4]
    assert "2 duplicate examples (first at line 3)" in check.warnings[-1]


def test_token_counts_against_max_length_and_the_models_context(tiny_model_dir):
    tokenizer, context = tokenizer_and_context(f"local:{tiny_model_dir}")
    assert context == 4096  # the tiny model's max_position_embeddings
    rows = [sft_row("short", "card_arrival"), sft_row("long " * 80, "pin_blocked")]
    counts = token_counts(TrainingSet("sft", rows), tokenizer)
    text = tokenizer.apply_chat_template(rows[1]["messages"], tokenize=False)
    assert counts[1] == len(tokenizer(text, add_special_tokens=False).input_ids) > 80 > counts[0]
    check = check_training_set(TrainingSet("sft", rows), SFTSpec(min_examples=1, max_length=counts[0] + 1),
                               tokenizer=tokenizer, context=64)
    assert (check.tokens_min, check.tokens_max, check.truncated, check.over_context) == (counts[0], counts[1], 1, 1)
    assert check.tokens_total == sum(counts)
    assert any("1 of 2 examples are longer than max_length" in w for w in check.warnings)
    lines = check.lines()
    assert lines[1].startswith(f"  tokens per example: min {counts[0]}") and "longer than the model's context 64" in lines[1]
    # DPO: the longer of the two answers counts
    pair = {"input": {"messages": rows[0]["messages"][:2]}, "preferred_output": [{"role": "assistant", "content": "x"}],
            "non_preferred_output": [{"role": "assistant", "content": "word " * 30}]}
    [dpo] = token_counts(TrainingSet("dpo", [pair]), tokenizer)
    assert dpo > counts[0] + 20


def test_an_imported_file_is_graded_with_the_evals_graders(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=4)
    train = [r for r in make_rows(4) if r["split"] == "train"]
    rows = [sft_row(r["text"], r["label"] if i % 2 == 0 else "no idea") for i, r in enumerate(train)]
    rows.append(sft_row("a question that is no train item", "card_arrival"))
    check = check_training_set(TrainingSet("sft", rows), SFTSpec(min_examples=1), spec=spec)
    assert (check.graded, check.passed, check.pass_share) == (4, 2, 0.5)
    assert check.graders == ["label"] and check.pass_note == "4 of 5 examples matched to train items"
    assert "graders pass 2/4 answers (50%)" in "\n".join(check.lines())


def test_judge_graders_are_skipped_as_not_cheap(tmp_path, tiny_model_dir):
    judge = {"type": "score_model", "name": "judge", "model": f"local:{tiny_model_dir}",
             "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}], "range": [0, 1]}
    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[judge])
    check = check_training_set(TrainingSet("sft", [sft_row("q", "a")]), SFTSpec(min_examples=1), spec=spec)
    assert check.pass_share is None and "needs a judge model" in check.pass_note


def test_a_set_from_the_store_is_checked_and_the_checks_stored_with_it(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=6)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    training_set = build_sft_set(spec, store)
    lines: list[str] = []
    check = run_data_checks(training_set, SFTSpec(min_examples=1, max_length=64), spec=spec, store=store,
                            base=spec.model, log=lines.append)
    assert check.pass_share == 1.0 and check.graded == 6  # labelled answers pass the label grader
    assert check.store_pass == "from the store: 6 of 6 captured samples passed the set's filter"
    assert lines[0] == "data checks (sft): 6 examples, 0 duplicates" and lines[-1].startswith("  warning: only 6")
    stored = json.loads(store.get_training_set(training_set.id)["checks_json"])
    assert stored["examples"] == 6 and stored["tokens_max"] == check.tokens_max and stored["context"] == 4096
    store.close()


def test_flywheel_train_prints_the_checks_and_stops_below_min_examples(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir)  # 4 train items
    db = tmp_path / "flywheel.db"
    assert CliRunner().invoke(main, ["capture", spec.source, "--teacher", "reference:label",
                                     "--db", str(db)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", "sft", spec.source, "--base", spec.model, "-s", "min_examples=10",
                                       "--db", str(db)])
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == "data checks (sft): 4 examples, 0 duplicates"
    assert result.output.splitlines()[-1].startswith("error: ts-sft-")
    assert result.output.splitlines()[-1].endswith(": 4 examples; at least 10 are needed (min_examples; the "
                                                   "platform's minimum is 10): capture more, or lower min_examples "
                                                   "to train anyway")
    store = Store.open(db)
    assert store.db["training_jobs"].count == 0  # nothing trained
    [row] = list(store.db["training_sets"].rows)  # the set and its checks are kept
    assert json.loads(row["checks_json"])["errors"]
    store.close()


def test_an_imported_file_with_duplicates_through_the_cli(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    rows = [sft_row(r["text"], r["label"]) for r in make_rows(4) if r["split"] == "train"] * 3
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    result = CliRunner().invoke(main, ["train", "sft", spec.source, "--base", spec.model, "--data", str(data),
                                       "-s", "min_examples=20", "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "data checks (sft): 12 examples, 8 duplicates"
    assert "graders pass 12/12 answers (100%): 12 of 12 examples matched to train items" in result.output
    assert "warning: 8 duplicate examples (first at line 5): they weigh twice" in result.output
