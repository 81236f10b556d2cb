"""The proxy's privacy options against real upstreams on 127.0.0.1: --redact stores no raw card
number, --block-output-pii rejects or replaces leaked PII, --retention-days purges old captures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest
from serving_helpers import ScriptedUpstream, completion_body, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from flywheel.privacy.policy import ProxyPrivacy
from flywheel.privacy.redact import RedactionPolicy
from flywheel.proxy import create_proxy_app
from flywheel.web import BackgroundServer
from flywheel.store import Store

pytest.importorskip("presidio_analyzer")

CARD = "4111 1111 1111 1111"
ASK = [{"role": "user", "content": f"Hi, my name is Ann Lee, refund card {CARD} please, mail ann@example.org"}]


class LeakyUpstream:
    """Answers every chat call with `reply` (streamed when asked): a model that leaks PII."""

    def __init__(self, reply: str):
        self.reply = reply
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request):
        body = json.loads(await request.body())
        payload = completion_body(self.reply, model=body.get("model", "leaky"))
        if not body.get("stream"):
            return JSONResponse(payload)

        async def events():
            for piece in (self.reply[:9], self.reply[9:]):
                chunk = {"id": "c", "object": "chat.completion.chunk", "model": "leaky", "created": 1,
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b'data: {"id": "c", "object": "chat.completion.chunk", "model": "leaky", "created": 1, ' \
                  b'"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


def serve(app):
    return BackgroundServer(app).start()


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def test_redact_stores_no_raw_card_number_and_relays_unchanged(tmp_path):
    upstream = ScriptedUpstream()
    db = tmp_path / "proxy.db"
    with BackgroundServer(upstream.app) as up:
        proxy = serve(create_proxy_app(up.url + "/v1", str(db), privacy=ProxyPrivacy(redact=RedactionPolicy())))
        try:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
            reply = client.chat.completions.create(model="scripted", messages=ASK)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="scripted", messages=ASK, stream=True) if c.choices)
        finally:
            proxy.stop()
    assert CARD in reply.choices[0].message.content and CARD in streamed  # the app sees the real reply
    assert upstream.bodies[0]["messages"] == ASK  # and the upstream the real request
    store = Store.open(db)
    rows = store.query_captures()
    store.close()
    assert len(rows) == 2
    for row in rows:
        request, response = json.loads(row.request_json), json.loads(row.response_json)
        assert request["messages"][0]["content"] == ("Hi, my name is <PERSON_1>, refund card <CREDIT_CARD_1> "
                                                     "please, mail <EMAIL_ADDRESS_1>")
        assert response["choices"][0]["message"]["content"].startswith("echo: Hi, my name is <PERSON_1>")
    stored = db_bytes(db)
    assert CARD.encode() not in stored and CARD.replace(" ", "").encode() not in stored
    assert b"ann@example.org" not in stored


@pytest.mark.parametrize("stream", [False, True])
def test_block_output_pii_rejects_a_leak_with_422(tmp_path, stream):
    db = tmp_path / "proxy.db"
    with BackgroundServer(LeakyUpstream("Sure: the CEO is at ceo@bigcorp.com").app) as up:
        proxy = serve(create_proxy_app(up.url + "/v1", str(db), privacy=ProxyPrivacy(block_output_pii="reject")))
        try:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
            with pytest.raises(openai.UnprocessableEntityError) as caught:
                result = client.chat.completions.create(model="leaky", messages=[{"role": "user", "content": "who?"}],
                                                        stream=stream)
                list(result) if stream else None
        finally:
            proxy.stop()
    assert caught.value.code == "output_pii_blocked" and "EMAIL_ADDRESS" in caught.value.message
    store = Store.open(db)
    (row,) = store.query_captures()
    store.close()
    assert row.status == 422 and row.error.startswith("output_pii_blocked")
    assert b"ceo@bigcorp.com" not in db_bytes(db)  # the blocked reply is stored screened


@pytest.mark.parametrize("stream", [False, True])
def test_block_output_pii_redact_replaces_only_what_the_request_lacked(tmp_path, stream):
    reply = "Forwarded from ann@example.org to ceo@bigcorp.com"
    with BackgroundServer(LeakyUpstream(reply).app) as up:
        proxy = serve(create_proxy_app(up.url + "/v1", str(tmp_path / "p.db"),
                                       privacy=ProxyPrivacy(block_output_pii="redact")))
        try:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
            ask = [{"role": "user", "content": "forward mail from ann@example.org"}]
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="leaky", messages=ask, stream=True) if c.choices)
            else:
                text = client.chat.completions.create(model="leaky", messages=ask).choices[0].message.content
            clean = client.chat.completions.create(model="leaky", messages=[
                {"role": "user", "content": "forward ann@example.org to ceo@bigcorp.com"}]).choices[0].message.content
        finally:
            proxy.stop()
    assert text == "Forwarded from ann@example.org to <EMAIL_ADDRESS>"
    assert clean == reply  # nothing the request did not contain: relayed as is


def old_capture(created_at: str, marker: str) -> dict:
    return {"created_at": created_at, "endpoint": "/v1/chat/completions", "model": "m", "status": 200,
            "request_json": json.dumps({"messages": [{"role": "user", "content": marker}]}),
            "response_json": json.dumps(completion_body("ok"))}


def test_retention_purges_old_captures_at_start(tmp_path):
    db = tmp_path / "proxy.db"
    store = Store.open(db)
    store.insert_captures([old_capture("2020-01-01T00:00:00.000+00:00", "ancient-7731"),
                           old_capture(time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime()), "recent-1")])
    store.close()
    upstream = ScriptedUpstream()
    with BackgroundServer(upstream.app) as up:
        proxy = serve(create_proxy_app(up.url + "/v1", str(db), privacy=ProxyPrivacy(retention_days=30)))
        try:
            deadline = time.monotonic() + 30
            while True:
                store = Store.open(db)
                left = [json.loads(r.request_json)["messages"][0]["content"] for r in store.query_captures()]
                deletions = store.list_deletions()
                store.close()
                if left == ["recent-1"]:
                    break
                assert time.monotonic() < deadline, left
                time.sleep(0.2)
        finally:
            proxy.stop()
    assert deletions[0]["reason"] == "retention (30 days)" and deletions[0]["n_captures"] == 1
    assert b"ancient-7731" not in db_bytes(db)


def test_cli_proxy_redact_and_retention_flags(tmp_path):
    upstream = ScriptedUpstream()
    with BackgroundServer(upstream.app) as up:
        port = free_port()
        db = tmp_path / "cli.db"
        process = subprocess.Popen(
            [sys.executable, "-m", "flywheel", "proxy", "--upstream", up.url + "/v1", "--port", str(port), "--db",
             str(db), "--redact", "--block-output-pii", "--retention-days", "30"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                try:
                    httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                    break
                except httpx2.HTTPError:
                    assert time.monotonic() < deadline, "proxy did not come up"
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
            assert CARD in client.chat.completions.create(model="scripted", messages=ASK).choices[0].message.content
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert CARD.encode() not in db_bytes(db)
    bad = subprocess.run([sys.executable, "-m", "flywheel", "proxy", "--upstream", "http://127.0.0.1:9/v1",
                          "--redact", "blur", "--db", str(db)], capture_output=True, text=True)
    assert bad.returncode == 2 and "'blur' is not one of 'replace', 'mask', 'hash'" in bad.stderr
