"""Malformed input cannot hurt the API server: every parameter and body is parsed strictly
(flywheel.web: ASCII digits, bounded integers, bounded JSON depth) into the platform's 400 shape,
and an upload is checked off the event loop. Real server on 127.0.0.1; hypothesis fuzzes the rest."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_helpers import items, jsonl
from flywheel.api.app import create_api_app
from flywheel.web import BackgroundServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with BackgroundServer(create_api_app(str(tmp_path_factory.mktemp("input") / "i.db"), workers=0)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def objects(http):
    """An eval, a run on it and a wheel run (queued: no workers), for the ids the paths need."""
    evaluation = http.post("/evals", json={
        "name": "x", "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
        "testing_criteria": [{"type": "string_check", "name": "s", "input": "{{item.label}}",
                              "reference": "a", "operation": "eq"}]}).json()
    run = http.post(f"/evals/{evaluation['id']}/runs", json={"data_source": {
        "type": "jsonl", "source": {"type": "file_content",
                                    "content": [{"item": {"label": "a"}, "sample": {"output_text": "a"}}]}}}).json()
    return {"eval": evaluation["id"], "run": run["id"]}


def assert_platform_error(response: httpx.Response, status: int | None = None) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def test_the_twelve_malformed_inputs_that_were_500s(http, objects):
    run_path = f"/evals/{objects['eval']}/runs/{objects['run']}"
    for path in (f"/files?limit=²", "/files?limit=٣", "/evals?limit=1" + "0" * 30, "/fine_tuning/jobs?limit=-1",
                 f"{run_path}/output_items?after=outputitem_99999999999999999999999",
                 "/fine_tuning/jobs/ftjob-x/events?after=ftevent-99999999999999999999999",
                 "/flywheel/runs/fwrun_x/events?after=fwevent-²"):
        response = http.get(path)
        assert_platform_error(response)
        assert response.status_code in (400, 404), (path, response.text)
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (deep, b'{"name": NaN}', b'{"name": 1' + b"0" * 5000 + b"}", b'{"a":' + b"[" * 70 + b"]" * 70 + b"}"):
        response = http.post("/evals", content=body, headers={"content-type": "application/json"})
        assert_platform_error(response, 400)
    stored = http.post("/evals", json={"name": "s", "data_source_config": {"type": "stored_completions"},
                                       "testing_criteria": [{"type": "string_check", "name": "s",
                                                             "input": "{{sample.output_text}}", "reference": "a",
                                                             "operation": "eq"}]}).json()
    for source in ({"created_after": 10**20}, {"created_after": 1e20}, {"limit": 2**63}, {"limit": 10**30}):
        response = http.post(f"/evals/{stored['id']}/runs", json={"data_source": {
            "type": "completions", "source": {"type": "stored_completions", **source}}})
        assert_platform_error(response, 400)
        assert response.json()["error"]["param"].startswith("data_source.source.")
    response = http.post("/fine_tuning/jobs", json={"model": "local:smollm2", "training_file": "file-x",
                                                    "method": {"type": "supervised", "supervised": {
                                                        "hyperparameters": {"n_epochs": 10**400}}}})
    assert_platform_error(response)


def test_a_large_upload_does_not_hold_up_other_clients(server, http, monkeypatch):
    """While a large file is being checked, /v1/health answers. Ordering by events, not a timed
    assertion: the check (the real one) waits until health has answered; checked on the event
    loop, health could not answer at all (benchmarks/api_upload.py measures the delay)."""
    from flywheel.api.routes import files

    checking, release = threading.Event(), threading.Event()
    real_check = files.validate_upload

    def held_check(*args, **kwargs):
        checking.set()
        release.wait(60)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(files, "validate_upload", held_check)
    data = jsonl(items(3)) * 40_000  # ~5 MB of valid evals lines
    outcome: list[int] = []

    def upload():
        with httpx.Client(timeout=120) as client:
            outcome.append(client.post(server.url + "/v1/files", files={"file": ("big.jsonl", data)},
                                       data={"purpose": "evals"}).status_code)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert checking.wait(60)
        with httpx.Client(timeout=30) as other:
            assert other.get(server.url + "/v1/health").status_code == 200
        assert not outcome  # the upload was still being checked when health answered
    finally:
        release.set()
        thread.join(120)
    assert outcome == [200]


PATHS = ["/files", "/evals", "/fine_tuning/jobs", "/flywheel/runs", "/evals/{eval}/runs",
         "/evals/{eval}/runs/{run}/output_items", "/fine_tuning/jobs/ftjob-x/events", "/flywheel/runs/fwrun_x/events"]
PARAM_VALUES = st.one_of(st.text(max_size=30), st.integers(min_value=-(10**30), max_value=10**30).map(str),
                         st.sampled_from(["²", "٣", "1e9", "outputitem_" + "9" * 25, "ftevent-" + "9" * 25, "", "asc"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), params=st.dictionaries(st.sampled_from(["limit", "after", "order", "status",
                                                                            "purpose"]), PARAM_VALUES, max_size=3))
def test_fuzzed_list_parameters_are_never_a_500(http, objects, path, params):
    assert_platform_error(http.get(path.format(**objects), params=params))


JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
BODY_FIELDS = ["name", "data_source_config", "testing_criteria", "data_source", "metadata", "model", "training_file",
               "method", "seed", "run_spec", "eval_spec", "file_id", "grader", "model_sample", "item", "messages"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/evals", "/evals/{eval}/runs", "/fine_tuning/jobs", "/flywheel/runs",
                             "/fine_tuning/alpha/graders/validate", "/evals/{eval}"]),
       body=st.dictionaries(st.sampled_from(BODY_FIELDS), JSON, max_size=5))
def test_fuzzed_bodies_are_never_a_500(http, objects, path, body):
    response = http.post(path.format(**objects), content=json.dumps(body), headers={"content-type": "application/json"})
    assert_platform_error(response)
