"""`openai:` over a fleet of servers: spreading, per-server concurrency, health and fail-over.

Real servers on 127.0.0.1: small Starlette apps that misbehave on purpose (serving_helpers), and
two `flywheel serve-model` processes serving the tiny model, one of them killed mid-run.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from conftest import make_rows, spec_dict, write_jsonl
from serving_helpers import ScriptedUpstream, free_port

from flywheel.errors import ModelError
from flywheel.harness import run_eval
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.models.fleet import Fleet, Server
from flywheel.spec import parse_eval_spec
from flywheel.store import Store
from flywheel.web import BackgroundServer

HI = [{"role": "user", "content": "hi"}]


def requests(n: int) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}], sampling=Sampling(max_tokens=4))
            for i in range(n)]


@pytest.fixture
def two_scripted():
    first, second = ScriptedUpstream(hold_s=0.05), ScriptedUpstream(hold_s=0.05)
    with BackgroundServer(first.app) as a, BackgroundServer(second.app) as b:
        first.url, second.url = a.url + "/v1", b.url + "/v1"
        yield first, second


# -- options (no network) --------------------------------------------------------------------------
def test_a_list_of_urls_is_a_fleet_with_its_own_fingerprint():
    model = load_model("openai:m", {"base_url": ["http://127.0.0.1:2/v1/", "http://127.0.0.1:1/v1"]})
    assert model.base_urls == ["http://127.0.0.1:2/v1", "http://127.0.0.1:1/v1"]
    assert model.fingerprint == "openai:[http://127.0.0.1:1/v1,http://127.0.0.1:2/v1]:m"  # order-free
    single = load_model("openai:m", {"base_url": ["http://127.0.0.1:1/v1"]})
    assert single.fingerprint == "openai:http://127.0.0.1:1/v1:m"  # a fleet of one is the server


@pytest.mark.parametrize("value, message", [
    ([], "a list must hold one or more URLs"),
    (["http://a/v1", "http://a/v1/"], "a URL is listed twice"),
    (["http://a/v1", 3], "a list must hold one or more URLs"),
    (7, "must be a URL or a list of URLs"),
])
def test_bad_fleets_are_refused_with_the_field_named(value, message):
    with pytest.raises(ModelError, match=f"openai:m: model_options.base_url.*{message}"):
        load_model("openai:m", {"base_url": value})


# -- spreading and fail-over against scripted servers ----------------------------------------------
def test_requests_spread_over_servers_within_per_server_concurrency(two_scripted):
    first, second = two_scripted
    model = load_model("openai:scripted", {"base_url": [first.url, second.url], "concurrency": 3})
    try:
        out = model.generate(requests(24))
    finally:
        model.close()
    assert all(c.error is None for c in out) and len(out) == 24
    assert len(first.bodies) + len(second.bodies) == 24
    assert len(first.bodies) >= 6 and len(second.bodies) >= 6  # both did a fair share
    assert first.max_in_flight <= 3 and second.max_in_flight <= 3
    assert max(first.max_in_flight, second.max_in_flight) > 1  # and they did work in parallel


def test_a_failing_server_is_skipped_and_its_requests_answered_elsewhere(two_scripted):
    first, second = two_scripted
    second.plan = ["500"] * 100
    model = load_model("openai:scripted", {"base_url": [first.url, second.url], "concurrency": 2})
    try:
        out = model.generate(requests(20))
        stats = model.fleet.stats()
    finally:
        model.close()
    assert [c.error for c in out] == [None] * 20
    assert len(first.bodies) == 20  # every request was answered by the healthy one
    # The failing server was tried until it was marked down (its in-flight calls), and after that
    # only when a cool-down ended: far less than its fair share of 10.
    assert 1 <= len(second.bodies) <= 6
    assert stats[1]["failed"] == len(second.bodies) and stats[1]["served"] == 0


def test_a_client_error_is_not_retried_on_other_servers(two_scripted):
    first, second = two_scripted
    first.plan, second.plan = ["400"], ["400"]
    model = load_model("openai:scripted", {"base_url": [first.url, second.url], "concurrency": 1})
    try:
        out = model.generate(requests(1))
        stats = model.fleet.stats()
    finally:
        model.close()
    # The request is at fault, not the server: one call, an error row, both servers still up.
    assert out[0].error.startswith("api_error: HTTP 400 from http://127.0.0.1:")
    assert len(first.bodies) + len(second.bodies) == 1
    assert all(s["up"] for s in stats)


def test_when_every_server_is_down_the_sample_is_an_error_row_not_a_hang():
    dead = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    model = load_model("openai:m", {"base_url": dead, "max_retries": 0, "concurrency": 1})
    try:
        out = model.generate(requests(2))
    finally:
        model.close()
    assert all(c.error and c.error.startswith("connection_error: cannot reach http://127.0.0.1:") for c in out)


def test_a_server_that_is_down_is_tried_again_after_its_cooldown():
    async def scenario():
        fleet = Fleet([Server("a", None, limit=1), Server("b", None, limit=1)], base_cooldown_s=0.2)
        a = await fleet.acquire()
        assert a.url == "a"
        fleet.failed(a)
        fleet.release(a)
        down_until = a.down_until
        b = await fleet.acquire()
        assert b.url == "b"  # a is down
        again = await fleet.acquire()  # b is busy, a is cooling down: wait for a
        returned = time.monotonic()
        fleet.succeeded(again)
        return again.url, returned >= down_until, a.failures

    url, after_cooldown, failures = asyncio.run(scenario())
    assert url == "a" and after_cooldown and failures == 0


# -- the real thing: two serve-model processes, one killed mid-run ---------------------------------
@pytest.mark.slow
def test_eval_on_two_serve_model_processes_survives_one_being_killed(tmp_path, tiny_model_dir):
    from test_model_server import start_cli_server

    servers = [start_cli_server(["serve-model", f"local:{tiny_model_dir}", "--name", "tiny",
                                 "-o", "dtype=fp32"]) for _ in range(2)]
    (victim, victim_url), (survivor, survivor_url) = servers
    write_jsonl(tmp_path / "data.jsonl", make_rows(40))
    options = {"base_url": [victim_url, survivor_url], "concurrency": 2, "max_retries": 1}
    spec = parse_eval_spec(spec_dict("openai:tiny", model_options=options), source="eval.yaml",
                           base_dir=tmp_path)
    killed_at = []

    def progress(done, total):
        if done and not killed_at:  # after the first batch: the rest must go to the survivor
            victim.kill()
            victim.wait(timeout=30)
            killed_at.append(done)

    store = Store.open(tmp_path / "flywheel.db")
    model = load_model(spec.model, spec.model_options)
    try:
        result = run_eval(spec, store, split="test", model=model, progress=progress)
        stats = model.fleet.stats()
    finally:
        model.close()
        store.close()
        for process, _ in servers:
            process.kill()
            process.wait(timeout=30)
    assert killed_at and 0 < killed_at[0] < 40
    assert result.n_samples == 40 and result.n_errors == 0
    assert stats[0]["failed"] >= 1 and stats[1]["served"] > 0  # the fleet did fail over
    with sqlite3.connect(tmp_path / "flywheel.db") as db:
        rows = db.execute("SELECT item_key, repeat, count(*) FROM samples WHERE iteration_id = ? "
                          "GROUP BY item_key, repeat", (result.iteration_id,)).fetchall()
    assert len(rows) == 40 and {count for _, _, count in rows} == {1}  # every item once
    assert {key for key, _, _ in rows} == {f"test-{i}" for i in range(40)}
