"""`flywheel serve --api`: the real openai SDK against the real API server on 127.0.0.1.

Files, evals, runs on a tiny real Llama (`local:<dir>`), output items and result counts, cancel,
keys. The queue's restart behaviour is tests/test_api_jobs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from api_helpers import CRITERIA, client_for, completions_source, create_eval, items, jsonl, wait_run
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.api.app import create_api_app
from flywheel.store import Store
from flywheel.web import BackgroundServer


@pytest.fixture
def server(tmp_path):
    with BackgroundServer(create_api_app(str(tmp_path / "flywheel.db"))) as running:
        yield running


def test_files_upload_list_retrieve_content_delete(server):
    client = client_for(server.url)
    data = jsonl(items(5))
    uploaded = client.files.create(file=("items.jsonl", data), purpose="evals")
    assert (uploaded.object, uploaded.filename, uploaded.purpose, uploaded.bytes) == ("file", "items.jsonl", "evals",
                                                                                       len(data))
    assert uploaded.id.startswith("file-")
    assert client.files.retrieve(uploaded.id).bytes == len(data)
    assert client.files.content(uploaded.id).read() == data
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == []
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.files.retrieve(uploaded.id)
    assert excinfo.value.body["code"] == "not_found"


def test_upload_rejects_the_line_that_is_not_a_chat_example(server):
    client = client_for(server.url)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"prompt": "legacy"}]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    error = excinfo.value.body
    assert "train.jsonl:2" in error["message"] and "assistant" in error["message"]
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match=r"items.jsonl:3: invalid JSON"):
        client.files.create(file=("items.jsonl", jsonl(items(2)) + b"{oops\n"), purpose="evals")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("items.jsonl", jsonl(items(2))), purpose="assistants")
    assert list(client.files.list()) == []  # nothing stored from a refused upload


def test_upload_keeps_rows_with_unicode_line_separators(server):
    client = client_for(server.url)
    rows = [{"messages": [{"role": "user", "content": f"a{sep}b"}, {"role": "assistant", "content": "ok"}]}
            for sep in ("\u2028", "\u2029", "\u0085")]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    uploaded = client.files.create(file=("train.jsonl", body), purpose="fine-tune")
    assert client.files.content(uploaded.id).read() == body


def test_eval_crud_and_bad_criteria(server):
    client = client_for(server.url)
    created = create_eval(client)
    assert created.object == "eval" and created.id.startswith("eval_")
    assert [c.id.split("-")[0] for c in created.testing_criteria] == ["not_zzz", "is_card"]
    assert created.data_source_config.type == "custom"
    assert set(created.data_source_config.schema_["properties"]) == {"item", "sample"}
    assert client.evals.retrieve(created.id).name == "tiny-api"
    updated = client.evals.update(created.id, name="renamed", metadata={"team": "a"})
    assert (updated.name, updated.metadata) == ("renamed", {"team": "a"})
    assert [e.id for e in client.evals.list()] == [created.id]
    with pytest.raises(openai.BadRequestError) as excinfo:
        create_eval(client, [{"type": "string_chek", "name": "x"}])
    assert excinfo.value.body["param"] == "testing_criteria[0]"
    assert client.evals.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(created.id)


def test_run_on_a_tiny_model_reports_items_and_counts(server, tiny_model_dir):
    client = client_for(server.url)
    evaluation = create_eval(client)
    uploaded = client.files.create(file=("items.jsonl", jsonl(items(9))), purpose="evals")
    run = client.evals.runs.create(evaluation.id, name="first",
                                   data_source=completions_source(tiny_model_dir, {"type": "file_id", "id": uploaded.id}))
    assert run.status == "queued" and run.id.startswith("evalrun_")
    run = wait_run(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    assert run.result_counts.model_dump() == {"total": 9, "passed": 3, "failed": 6, "errored": 0}
    ids = {c.name: c.id for c in evaluation.testing_criteria}
    per = {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results}
    assert per == {ids["not_zzz"]: (9, 0), ids["is_card"]: (3, 6)}
    assert run.per_model_usage[0].invocation_count == 9

    page = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=4)
    assert len(page.data) == 4 and page.has_more
    everything = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=4))
    assert len(everything) == 9 and len({i.id for i in everything}) == 9
    first = everything[0]
    assert first.datasource_item_id == 0 and first.datasource_item == items(1)[0]["item"]
    assert first.status == "pass" and {r.name for r in first.results} == set(ids.values())
    assert first.sample.input[1].content == "question 0 about card arrival"
    assert first.sample.model == f"local:{tiny_model_dir}"
    passing = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, status="pass"))
    assert sorted(i.datasource_item_id for i in passing) == [0, 3, 6]
    again = client.evals.runs.output_items.retrieve(first.id, eval_id=evaluation.id, run_id=run.id)
    assert again.model_dump() == first.model_dump()
    # the same store that `flywheel report` reads: the harness run and its samples
    store = Store.open(server_db(server))
    try:
        harness_runs = store.list_runs()
        assert len(harness_runs) == 1 and harness_runs[0].command == f"api:{run.id}"
        assert harness_runs[0].status == "completed"
    finally:
        store.close()


def test_two_identical_runs_link_to_their_own_harness_runs(server, tiny_model_dir):
    client = client_for(server.url)
    evaluation = create_eval(client)
    source = completions_source(tiny_model_dir, {"type": "file_content", "content": items(3)})
    runs = [client.evals.runs.create(evaluation.id, name="same", data_source=source) for _ in range(2)]
    runs = [wait_run(client, evaluation.id, run.id) for run in runs]
    assert [run.status for run in runs] == ["completed", "completed"]
    store = Store.open(server_db(server))
    try:
        linked = [store.api_get("api_eval_runs", run.id) for run in runs]
        assert linked[0]["run_id"] != linked[1]["run_id"]
        for run, row in zip(runs, linked):
            # The API chose the harness run's id before running it: the link never depends on a command.
            assert store.get_run(row["run_id"]).command == f"api:{run.id}"
            assert [it.id for it in store.iterations(row["run_id"])] == [row["iteration_id"]]
            assert run.result_counts.total == 3
    finally:
        store.close()


def server_db(server) -> str:
    return server.server.config.app.state.api.db_path


def test_run_with_inline_content_and_bad_run_requests(server, tiny_model_dir):
    client = client_for(server.url)
    evaluation = create_eval(client)
    run = client.evals.runs.create(evaluation.id, data_source=completions_source(
        tiny_model_dir, {"type": "file_content", "content": items(3)}))
    assert wait_run(client, evaluation.id, run.id).result_counts.total == 3
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_id", "id": "file-missing"}))
    assert excinfo.value.body["param"] == "data_source.source.id"
    bad_template = completions_source(tiny_model_dir, {"type": "file_content", "content": items(1)})
    bad_template["input_messages"]["template"][0]["role"] = "robot"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.evals.runs.create(evaluation.id, data_source=bad_template)
    assert excinfo.value.body["param"] == "data_source.input_messages.template[0]"
    assert [r.id for r in client.evals.runs.list(evaluation.id)] == [run.id]


def test_cancel_a_queued_run(tmp_path, tiny_model_dir):
    # workers=0: nothing picks the run up, so it is still queued when cancelled
    with BackgroundServer(create_api_app(str(tmp_path / "q.db"), workers=0)) as running:
        client = client_for(running.url)
        evaluation = create_eval(client)
        run = client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_content", "content": items(3)}))
        assert client.evals.runs.cancel(run.id, eval_id=evaluation.id).status == "canceled"
        assert client.evals.runs.retrieve(run.id, eval_id=evaluation.id).status == "canceled"
        store = Store.open(tmp_path / "q.db")
        try:
            assert store.count_jobs() == {"cancelled": 1}
        finally:
            store.close()


def test_cancel_a_running_run_stops_it_between_batches(server, tiny_model_dir):
    client = client_for(server.url)
    evaluation = create_eval(client)
    run = client.evals.runs.create(evaluation.id, data_source=completions_source(
        tiny_model_dir, {"type": "file_content", "content": items(600)}, max_tokens=16))
    wait_run(client, evaluation.id, run.id, states=("in_progress",))
    client.evals.runs.cancel(run.id, eval_id=evaluation.id)
    done = wait_run(client, evaluation.id, run.id)
    assert done.status == "canceled"
    stored = len(list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=100)))
    assert stored < 600


def test_keys_required_when_asked(tmp_path):
    db = str(tmp_path / "k.db")
    created = CliRunner().invoke(main, ["keys", "create", "--name", "tests", "--db", db])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("fw-")
    with BackgroundServer(create_api_app(db, require_key=True)) as running:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            client_for(running.url, key="fw-wrong").evals.list()
        assert excinfo.value.status_code == 401 and excinfo.value.body["code"] == "invalid_api_key"
        assert list(client_for(running.url, key=key).evals.list()) == []
    row = Store.open(db)
    try:
        stored = json.dumps(list(row.db["api_keys"].rows))
        assert key not in stored  # only the hash
    finally:
        row.close()


def test_grader_endpoints(server):
    client = client_for(server.url)
    grader = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
              "reference": "{{item.label}}", "operation": "eq"}
    assert client.fine_tuning.alpha.graders.validate(grader=grader).grader.name == "exact"
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="pin_blocked",
                                                  item={"label": "pin_blocked"})
    assert result.reward == 1.0 and result.metadata.errors.other_error is False
    assert client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={"label": "y"}).reward == 0.0
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.alpha.graders.validate(grader={"type": "string_check", "name": "x", "operation": "eqq"})
    assert excinfo.value.body["param"] == "grader"


def test_jsonl_run_grades_the_given_samples(server):
    client = client_for(server.url)
    evaluation = create_eval(client, [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                                       "reference": "{{item.label}}", "operation": "eq"}])
    rows = [{**row, "sample": {"output_text": row["item"]["label"] if i != 1 else "wrong"}}
            for i, row in enumerate(items(3))]
    uploaded = client.files.create(file=("graded.jsonl", jsonl(rows)), purpose="evals")
    run = client.evals.runs.create(evaluation.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": uploaded.id}})
    run = wait_run(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    assert run.result_counts.model_dump() == {"total": 3, "passed": 2, "failed": 1, "errored": 0}
    listed = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
    assert [i.status for i in listed] == ["pass", "fail", "pass"]
    assert listed[1].datasource_item == items(3)[1]["item"]  # the row index stays internal
    assert listed[1].sample.output[0].content == "wrong"
    with pytest.raises(openai.BadRequestError, match="row 0"):
        client.evals.runs.create(evaluation.id, data_source={
            "type": "jsonl", "source": {"type": "file_content", "content": items(1)}})


def test_objects_have_the_platforms_fields(tmp_path, tiny_model_dir):
    """Every field the platform documents for an object is in ours (extra fields are allowed)."""
    import httpx

    shapes = json.loads((Path(__file__).resolve().parents[1] / "fixtures/api/platform_objects.json").read_text())
    with BackgroundServer(create_api_app(str(tmp_path / "shapes.db"))) as running, \
            httpx.Client(base_url=running.url + "/v1") as http:
        def call(method, path, **kwargs):
            response = http.request(method, path, **kwargs)
            assert response.status_code == 200, response.text
            return response.json()

        def missing(kind, obj):
            return set(shapes[kind]) - set(obj)

        file = call("POST", "/files", files={"file": ("items.jsonl", jsonl(items(2)))}, data={"purpose": "evals"})
        evaluation = call("POST", "/evals", json={"name": "x", "data_source_config": {"type": "custom", "item_schema": {}},
                                                 "testing_criteria": CRITERIA})
        run = call("POST", f"/evals/{evaluation['id']}/runs", json={"data_source": {
            "type": "jsonl", "source": {"type": "file_content",
                                        "content": [{**r, "sample": {"output_text": "a"}} for r in items(2)]}}})
        client = client_for(running.url)
        wait_run(client, evaluation["id"], run["id"])
        run = call("GET", f"/evals/{evaluation['id']}/runs/{run['id']}")
        listed = call("GET", f"/evals/{evaluation['id']}/runs/{run['id']}/output_items")
        item = listed["data"][0]
    # a queued fine-tuning job (no workers: nothing trains) and its events
    with BackgroundServer(create_api_app(str(tmp_path / "shapes.db"), workers=0)) as running, \
            httpx.Client(base_url=running.url + "/v1") as http:
        training = call("POST", "/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", jsonl([
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]))})
        job = call("POST", "/fine_tuning/jobs", json={"model": f"local:{tiny_model_dir}", "training_file": training["id"]})
        events = call("GET", f"/fine_tuning/jobs/{job['id']}/events")
        checks = {"file": file, "eval": evaluation, "eval.run": run, "eval.run.result_counts": run["result_counts"],
                  "eval.run.per_testing_criteria_results[]": run["per_testing_criteria_results"][0],
                  "eval.run.per_model_usage[]": run["per_model_usage"][0], "list": listed,
                  "eval.run.output_item": item, "eval.run.output_item.results[]": item["results"][0],
                  "eval.run.output_item.sample": item["sample"],
                  "eval.run.output_item.sample.usage": item["sample"]["usage"],
                  "fine_tuning.job": job, "fine_tuning.job.event": events["data"][0]}
        assert {kind: missing(kind, obj) for kind, obj in checks.items() if missing(kind, obj)} == {}
        assert (file["object"], evaluation["object"], run["object"], item["object"], job["object"],
                events["data"][0]["object"]) == ("file", "eval", "eval.run", "eval.run.output_item",
                                                 "fine_tuning.job", "fine_tuning.job.event")


def test_stored_chat_completions_are_graded_by_an_eval(server, tiny_model_dir):
    client = client_for(server.url)
    for index in range(3):
        client.chat.completions.create(model=f"local:{tiny_model_dir}", max_tokens=2, store=True,
                                       metadata={"usecase": "triage" if index < 2 else "other"},
                                       messages=[{"role": "user", "content": f"question {index}"}])
    client.chat.completions.create(model=f"local:{tiny_model_dir}", max_tokens=2,  # not stored
                                   messages=[{"role": "user", "content": "unstored"}])
    evaluation = client.evals.create(
        name="stored", data_source_config={"type": "stored_completions", "metadata": {"usecase": "triage"}},
        testing_criteria=[{"type": "string_check", "name": "asked", "input": "{{item.metadata.usecase}}",
                           "reference": "triage", "operation": "eq"}])
    run = client.evals.runs.create(evaluation.id, data_source={
        "type": "completions", "source": {"type": "stored_completions", "metadata": {"usecase": "triage"}}})
    run = wait_run(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    assert run.result_counts.model_dump() == {"total": 2, "passed": 2, "failed": 0, "errored": 0}
    listed = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
    assert [i.datasource_item["input"][0]["content"] for i in listed] == ["question 0", "question 1"]
    with pytest.raises(openai.BadRequestError, match="no stored completions"):
        client.evals.runs.create(evaluation.id, data_source={
            "type": "completions", "source": {"type": "stored_completions", "metadata": {"usecase": "none"}}})


def test_the_review_app_beside_the_api(tmp_path):
    import httpx

    from flywheel.report.review_app import create_app

    db = str(tmp_path / "both.db")
    with BackgroundServer(create_api_app(db, fallback=create_app(db), report_base="/")) as running:
        page = httpx.get(running.url + "/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        missing = httpx.get(running.url + "/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
        assert httpx.get(running.url + "/v1/health").json()["status"] == "ok"


def test_uploads_are_size_limited(tmp_path):
    with BackgroundServer(create_api_app(str(tmp_path / "s.db"), max_upload_bytes=2000)) as running:
        client = client_for(running.url)
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.files.create(file=("big.jsonl", jsonl(items(100))), purpose="evals")
        assert excinfo.value.status_code == 413 and excinfo.value.body["code"] == "request_too_large"
        assert client.files.create(file=("small.jsonl", jsonl(items(2))), purpose="evals").bytes < 2000
        assert len(list(client.files.list())) == 1
