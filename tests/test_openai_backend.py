"""The `openai:` backend: the real SDK against real servers on 127.0.0.1.

Replies come from `flywheel serve-model` (a tiny real Llama) or, for retries, timeouts and
structured output, from a small Starlette app that misbehaves on purpose (serving_helpers).
"""

from __future__ import annotations

import json

import graders
import pytest
import yaml
from conftest import make_rows, spec_dict, write_jsonl
from serving_helpers import ScriptedUpstream, free_port

from flywheel.errors import ModelError
from flywheel.harness import run_eval
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.pricing import PRICES, Price, find_price
from flywheel.model_server import create_app
from flywheel.web import BackgroundServer
from flywheel.spec import parse_eval_spec

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def chatty(chatty_dir):
    return load_model(f"local:{chatty_dir}", {"dtype": "fp32"})


@pytest.fixture(scope="module")
def server(chatty):
    with BackgroundServer(create_app(chatty, name="chatty")) as running:
        yield running


@pytest.fixture
def scripted():
    upstream = ScriptedUpstream()
    with BackgroundServer(upstream.app) as running:
        upstream.url = running.url + "/v1"
        yield upstream


def remote(base_url, name="chatty", **options):
    return load_model(f"openai:{name}", {"base_url": base_url, "max_retries": 0, **options})


# -- identity and options (no network) -------------------------------------------------------------
def test_fingerprint_names_server_and_model_without_a_call(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert load_model("openai:gpt-4o-mini").fingerprint == "openai:https://api.openai.com/v1:gpt-4o-mini"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.1.2.3:8000/v1/")
    assert load_model("openai:qwen").fingerprint == "openai:http://10.1.2.3:8000/v1:qwen"
    explicit = load_model("openai:qwen", {"base_url": "http://127.0.0.1:9/v1"})
    assert explicit.fingerprint == "openai:http://127.0.0.1:9/v1:qwen"
    assert explicit._client is None  # nothing was started


def test_extra_body_changes_the_fingerprint_and_sending_options_do_not():
    url = {"base_url": "http://127.0.0.1:9/v1"}
    plain = load_model("openai:qwen", url).fingerprint
    assert load_model("openai:qwen", {**url, "extra_body": {"top_k": 5}}).fingerprint != plain
    assert load_model("openai:qwen", {**url, "extra_body": {"top_k": 5}}).fingerprint != \
        load_model("openai:qwen", {**url, "extra_body": {"top_k": 6}}).fingerprint
    for neutral in ({"timeout": 5}, {"concurrency": 2}, {"max_retries": 0}, {"use_n": False}):
        assert load_model("openai:qwen", {**url, **neutral}).fingerprint == plain


def test_unknown_and_bad_options_are_model_errors():
    with pytest.raises(ModelError, match="unknown option.*batch_sise.*known: base_url"):
        load_model("openai:gpt-4o", {"batch_sise": 4})
    with pytest.raises(ModelError, match="concurrency"):
        load_model("openai:gpt-4o", {"concurrency": 0})
    with pytest.raises(ModelError, match="prices"):
        load_model("openai:gpt-4o", {"prices": {"input": 1}})


def test_missing_api_key_for_openai_says_which_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("MY_KEY", raising=False)
    model = load_model("openai:gpt-4o-mini", {"api_key_env": "MY_KEY"})
    with pytest.raises(ModelError, match=r"\$MY_KEY"):
        model.generate([ChatRequest(HI)])


def test_price_table_prefixes_and_overrides(tmp_path, monkeypatch):
    assert find_price("gpt-4o-mini-2024-07-18") == PRICES["gpt-4o-mini"]
    assert find_price("gpt-4o-2024-08-06") == PRICES["gpt-4o"]
    assert find_price("o3-mini") == PRICES["o3-mini"]
    assert find_price("smollm2").cost(1000, 1000) == 0.0
    assert Price(2.0, 8.0, 0.5).cost(1_000_000, 500_000, cached_tokens=400_000) == pytest.approx(1.2 + 0.2 + 4.0)
    prices = tmp_path / "prices.yaml"
    prices.write_text("smollm2: {input: 0.1, output: 0.2}\ngpt-4o: {input: 1, output: 2}\n")
    monkeypatch.setenv("FLYWHEEL_PRICES", str(prices))
    assert find_price("smollm2") == Price(0.1, 0.2)
    assert find_price("gpt-4o-2024-08-06") == Price(1.0, 2.0)
    assert find_price("gpt-4o", {"input": 3, "output": 4}) == Price(3.0, 4.0)


# -- against a real serve-model --------------------------------------------------------------------
def test_generate_matches_local_greedy_with_usage_and_cost(server, chatty):
    prompts = [[{"role": "user", "content": f"{word} question"}] for word in ("card", "pin", "rate", "atm", "top")]
    sampling = Sampling(max_tokens=5)
    model = remote(server.url + "/v1", prices={"input": 1.0, "output": 2.0}, concurrency=3)
    try:
        got = model.generate([ChatRequest(p, sampling) for p in prompts])
    finally:
        model.close()
    expected = [chatty.generate([ChatRequest(p, sampling)])[0] for p in prompts]
    assert [c.error for c in got] == [None] * 5
    assert [c.text for c in got] == [c.text for c in expected]
    assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in expected]
    assert all(c.completion_tokens == 5 and c.finish_reason == "length" for c in got)
    assert got[0].cost == pytest.approx((got[0].prompt_tokens * 1.0 + 5 * 2.0) / 1e6)


