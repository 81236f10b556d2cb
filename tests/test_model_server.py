"""`flywheel serve-model`: the real openai SDK against a real uvicorn server on 127.0.0.1.

Fast tests serve a tiny real Llama (random weights, SmolLM2's tokenizer); the slow test serves the
embedded SmolLM2 and checks `flywheel eval` through `openai:` against `local:`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.model_server import create_app, served_name
from flywheel.web import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hi", "What is the capital of France?", "word word word", "question 3 about pin blocked"]


@pytest.fixture(scope="module")
def chatty(chatty_dir):
    return load_model(f"local:{chatty_dir}", {"dtype": "fp32"})


@pytest.fixture(scope="module")
def server(chatty):
    with BackgroundServer(create_app(chatty, name="chatty", max_body_bytes=20_000)) as running:
        yield running


def client_for(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def local_greedy(model, prompts, max_tokens=6):
    sampling = Sampling(max_tokens=max_tokens)
    return [model.generate([ChatRequest([{"role": "user", "content": p}], sampling)])[0] for p in prompts]


def test_served_name():
    assert served_name("local:smollm2") == "smollm2"
    assert served_name("openai:gpt-4o-mini") == "gpt-4o-mini"


def test_sdk_chat_matches_local_greedy_generation(server, chatty):
    client = client_for(server)
    assert [m.id for m in client.models.list()] == ["chatty"]
    expected = local_greedy(chatty, PROMPTS)
    assert len({c.text for c in expected}) == len(PROMPTS)  # the prompts are told apart
    for prompt, local in zip(PROMPTS, expected):
        reply = client.chat.completions.create(
            model="chatty", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=6)
        assert reply.choices[0].message.content == local.text
        assert reply.choices[0].finish_reason == local.finish_reason == "length"
        assert reply.usage.prompt_tokens == local.prompt_tokens
        assert reply.usage.completion_tokens == 6
        assert reply.model == "chatty"


def test_the_full_model_ref_is_an_alias(server, chatty):
    reply = client_for(server).chat.completions.create(
        model=chatty.ref, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        temperature=0, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_streaming_sends_the_same_reply_as_sse(server):
    client = client_for(server)
    messages = [{"role": "user", "content": "word word word"}]
    whole = client.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=6)
    chunks = list(client.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_samples_and_stop_sequences(server):
    client = client_for(server)
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=6, n=3)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len(set(texts)) == 1  # greedy: every sample is the same
    assert reply.usage.completion_tokens == 18
    stop_word = texts[0].split()[1]
    cut = client.chat.completions.create(model="chatty", messages=messages, temperature=0, max_tokens=6,
                                         stop=[stop_word])
    assert cut.choices[0].message.content == texts[0][: texts[0].index(stop_word)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_generate_calls_and_get_their_own_answers(chatty):
    prompts = [f"{word} {i}" for i, word in enumerate(["apple", "bank", "card", "pin"] * 2)]
    expected = [c.text for c in local_greedy(chatty, prompts)]
    app = create_app(chatty, name="chatty", batch_size=8, max_wait_ms=1000)
    with BackgroundServer(app) as running:
        client = client_for(running)

        def ask(prompt):
            return client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=6).choices[0].message.content

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    assert answers == expected
    sizes = app.state.batcher.batch_sizes
    assert sum(sizes) == len(prompts)
    assert max(sizes) > 1, sizes


def test_lora_adapter_answers_through_the_server(chatty_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(chatty_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    peft_model.save_pretrained(tmp_path / "sft-1")
    tuned = load_model(f"local:{chatty_dir}+{tmp_path / 'sft-1'}", {"dtype": "fp32"})
    base = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    with BackgroundServer(create_app(tuned)) as running:
        name = f"{chatty_dir.name}-sft-1"
        client = client_for(running)
        assert [m.id for m in client.models.list()] == [name]
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=6)
    assert reply.choices[0].message.content == local_greedy(tuned, ["hi"])[0].text
    assert reply.choices[0].message.content != local_greedy(base, ["hi"])[0].text


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (json.dumps({"model": "chatty"}).encode(), 400, "messages", None),
    (json.dumps({"model": "chatty", "messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
     "messages[0].role", None),
    (json.dumps({"model": "chatty", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(),
     400, "temperature", None),
    (json.dumps({"model": "chatty", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "messages[0].content", "unsupported_content"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model",
     "model_not_found"),
    (json.dumps({"model": "chatty", "messages": [{"role": "user", "content": "x" * 30_000}]}).encode(), 413,
     None, "request_too_large"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, param, code):
    response = httpx2.post(server.url + "/v1/chat/completions", content=body,
                           headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code


def test_sdk_raises_its_own_error_types(server):
    client = client_for(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_unknown_route_and_method(server):
    missing = httpx2.get(server.url + "/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx2.get(server.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_generation_failure_is_a_500(chatty_dir):
    from flywheel.models.local import LocalModel

    class Exploding(LocalModel):
        def generate(self, requests):
            raise RuntimeError("out of memory (on purpose)")

    model = Exploding(f"local:{chatty_dir}", str(chatty_dir), dtype="fp32")
    with BackgroundServer(create_app(model, name="boom")) as running:
        with pytest.raises(openai.InternalServerError, match="out of memory"):
            client_for(running).chat.completions.create(model="boom", messages=[{"role": "user", "content": "x"}])
        # The server survives a failed batch.
        assert httpx2.get(running.url + "/health").json() == {"status": "ok", "model": "boom"}


def test_cli_refuses_an_unknown_model():
    result = CliRunner().invoke(main, ["serve-model", "local:no/such/dir/here", "--port", "0"])
    assert result.exit_code == 1
    assert "error:" in result.output and "no/such/dir/here" in result.output


# -- the embedded model, through the real CLI -------------------------------------------------------
def start_cli_server(args: list[str], timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`flywheel serve-model ...` in a subprocess on a free port; returns it and its /v1 URL."""
    from serving_helpers import free_port

    port = free_port()
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server's access log
    process = subprocess.Popen([sys.executable, "-m", "flywheel", *args, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited: {log.read().decode()[-2000:]}")
        try:
            if httpx2.get(url + "/health", timeout=1).status_code == 200:
                return process, url + "/v1"
        except httpx2.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise AssertionError("server did not come up")


@pytest.mark.slow
def test_eval_through_openai_backend_matches_local_smollm2(tmp_path):
    spec = str(ROOT / "evals" / "banking77" / "eval.yaml")
    db = str(tmp_path / "flywheel.db")
    process, base_url = start_cli_server(["serve-model", "local:smollm2", "-o", "dtype=fp32"])
    try:
        remote = CliRunner().invoke(main, [
            "eval", spec, "--limit", "6", "--json", "--db", db, "-s", "model=openai:smollm2",
            "-s", f"model_options.base_url={base_url}", "-s", "model_options.concurrency=6"])
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(main, ["eval", spec, "--limit", "6", "--json", "--db", db,
                                      "-s", "model_options.dtype=fp32"])
    assert local.exit_code == 0, local.output
    remote_result, local_result = json.loads(remote.output), json.loads(local.output)
    assert remote_result["n_errors"] == 0 and remote_result["model_calls"] == 6

    from flywheel.store import Store

    store = Store.open(db)
    outputs = [dict(store.db.execute("select item_key, output_text from samples where iteration_id = ?",
                                     [r["iteration_id"]]).fetchall()) for r in (remote_result, local_result)]
    tokens = [store.db.execute("select sum(prompt_tokens), sum(completion_tokens) from samples"
                               " where iteration_id = ?", [r["iteration_id"]]).fetchone()
              for r in (remote_result, local_result)]
    store.close()
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 6 and any(outputs[0].values())
    assert tokens[0] == tokens[1]
    assert remote_result["pass_rate"] == local_result["pass_rate"]
