"""Grading outputs that already exist (`outputs: {field: ...}` in an eval spec): no model is called."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import spec_dict

from flywheel.cli import main
from flywheel.errors import DataError, SpecError
from flywheel.harness import paired_comparison, run_eval
from flywheel.spec import load_eval_spec

CSV = """id,text,label,answer,split
1,where is my card,card_arrival,card_arrival,test
2,my pin is blocked,pin_blocked,"pin_blocked, I think",test
3,what is the rate,exchange_rate,card_arrival,test
4,card not here,card_arrival,,test
5,pin locked,pin_blocked,pin_blocked,train
"""


def outputs_spec(tmp_path, data="data.csv", **overrides):
    spec = spec_dict("unused", dataset={"path": data, "id_field": "id"}, outputs={"field": "answer"}, **overrides)
    del spec["model"]
    spec["graders"] = [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                        "reference": "{{item.label}}", "operation": "ilike"}]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_csv_of_outputs_is_graded_and_stored_like_a_run(tmp_path, store):
    (tmp_path / "data.csv").write_text(CSV)
    spec = load_eval_spec(outputs_spec(tmp_path))
    result = run_eval(spec, store, split="test")
    assert result.model == "data:answer" and result.model_calls == 0
    assert result.n_samples == 4 and result.n_errors == 0
    assert result.pass_rate == 0.5  # items 1 and 2 contain their label; 3 is wrong; 4 is empty
    iteration = store.get_iteration(result.iteration_id)
    assert iteration["model_ref"] == "data:answer"
    rows = store.db.execute("select item_key, output_text, input_json from samples where iteration_id = ?"
                            " order by item_key", [result.iteration_id]).fetchall()
    assert [(k, o) for k, o, _ in rows] == [("1", "card_arrival"), ("2", "pin_blocked, I think"),
                                             ("3", "card_arrival"), ("4", "")]
    assert json.loads(rows[0][2])[-1] == {"role": "user", "content": "where is my card"}
    assert store.db.execute("select count(*) from completion_cache").fetchone()[0] == 0
    again = run_eval(spec, store, split="test")  # an identical rerun: a new run, same grades, no calls
    assert again.pass_rate == 0.5 and again.model_calls == 0


def test_a_row_without_the_field_is_a_recorded_error(tmp_path, store):
    rows = [{"id": "a", "text": "q1", "label": "x", "answer": "x", "split": "test"},
            {"id": "b", "text": "q2", "label": "y", "split": "test"},
            {"id": "c", "text": "q3", "label": "z", "answer": {"label": "z"}, "split": "test"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(load_eval_spec(outputs_spec(tmp_path, data="data.jsonl")), store, split="test")
    assert result.n_samples == 3 and result.n_errors == 1
    error = store.db.execute("select error from samples where item_key = 'b'").fetchone()[0]
    assert "no output field 'answer'" in error
    # a JSON value is graded as its JSON text
    assert store.db.execute("select output_text from samples where item_key = 'c'").fetchone()[0] == '{"label": "z"}'


def test_a_field_no_row_has_is_a_spec_error_before_anything_is_stored(tmp_path, store):
    (tmp_path / "data.csv").write_text(CSV)
    path = outputs_spec(tmp_path)
    spec = load_eval_spec(path, overrides=["outputs.field=reply"])
    with pytest.raises(DataError, match=r"eval.yaml: outputs.field: data.csv has no field 'reply'; fields: answer"):
        run_eval(spec, store, split="test")
    assert store.db.execute("select count(*) from samples").fetchone()[0] == 0


def test_spec_rules(tmp_path):
    (tmp_path / "data.csv").write_text(CSV)
    path = outputs_spec(tmp_path)
    with pytest.raises(SpecError, match=r"eval.yaml: model: give either a model or outputs.field"):
        load_eval_spec(path, overrides=["model=local:smollm2"])
    data = yaml.safe_load(path.read_text())
    data.pop("input")
    path.write_text(yaml.safe_dump(data))
    assert load_eval_spec(path).input == []  # outputs need no input messages
    data.pop("outputs")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"eval.yaml: input: at least one message is required"):
        load_eval_spec(path)


def test_compared_with_a_generated_run_on_the_same_items(tmp_path, store, tiny_model_dir):
    (tmp_path / "data.csv").write_text(CSV)
    data_run = run_eval(load_eval_spec(outputs_spec(tmp_path)), store, split="test")
    spec_path = outputs_spec(tmp_path)
    generated_spec = yaml.safe_load(spec_path.read_text())
    generated_spec.pop("outputs")
    generated_spec["model"] = f"local:{tiny_model_dir}"
    spec_path.write_text(yaml.safe_dump(generated_spec))
    spec = load_eval_spec(spec_path)
    generated = run_eval(spec, store, split="test")
    stats = paired_comparison(store, spec, generated.iteration_id, data_run.iteration_id)
    assert stats["n"] == 4


def test_cli_eval_runs_an_outputs_spec(tmp_path):
    (tmp_path / "data.csv").write_text(CSV)
    result = CliRunner().invoke(main, ["eval", str(outputs_spec(tmp_path)), "--db", str(tmp_path / "f.db"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["model"] == "data:answer" and summary["pass_rate"] == 0.5
