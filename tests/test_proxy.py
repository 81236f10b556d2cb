"""`flywheel proxy`: the real openai SDK -> the proxy -> a real upstream, all on 127.0.0.1.

The upstream is `flywheel serve-model` (a tiny real Llama) or, for failures, a small Starlette app
that misbehaves on purpose (serving_helpers.ScriptedUpstream). Every call must land in the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from click.testing import CliRunner
from serving_helpers import ScriptedUpstream, free_port

from flywheel.cli import main
from flywheel.models import load_model
from flywheel.proxy.server import CaptureWriter, StreamAssembler, create_proxy_app, normalise_upstream
from flywheel.model_server import create_app
from flywheel.web import BackgroundServer
from flywheel.store import Store
from flywheel.store.rows import Capture

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_server(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    with BackgroundServer(create_app(model, name="chatty")) as running:
        yield running


@pytest.fixture
def scripted():
    upstream = ScriptedUpstream(stall_s=3.0)
    with BackgroundServer(upstream.app) as running:
        upstream.url = running.url + "/v1"
        yield upstream


class Proxy:
    def __init__(self, upstream: str, db_path, **options):
        self.db_path = str(db_path)
        self.server = BackgroundServer(create_proxy_app(upstream, self.db_path, **options)).start()
        self.url = self.server.url + "/v1"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="sk-app-key", max_retries=0, **kwargs)

    def captures(self) -> list[Capture]:
        store = Store.open(self.db_path)
        try:
            return store.query_captures()
        finally:
            store.close()


@pytest.fixture
def make_proxy(tmp_path):
    proxies = []

    def make(upstream: str, **options) -> Proxy:
        proxy = Proxy(upstream, tmp_path / f"captures-{len(proxies)}.db", **options)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.server.stop()


def test_normalise_upstream():
    assert normalise_upstream("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_upstream("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert normalise_upstream("http://host/openai/v1") == "http://host/openai/v1"


def test_every_call_is_recorded_and_answered_unchanged(model_server, make_proxy):
    proxy = make_proxy(model_server.url + "/v1")
    direct = openai.OpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0)
    via = proxy.client()
    prompts = ["card arrival", "pin blocked", "exchange rate"]
    replies = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": prompt}]
        expected = direct.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=5)
        got = via.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=5,
                                          store=True, metadata={"usecase": "triage", "turn": str(i)})
        assert got.choices[0].message.content == expected.choices[0].message.content
        assert got.usage.model_dump() == expected.usage.model_dump()
        replies.append(got)
    rows = proxy.captures()
    assert len(rows) == 3
    for row, prompt, reply, i in zip(rows, prompts, replies, range(3)):
        assert row.status == 200 and row.error is None and row.model == "chatty"
        request = json.loads(row.request_json)
        assert request["messages"][1]["content"] == prompt and request["store"] is True
        response = json.loads(row.response_json)
        assert response["choices"][0]["message"]["content"] == reply.choices[0].message.content
        assert response["id"] == row.response_id == reply.id
        assert json.loads(row.metadata_json) == {"usecase": "triage", "turn": str(i)}
        assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, 5)
        assert row.total_tokens == reply.usage.total_tokens
        assert row.latency_s > 0 and row.stream == 0 and row.upstream == model_server.url + "/v1"


def test_streamed_calls_are_relayed_and_recorded_whole(model_server, make_proxy):
    proxy = make_proxy(model_server.url + "/v1")
    whole = proxy.client().chat.completions.create(model="chatty", messages=HI, temperature=0, max_tokens=6)
    chunks = list(proxy.client().chat.completions.create(
        model="chatty", messages=HI, temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, metadata={"mode": "stream"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    row = proxy.captures()[-1]
    assert row.stream == 1 and row.status == 200 and row.error is None
    response = json.loads(row.response_json)
    assert response["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert response["choices"][0]["finish_reason"] == "length"
    assert row.completion_tokens == 6 and json.loads(row.metadata_json) == {"mode": "stream"}


def test_stream_with_many_deltas_and_headers_pass_through(scripted, make_proxy):
    proxy = make_proxy(scripted.url)
    chunks = list(proxy.client().chat.completions.create(model="scripted", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"
    assert json.loads(proxy.captures()[0].response_json)["choices"][0]["message"]["content"] == "echo: hi"
    headers = scripted.headers[0]
    assert headers["authorization"] == "Bearer sk-app-key"  # the app's own key reaches the upstream
    assert headers["accept-encoding"] == "identity"


def test_models_route_passes_through_unrecorded(model_server, make_proxy):
    proxy = make_proxy(model_server.url + "/v1")
    assert [m.id for m in proxy.client().models.list()] == ["chatty"]
    assert proxy.captures() == []


def test_upstream_down_is_502_and_recorded(make_proxy):
    proxy = make_proxy(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.InternalServerError) as caught:
        proxy.client().chat.completions.create(model="m", messages=HI, metadata={"case": "down"})
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"
    (row,) = proxy.captures()
    assert row.status == 502 and row.error.startswith("upstream_unreachable")
    assert json.loads(row.metadata_json) == {"case": "down"} and json.loads(row.request_json)["messages"] == HI


def test_upstream_500_is_relayed_and_recorded(scripted, make_proxy):
    scripted.plan = ["500"]
    proxy = make_proxy(scripted.url)
    with pytest.raises(openai.InternalServerError, match="upstream exploded") as caught:
        proxy.client().chat.completions.create(model="scripted", messages=HI)
    assert caught.value.status_code == 500
    (row,) = proxy.captures()
    assert row.status == 500 and row.error == "HTTP 500: upstream exploded"
    assert json.loads(row.response_json)["error"]["message"] == "upstream exploded"


def test_rate_limits_are_relayed_with_their_retry_headers(scripted, make_proxy):
    scripted.plan = ["429"]
    proxy = make_proxy(scripted.url)
    client = openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=1)
    reply = client.chat.completions.create(model="scripted", messages=HI)  # the SDK retried through the proxy
    assert reply.choices[0].message.content == "echo: hi"
    assert [r.status for r in proxy.captures()] == [429, 200]


def test_upstream_timeout_is_504_and_recorded(scripted, make_proxy):
    scripted.plan = ["stall"]
    proxy = make_proxy(scripted.url, timeout=0.5)
    with pytest.raises(openai.InternalServerError) as caught:
        proxy.client().chat.completions.create(model="scripted", messages=HI)
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
    (row,) = proxy.captures()
    assert row.status == 504 and "upstream_timeout" in row.error and row.latency_s >= 0.5


def test_malformed_body_is_400_and_recorded(scripted, make_proxy):
    proxy = make_proxy(scripted.url)
    response = httpx2.post(proxy.url + "/chat/completions", content=b'{"model": "x", "messages": [',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    (row,) = proxy.captures()
    assert row.status == 400 and row.error.startswith("invalid_json")
    assert json.loads(row.request_json) == {"raw": '{"model": "x", "messages": ['}
    assert scripted.bodies == []  # nothing was forwarded


def test_oversized_body_is_413_and_recorded(scripted, make_proxy):
    proxy = make_proxy(scripted.url, max_body_bytes=1000)
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    (row,) = proxy.captures()
    assert row.status == 413 and row.request_json is None and row.request_bytes > 5000
    assert scripted.bodies == []


def test_a_request_that_gave_up_is_still_recorded_and_the_writer_goes_on(tmp_path):
    writer = CaptureWriter(str(tmp_path / "w.db"))
    abandoned = writer.submit({"model": "a", "status": 200})
    assert abandoned.cancel()  # the client hung up before the writer got to it
    writer.start()
    try:
        assert writer.submit({"model": "b", "status": 200}).result(timeout=30) == 2
    finally:
        writer.close()
    store = Store.open(tmp_path / "w.db")
    assert [r.model for r in store.query_captures()] == ["a", "b"]
    store.close()


def test_stream_assembler_joins_tool_call_deltas():
    assembler = StreamAssembler()
    events = [
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"pin"}'}}]},
                      "finish_reason": "tool_calls"}]},
    ]
    payload = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for start in range(0, len(payload), 7):  # chunk boundaries fall anywhere
        assembler.feed(payload[start:start + 7])
    choice = assembler.result()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and assembler.done
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "pin"}'}}]


def test_cli_proxy_records_into_the_db(scripted, tmp_path):
    port = free_port()
    db = str(tmp_path / "cli.db")
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel", "proxy", "--upstream", scripted.url, "--port", str(port), "--db", db],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline, "proxy did not come up"
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model="scripted", messages=HI, metadata={"app": "cli"})
    finally:
        process.terminate()
        process.wait(timeout=30)
    listed = CliRunner().invoke(main, ["captures", "list", "--db", db, "--json", "--metadata", "app=cli"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["output"] == "echo: hi" and row["status"] == 200 and row["metadata"] == {"app": "cli"}


def test_cli_proxy_rejects_a_bad_upstream(tmp_path):
    result = CliRunner().invoke(main, ["proxy", "--upstream", "localhost:8000", "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "expected an http(s) URL" in result.output


# -- robustness: encodings, caps, hang-ups, error text -----------------------------------------------
class Misbehaving:
    """An upstream with replies the scripted one lacks: empty error bodies and a slow stream."""

    def __init__(self):
        from starlette.applications import Starlette
        from starlette.responses import Response, StreamingResponse
        from starlette.routing import Route

        async def chat(request):
            body = json.loads(await request.body())
            mode = body.get("model")
            if mode == "empty-500":
                return Response(b"", status_code=500)
            if mode == "blank-message":
                return Response(json.dumps({"error": {"message": "", "type": None, "code": None}}).encode(),
                                status_code=503, media_type="application/json")

            async def slow():
                for i in range(50):
                    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    await asyncio.sleep(0.1)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(slow(), media_type="text/event-stream")

        self.app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])



@pytest.fixture
def misbehaving():
    upstream = Misbehaving()
    with BackgroundServer(upstream.app) as running:
        yield running.url + "/v1"


def _wait_for_captures(proxy, n, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = proxy.captures()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                      "utf-32-be"])
def test_request_bodies_in_every_json_encoding(scripted, make_proxy, encoding):
    proxy = make_proxy(scripted.url)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "héllo \u2028 ☃ 𝄞"}],
            "metadata": {"enc": encoding}}
    response = httpx2.post(proxy.url + "/chat/completions", content=json.dumps(body, ensure_ascii=False).encode(encoding),
                           headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: héllo \u2028 ☃ 𝄞"
    (row,) = proxy.captures()
    assert row.status == 200 and row.error is None
    assert json.loads(row.request_json) == body and json.loads(row.metadata_json) == {"enc": encoding}


def test_concurrency_cap_answers_429_and_records_it(make_proxy):
    from concurrent.futures import ThreadPoolExecutor

    upstream = ScriptedUpstream(hold_s=1.0)
    with BackgroundServer(upstream.app) as running:
        proxy = make_proxy(running.url + "/v1", max_concurrency=2)
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda i: httpx2.post(
                proxy.url + "/chat/completions", json={"model": "scripted", "messages": HI}, timeout=30).status_code,
                range(6)))
        assert sorted(statuses).count(200) >= 2 and statuses.count(429) >= 1
        assert upstream.max_in_flight <= 2
        rows = _wait_for_captures(proxy, 6)
        refused = [r for r in rows if r.status == 429]
        assert len(refused) == statuses.count(429)
        assert all(r.error.startswith("proxy_overloaded: too many calls at once") for r in refused)
        # The slots come back: a later call goes through.
        assert httpx2.post(proxy.url + "/chat/completions", json={"model": "scripted", "messages": HI},
                           timeout=30).status_code == 200


def test_buffered_body_cap_answers_429_and_records_it(make_proxy):
    import threading

    upstream = ScriptedUpstream(hold_s=1.5)
    with BackgroundServer(upstream.app) as running:
        proxy = make_proxy(running.url + "/v1", max_buffered_bytes=12_000)
        big = {"model": "scripted", "messages": [{"role": "user", "content": "x" * 8000}]}
        first: list[int] = []
        thread = threading.Thread(target=lambda: first.append(httpx2.post(
            proxy.url + "/chat/completions", json=big, timeout=30).status_code))
        thread.start()
        deadline = time.monotonic() + 10
        while upstream.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = httpx2.post(proxy.url + "/chat/completions", json=big, timeout=30)
        thread.join()
        assert first == [200] and second.status_code == 429
        assert second.json()["error"]["code"] == "proxy_overloaded"
        rows = _wait_for_captures(proxy, 2)
        assert sorted(r.status for r in rows) == [200, 429]
        assert "request bodies" in next(r.error for r in rows if r.status == 429)
        # Released: the same body fits again once the first call is over.
        assert httpx2.post(proxy.url + "/chat/completions", json=big, timeout=30).status_code == 200


def test_client_hangup_before_the_reply_is_recorded_as_such(make_proxy):
    upstream = ScriptedUpstream(plan=["stall"], stall_s=1.5)
    with BackgroundServer(upstream.app) as running:
        proxy = make_proxy(running.url + "/v1")
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(proxy.url + "/chat/completions", json={"model": "scripted", "messages": HI}, timeout=0.3)
        (row,) = _wait_for_captures(proxy, 1)
        assert row.status == 499 and row.error.startswith("client_disconnected")


def test_client_hangup_mid_stream_is_recorded_as_such(misbehaving, make_proxy):
    proxy = make_proxy(misbehaving)
    with httpx2.stream("POST", proxy.url + "/chat/completions", timeout=30,
                       json={"model": "slow", "messages": HI, "stream": True}) as response:
        assert response.status_code == 200
        for _ in response.iter_raw():
            break  # one chunk, then hang up
    (row,) = _wait_for_captures(proxy, 1)
    assert row.status == 499 and row.error.startswith("client_disconnected")
    assert json.loads(row.response_json)["choices"][0]["message"]["content"].startswith("w0")


@pytest.mark.parametrize("mode, expected", [("empty-500", "HTTP 500: the upstream sent an empty body"),
                                            ("blank-message", "HTTP 503: the upstream sent no error message")])
def test_upstream_error_text_is_never_empty(misbehaving, make_proxy, mode, expected):
    proxy = make_proxy(misbehaving)
    response = httpx2.post(proxy.url + "/chat/completions", json={"model": mode, "messages": HI}, timeout=30)
    assert response.status_code in (500, 503)
    (row,) = proxy.captures()
    assert row.error == expected