def test_judge_protocol_chat(server):
    model = remote(server.url + "/v1")
    try:
        replies = model.chat([HI, [{"role": "user", "content": "bye"}]], max_tokens=4)
    finally:
        model.close()
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_harness_runs_on_openai_model_and_matches_local(server, chatty_dir, tmp_path, store):
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    outputs = {}
    for ref, options in ((f"local:{chatty_dir}", {"dtype": "fp32"}),
                         ("openai:chatty", {"base_url": server.url + "/v1", "max_retries": 0})):
        spec = parse_eval_spec(spec_dict(ref, model_options=options), source="eval.yaml", base_dir=tmp_path)
        result = run_eval(spec, store, split="test")
        assert result.n_errors == 0 and result.n_samples == 4
        rows = store.db.execute("select item_key, output_text, prompt_tokens from samples where iteration_id = ?",
                                [result.iteration_id]).fetchall()
        outputs[ref.split(":")[0]] = sorted(rows)
    assert outputs["openai"] == outputs["local"]
    assert any(text for _, text, _ in outputs["openai"])


# -- against an upstream that misbehaves on purpose ------------------------------------------------
def test_repeats_go_out_as_one_call_with_n(scripted):
    model = remote(scripted.url, name="scripted", prices={"input": 1.0, "output": 1.0})
    sampling = Sampling(temperature=0.8, max_tokens=4, seed=7)
    try:
        got = model.generate([ChatRequest(HI, sampling, repeat=r) for r in range(3)])
    finally:
        model.close()
    assert len(scripted.bodies) == 1 and scripted.bodies[0]["n"] == 3
    assert scripted.bodies[0]["seed"] == 7 and scripted.bodies[0]["temperature"] == 0.8
    assert [c.text for c in got] == ["echo: hi 0", "echo: hi 1", "echo: hi 2"]
    # Usage is per call (11 prompt + 9 completion tokens): shared out, the sums are what was billed.
    assert sum(c.prompt_tokens for c in got) == 11 and sum(c.completion_tokens for c in got) == 9
    assert sum(c.cost for c in got) == pytest.approx(20 / 1e6)


def test_a_server_that_ignores_n_gets_the_rest_one_by_one(scripted):
    scripted.plan = ["ignore_n"]
    model = remote(scripted.url, name="scripted")
    try:
        got = model.generate([ChatRequest(HI, Sampling(temperature=1.0), repeat=r) for r in range(3)])
    finally:
        model.close()
    assert [b.get("n") for b in scripted.bodies] == [3, None, None]
    assert sorted(b.get("seed") for b in scripted.bodies[1:]) == [1, 2]  # seed + repeat
    assert [c.error for c in got] == [None] * 3


