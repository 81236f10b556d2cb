"""Several tasks, one adapter: `flywheel train sft SPEC1 SPEC2 --weights 2,1`, evaluated on each eval."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from train_helpers import write_eval

from flywheel.cli import main
from flywheel.train import TrainingDataError, TrainingSet
from flywheel.train.sets import combine_training_sets

QUICK = ["-s", "max_steps=2", "-s", "precision=fp32", "-s", "batch_size=4", "-s", "learning_rate=0.01"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sft_set(name: str, system: str, n: int) -> TrainingSet:
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(n)]
    return TrainingSet("sft", rows, {"eval": name, "dataset_id": f"d-{name}", "prompt_id": f"p-{name}"})


def test_weights_repeat_and_sample_rows_keeping_each_prompt():
    a, b = sft_set("a", "Prompt A", 4), sft_set("b", "Prompt B", 6)
    both = combine_training_sets([a, b], [2, 0.5])
    systems = [row["messages"][0]["content"] for row in both.rows]
    assert systems.count("Prompt A") == 8 and systems.count("Prompt B") == 3
    assert both.source["evals"] == ["a", "b"] and both.source["weights"] == [2.0, 0.5]
    assert [p["rows_used"] for p in both.source["parts"]] == [8, 3]
    assert [p["content_hash"] for p in both.source["parts"]] == [a.content_hash, b.content_hash]
    assert combine_training_sets([a, b], [2, 0.5]).content_hash == both.content_hash  # seeded: reproducible
    assert combine_training_sets([a, b]).content_hash != both.content_hash


@pytest.mark.parametrize("parts, weights, message", [
    (["sft", "sft"], [1], "1 weights for 2 evals"),
    (["sft", "sft"], [1, -1], "weights must be positive"),
    (["sft", "dpo"], None, "different kinds"),
    (["rft", "rft"], None, "rft sets cannot be combined"),
])
def test_bad_combinations_are_refused(parts, weights, message):
    sets = [TrainingSet(kind, [{"messages": []}], {"eval": f"e{i}"}) for i, kind in enumerate(parts)]
    with pytest.raises(TrainingDataError, match=message):
        combine_training_sets(sets, weights)


def test_one_adapter_on_two_evals_evaluated_on_each(tmp_path, tiny_model_dir):
    first = write_eval(tmp_path / "one", f"local:{tiny_model_dir}", name="first")
    second = write_eval(tmp_path / "two", f"local:{tiny_model_dir}", name="second", input=[
        {"role": "system", "content": "Say the label of this banking question."},
        {"role": "user", "content": "{{item.text}}"}])
    db = tmp_path / "flywheel.db"
    for spec in (first, second):
        assert run("capture", spec, "--teacher", "reference:label", "--db", db).exit_code == 0
    trained = run("train", "sft", first, second, "--weights", "2,1", "--base", f"local:{tiny_model_dir}", *QUICK,
                  "--split", "valid", "--db", db, "--json")
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.output)
    assert result["evals"] == ["first", "second"] and result["weights"] == [2.0, 1.0]
    assert set(result["by_eval"]) == {"first", "second"}
    assert all(len(v) == 1 and v[0]["split"] == "valid" and v[0]["n"] == 4 for v in result["by_eval"].values())

    from flywheel.store import Store
    from flywheel.train import load_training_set

    store = Store.open(db)
    try:
        training_set = load_training_set(store, result["training_set_id"])
        systems = [row["messages"][0]["content"] for row in training_set.rows]
        assert len(systems) == 4 * 2 + 4  # 4 train items each; the first eval twice
        assert systems.count("Say the label of this banking question.") == 4  # each row keeps its eval's prompt
        stored = store.get_checkpoint(result["checkpoint"]["id"])
        evals = stored.evals
        assert set(evals["by_eval"]) == {"first", "second"} and evals["valid"]["iteration_id"] == \
            evals["by_eval"]["first"]["valid"]["iteration_id"]
        assert evals["by_eval"]["second"]["valid"]["iteration_id"] != evals["valid"]["iteration_id"]
    finally:
        store.close()

    text = run("train", "sft", first, second, "--base", f"local:{tiny_model_dir}", *QUICK, "--no-eval", "--db", db)
    assert text.exit_code == 0 and "from first x1, second x1" in text.output, text.output


def test_multi_eval_usage_errors(tmp_path, tiny_model_dir):
    first = write_eval(tmp_path / "one", f"local:{tiny_model_dir}", name="first")
    second = write_eval(tmp_path / "two", f"local:{tiny_model_dir}", name="second")
    base = ["--base", f"local:{tiny_model_dir}", "--db", tmp_path / "f.db"]
    assert run("train", "sft", first, second, "--weights", "2", *base).exit_code == 2
    assert run("train", "sft", first, second, "--weights", "a,b", *base).exit_code == 2
    assert run("train", "sft", first, "--weights", "2", *base).exit_code == 2
    assert run("train", "sft", first, second, "--data", "x.jsonl", *base).exit_code == 2
    same = run("train", "sft", first, first, *base)
    assert same.exit_code == 1 and same.output.startswith("error: eval names must differ")
    hosted = run("train", "sft", first, second, "--base", "openai:gpt-4o-mini", "--db", tmp_path / "f.db")
    assert hosted.exit_code == 1 and hosted.output.strip().splitlines() == [
        "error: openai:gpt-4o-mini: several evals train one local adapter; a hosted job takes one eval: "
        "train each eval on its own"]
