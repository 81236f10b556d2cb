"""Eval runs over stored logs (flywheel.api.logs), with the real openai SDK against the real server:
chat completions stored with `store: true` selected by a `responses` source's filters (instructions,
users, temperature), the eval's `logs` config metadata, and per project."""

from __future__ import annotations

import openai
import pytest

from api_helpers import client_for, wait_run
from flywheel.api.access import create_key
from flywheel.api.app import create_api_app
from flywheel.api.model_access import ServerModels
from flywheel.api.runners.eval_runs import build_spec
from flywheel.store import Store
from flywheel.web import BackgroundServer

ASKED = [{"type": "string_check", "name": "asked", "input": "{{item.metadata.usecase}}", "reference": "support",
          "operation": "eq"}]


def store_calls(client, model: str) -> None:
    """Five stored calls (and one unstored) that the filters below tell apart."""
    calls = [("You are a Support Agent.", "u1", 0.0, "support"),
             ("You are a support agent for cards.", "u2", 0.0, "support"),
             ("You are a support agent.", "u1", 0.7, "support"),
             ("You translate.", "u1", 0.0, "support"),
             ("You are a support agent.", "u1", 0.0, "sales")]
    for index, (system, user, temperature, usecase) in enumerate(calls):
        client.chat.completions.create(model=model, max_tokens=2, store=True, user=user, temperature=temperature,
                                       metadata={"usecase": usecase, "n": str(index)},
                                       messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": f"question {index}"}])
    client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "unstored"}])


def graded_ns(client, eval_id: str, source: dict) -> list[str]:
    run = client.evals.runs.create(eval_id, data_source={"type": "responses", "source": source})
    run = wait_run(client, eval_id, run.id)
    assert run.status == "completed", run.error
    return [i.datasource_item["metadata"]["n"] for i in client.evals.runs.output_items.list(run.id, eval_id=eval_id)]


def test_a_responses_source_selects_stored_completions_by_its_filters(tmp_path, tiny_model_dir):
    with BackgroundServer(create_api_app(str(tmp_path / "l.db"))) as server:
        client = client_for(server.url)
        store_calls(client, f"local:{tiny_model_dir}")
        plain = client.evals.create(name="all", data_source_config={"type": "logs"}, testing_criteria=ASKED)
        assert graded_ns(client, plain.id, {"type": "responses"}) == ["0", "1", "2", "3", "4"]
        assert graded_ns(client, plain.id, {"type": "responses", "instructions_search": "SUPPORT agent"}) == [
            "0", "1", "2", "4"]
        assert graded_ns(client, plain.id, {"type": "responses", "instructions_search": "support agent",
                                            "users": ["u1"], "temperature": 0.0}) == ["0", "4"]
        # the eval's logs config metadata scopes every stored source of its runs
        scoped = client.evals.create(name="support", testing_criteria=ASKED,
                                     data_source_config={"type": "logs", "metadata": {"usecase": "support"}})
        assert graded_ns(client, scoped.id, {"type": "responses", "instructions_search": "support agent",
                                             "users": ["u1"], "temperature": 0.0}) == ["0"]
        # graded as stored: the item holds the request's messages and its metadata
        run = client.evals.runs.create(scoped.id, data_source={"type": "responses", "source": {
            "type": "responses", "limit": 2}})
        run = wait_run(client, scoped.id, run.id)
        assert run.result_counts.model_dump() == {"total": 2, "passed": 2, "failed": 0, "errored": 0}
        item = next(iter(client.evals.runs.output_items.list(run.id, eval_id=scoped.id)))
        assert item.datasource_item["input"][0] == {"role": "system", "content": "You are a Support Agent."}
        for source, param in [({"type": "responses", "tools": ["web_search"]}, "data_source.source.tools"),
                              ({"type": "responses", "reasoning_effort": "high"}, "data_source.source.reasoning_effort"),
                              ({"type": "responses", "users": "u1"}, "data_source.source.users"),
                              ({"type": "responses", "created_after": "yesterday"}, "data_source.source.created_after")]:
            with pytest.raises(openai.BadRequestError) as excinfo:
                client.evals.runs.create(plain.id, data_source={"type": "responses", "source": source})
            assert excinfo.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="no stored completions match"):
            client.evals.runs.create(plain.id, data_source={"type": "responses", "source": {
                "type": "responses", "instructions_search": "pirate"}})
        with pytest.raises(openai.BadRequestError) as excinfo:  # re-sampling stored prompts is not here
            client.evals.runs.create(plain.id, data_source={
                "type": "responses", "model": "local:x", "source": {"type": "responses"},
                "input_messages": {"type": "item_reference", "item_reference": "item.input"}})
        assert excinfo.value.body["param"] == "data_source.model"


def test_stored_completions_belong_to_their_project(tmp_path, tiny_model_dir):
    db = str(tmp_path / "p.db")
    store = Store.open(db)
    key, _ = create_key(store, "b", project="team-b")
    store.close()
    offered = ServerModels(local_bases=[str(tiny_model_dir)])  # a member names only the server's bases
    with BackgroundServer(create_api_app(db, models=offered)) as server:
        default, team = client_for(server.url), client_for(server.url, key)
        for client, usecase in ((default, "mine"), (team, "theirs")):
            client.chat.completions.create(model=f"local:{tiny_model_dir}", max_tokens=2, store=True,
                                           metadata={"usecase": usecase},
                                           messages=[{"role": "user", "content": "hello"}])
        for client, expected in ((default, "mine"), (team, "theirs")):
            evaluation = client.evals.create(name="x", data_source_config={"type": "stored_completions"},
                                             testing_criteria=ASKED)
            run = client.evals.runs.create(evaluation.id, data_source={
                "type": "completions", "source": {"type": "stored_completions"}})
            run = wait_run(client, evaluation.id, run.id)
            items = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
            assert [i.datasource_item["metadata"]["usecase"] for i in items] == [expected]


def test_a_responses_run_samples_like_a_completions_run():
    source = {"type": "responses", "model": "local:smollm2", "source": {"type": "file_content", "content": []},
              "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
              "sampling_params": {"max_completion_tokens": 5, "text": {"format": {
                  "type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}}}}
    import json

    spec = build_spec({"id": "eval_x", "name": "x", "testing_criteria_json": json.dumps(ASKED)},
                      {"id": "evalrun_x", "data_source_json": json.dumps(source), "dataset_path": "/tmp/x.jsonl"})
    assert spec.model == "local:smollm2" and spec.sampling.max_tokens == 5
    assert spec.response_format == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}
