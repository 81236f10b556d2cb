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
    assert iteration.model_ref == "data:answer"
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


# -- the proxy's captures as the source ------------------------------------------------------------
def capture(created_at, question, answer, metadata, status=200, error=None):
    """A captures row as flywheel proxy writes it (request and response bodies as JSON text)."""
    request = {"model": "gpt-4o-mini", "metadata": metadata,
               "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": question}]}
    response = None if answer is None else {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}
    return {"created_at": created_at, "endpoint": "/v1/chat/completions", "upstream": "http://up/v1",
            "model": "gpt-4o-mini", "stream": 0, "status": status, "latency_s": 0.2, "prompt_tokens": 20,
            "completion_tokens": 2, "total_tokens": 22, "metadata_json": json.dumps(metadata),
            "request_json": json.dumps(request), "response_json": json.dumps(response) if response else None,
            "error": error}


def captures_spec(tmp_path, **source):
    spec = {
        "name": "traffic", "dataset": {"captures": {"db": "traffic.db", **source}},
        "input": [{"role": "user", "content": "{{item.input}}"}], "outputs": {"field": "output"},
        "graders": [{"type": "string_check", "name": "is_card", "input": "{{sample.output_text}}",
                     "reference": "card", "operation": "like"}],
    }
    path = tmp_path / "traffic.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_captures_filtered_by_metadata_and_date_are_graded(tmp_path, store):
    from flywheel.store import Store

    traffic = Store.open(tmp_path / "traffic.db")
    traffic.insert_captures([
        capture("2026-11-01T09:00:00.000+00:00", "where is my card", "card_arrival", {"usecase": "triage"}),
        capture("2026-11-03T12:00:00.000+00:00", "pin locked", "pin_blocked", {"usecase": "triage"}),
        capture("2026-11-03T13:00:00.000+00:00", "card stuck", "card_swallowed", {"usecase": "triage"}),
        capture("2026-11-03T14:00:00.000+00:00", "rate?", "card_rate", {"usecase": "faq"}),
        capture("2026-11-04T08:00:00.000+00:00", "broken", None, {"usecase": "triage"}, status=502, error="down"),
    ])
    traffic.close()
    spec = load_eval_spec(captures_spec(tmp_path, metadata={"usecase": "triage"}, since="2026-11-02"))
    result = run_eval(spec, store, split="test")
    assert result.model == "data:output" and result.model_calls == 0
    rows = store.db.execute("select output_text, input_json from samples where iteration_id = ? order by id",
                            [result.iteration_id]).fetchall()
    # the faq capture, the one before the 2nd and the failed call are left out
    assert [r[0] for r in rows] == ["pin_blocked", "card_swallowed"]
    assert json.loads(rows[0][1]) == [{"role": "user", "content": "pin locked"}]
    assert result.pass_rate == 0.5
    whole = run_eval(load_eval_spec(captures_spec(tmp_path)), store, split="test")
    assert whole.n_samples == 4 and whole.run_id != result.run_id


def test_captures_source_errors(tmp_path, store):
    with pytest.raises(DataError, match=r"traffic.yaml: dataset.captures.db: no store at .*traffic.db"):
        run_eval(load_eval_spec(captures_spec(tmp_path)), store)
    from flywheel.store import Store

    Store.open(tmp_path / "traffic.db").close()
    with pytest.raises(DataError, match=r"dataset.captures: no successful chat captures .* match \{'metadata': \{'usecase': 'x'\}"):
        run_eval(load_eval_spec(captures_spec(tmp_path, metadata={"usecase": "x"})), store)
    path = captures_spec(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["dataset"]["path"] = "data.csv"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"traffic.yaml: dataset: give exactly one of `path` .* or `captures`"):
        load_eval_spec(path)


def test_traffic_recorded_by_the_real_proxy_is_graded(tmp_path, store):
    """The proxy (flywheel proxy, over real HTTP) records calls to an upstream; an eval grades them."""
    import openai
    from serving_helpers import ScriptedUpstream

    from flywheel.proxy import create_proxy_app
    from flywheel.web import BackgroundServer
    from flywheel.store import Store

    upstream = ScriptedUpstream()
    with BackgroundServer(upstream.app) as up:
        with BackgroundServer(create_proxy_app(up.url + "/v1", str(tmp_path / "traffic.db"))) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-app", max_retries=0)
            for question, usecase in (("my card is late", "triage"), ("pin blocked", "triage"), ("hello", "chat")):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": question}],
                                               metadata={"usecase": usecase})
    traffic = Store.open(tmp_path / "traffic.db")  # the proxy has stopped: its writer flushed
    try:
        assert len(traffic.query_captures()) == 3
    finally:
        traffic.close()
    result = run_eval(load_eval_spec(captures_spec(tmp_path, metadata={"usecase": "triage"})), store, split="test")
    outputs = [r[0] for r in store.db.execute("select output_text from samples where iteration_id = ? order by id",
                                               [result.iteration_id])]
    assert outputs == ["echo: my card is late", "echo: pin blocked"]  # the upstream's replies, as recorded
    assert result.pass_rate == 0.5 and result.model_calls == 0  # the grader looks for "card"


def test_a_report_puts_a_data_run_beside_a_generated_run(tmp_path, tiny_model_dir):
    (tmp_path / "data.csv").write_text(CSV)
    db = str(tmp_path / "f.db")
    runner = CliRunner()
    data_run = json.loads(runner.invoke(main, ["eval", str(outputs_spec(tmp_path)), "--db", db, "--json"]).output)
    generated = json.loads(runner.invoke(main, ["eval", str(outputs_spec(tmp_path)), "--db", db, "--json",
                                                "--model", f"local:{tiny_model_dir}"]).output)
    assert generated["model"] == f"local:{tiny_model_dir}" and generated["model_calls"] == 4
    result = runner.invoke(main, ["report", data_run["run_id"], generated["run_id"], "--db", db,
                                  "-o", str(tmp_path / "r.html"), "--json"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text()
    assert "data:answer" in html and "pin_blocked, I think" in html