def test_retries_429_and_500_with_backoff(scripted):
    scripted.plan = ["429", "500", "ok"]
    model = remote(scripted.url, name="scripted", max_retries=2)
    try:
        got = model.generate([ChatRequest(HI)])
    finally:
        model.close()
    assert got[0].error is None and got[0].text == "echo: hi"
    assert len(scripted.bodies) == 3


def test_failures_become_error_completions(scripted):
    scripted.plan = ["429", "500"]
    model = remote(scripted.url, name="scripted")
    try:
        got = model.generate([ChatRequest(HI), ChatRequest([{"role": "user", "content": "x"}])])
    finally:
        model.close()
    errors = sorted(c.error for c in got)
    assert "HTTP 429" in errors[0] and "slow down" in errors[0]
    assert "HTTP 500" in errors[1] and "upstream exploded" in errors[1]
    assert all(c.text == "" for c in got)


def test_timeouts_are_retried_then_reported(scripted):
    scripted.stall_s = 3.0
    scripted.plan = ["stall", "ok"]
    model = remote(scripted.url, name="scripted", timeout=0.5, max_retries=1)
    try:
        assert model.generate([ChatRequest(HI)])[0].text == "echo: hi"  # second attempt answered
        scripted.plan = ["stall"]
        model.max_retries = 0
        model.close()  # a new client picks up max_retries=0
        got = model.generate([ChatRequest(HI)])[0]
    finally:
        model.close()
    assert got.error.startswith("timeout:") and "0.5 s" in got.error


def test_unreachable_server_is_a_connection_error():
    model = remote(f"http://127.0.0.1:{free_port()}/v1", name="nobody")
    try:
        got = model.generate([ChatRequest(HI)])[0]
    finally:
        model.close()
    assert got.error.startswith("connection_error: cannot reach http://127.0.0.1:")


def test_concurrency_limits_requests_in_flight():
    upstream = ScriptedUpstream(hold_s=0.2)
    with BackgroundServer(upstream.app) as running:
        model = remote(running.url + "/v1", name="scripted", concurrency=3)
        try:
            got = model.generate([ChatRequest([{"role": "user", "content": str(i)}]) for i in range(9)])
        finally:
            model.close()
    assert [c.text for c in got] == [f"echo: {i}" for i in range(9)]
    assert upstream.max_in_flight == 3


def test_response_format_is_passed_through_and_reaches_graders_as_output_json(scripted):
    schema = {"type": "json_schema", "json_schema": {"name": "intent", "strict": True, "schema": {
        "type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]}}}
    model = remote(scripted.url, name="scripted")
    try:
        got = model.generate([ChatRequest(HI, response_format=schema)])[0]
    finally:
        model.close()
    assert scripted.bodies[0]["response_format"] == schema
    sample = graders.make_sample(got.text)
    assert sample["output_json"]["intent"] == "card_arrival"
    grader = graders.build_grader(graders.parse_grader(
        {"type": "string_check", "name": "intent", "input": "{{sample.output_json.intent}}",
         "reference": "{{item.label}}", "operation": "eq"}))
    assert grader.grade(sample, {"label": "card_arrival"}).passed
    assert json.loads(got.text)["echo"] == "hi"


def test_spec_response_format_reaches_the_server_and_graders_see_output_json(scripted, tmp_path, store):
    """An eval spec's response_format goes out with every request; graders read sample.output_json."""
    from conftest import make_rows, spec_dict, write_jsonl
    from flywheel.harness import run_eval
    from flywheel.spec import load_eval_spec

    write_jsonl(tmp_path / "data.jsonl", make_rows(2))
    schema = {"type": "json_schema", "json_schema": {"name": "intent", "schema": {
        "type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]}}}
    spec = spec_dict("openai:scripted", model_options={"base_url": scripted.url, "max_retries": 0},
                     response_format=schema)
    spec["graders"] = [{"type": "string_check", "name": "intent", "input": "{{sample.output_json.intent}}",
                        "reference": "card_arrival", "operation": "eq"}]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    result = run_eval(load_eval_spec(tmp_path / "eval.yaml"), store, split="test")
    assert scripted.bodies and all(b["response_format"] == schema for b in scripted.bodies)
    assert result.n_samples == 2 and result.pass_rate == 1.0  # output_json.intent == card_arrival
