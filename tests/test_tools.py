"""Tools: definitions in eval specs, sent by `openai:` models, rendered by local templates, and
tool calls reaching graders as sample.output_tools (flywheel/tools.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from serving_helpers import completion_body
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import graders
from flywheel.errors import SpecError
from flywheel.harness import run_eval
from flywheel.models import ChatRequest, Completion, load_model
from flywheel.web import BackgroundServer
from flywheel.spec import load_eval_spec
from flywheel.tools import attach_tool_calls, parse_tool_calls

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "evals" / "tools" / "eval.yaml"
# A row of the platform's chat fine-tuning JSONL (reference §5.4) that carries tool definitions.
PLATFORM_ROW = {
    "messages": [{"role": "user", "content": "What is the balance of my savings?"},
                 {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                     "name": "get_balance", "arguments": "{\"account\": \"savings\"}"}}]}],
    "tools": [{"type": "function", "function": {
        "name": "get_balance", "description": "The balance of an account.",
        "parameters": {"type": "object", "properties": {"account": {"type": "string"}}, "required": ["account"]}}}],
}


class ToolServer:
    """Answers requests that carry tools with a call of the first tool (arguments from the item's
    text); checks that tool_choice names a defined tool. Records every body."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.bodies.append(body)
        tools = body.get("tools") or []
        names = [t["function"]["name"] for t in tools]
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            return JSONResponse({"error": {"message": "tool_choice names no tool"}}, status_code=400)
        payload = completion_body("plain text", model=body["model"])
        if tools:
            text = body["messages"][-1]["content"]
            account = "savings" if "saving" in text else "current"
            payload["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_9", "type": "function",
                 "function": {"name": names[0], "arguments": json.dumps({"account": account})}}]}
            payload["choices"][0]["finish_reason"] = "tool_calls"
        return JSONResponse(payload)


@pytest.fixture
def server():
    upstream = ToolServer()
    with BackgroundServer(upstream.app) as running:
        upstream.url = running.url + "/v1"
        yield upstream


def write_spec(tmp_path, model, tools, **extra):
    rows = [{"id": "a", "text": "balance of my savings?", "account": "savings"},
            {"id": "b", "text": "balance of my current account?", "account": "current"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "tools", "dataset": {"path": "data.jsonl", "id_field": "id"},
            "split": {"ratios": {"test": 1.0}}, "input": [{"role": "user", "content": "{{item.text}}"}],
            "model": model, "tools": tools, **extra,
            "graders": [{"type": "string_check", "name": "account",
                         "input": "{{sample.output_tools[0].function.arguments}}",
                         "reference": "{{item.account}}", "operation": "like"}]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_definitions_round_trip_platform_jsonl_spec_request_and_calls_reach_graders(server, tmp_path, store):
    line = json.loads(json.dumps(PLATFORM_ROW))  # as read from a JSONL file
    path = write_spec(tmp_path, "openai:m", line["tools"], tool_choice={"type": "function", "function": {"name": "get_balance"}},
                      model_options={"base_url": server.url, "max_retries": 0})
    spec = load_eval_spec(path)
    assert spec.tools == PLATFORM_ROW["tools"]
    result = run_eval(spec, store, split="test")
    assert [b["tools"] for b in server.bodies] == [PLATFORM_ROW["tools"]] * 2
    assert all(b["tool_choice"] == {"type": "function", "function": {"name": "get_balance"}} for b in server.bodies)
    assert result.pass_rate == 1.0 and result.n_errors == 0  # the grader read sample.output_tools
    stored = store.db.execute("select output_tools_json, finish_reason from samples").fetchall()
    assert all(json.loads(tools)[0]["function"]["name"] == "get_balance" and finish == "tool_calls"
               for tools, finish in stored)
    again = run_eval(spec, store, split="test")  # a new run answered from the cache, calls included
    assert again.cache_hits == 2 and again.model_calls == 0 and again.pass_rate == 1.0
    assert len(server.bodies) == 2


def test_requests_without_tools_send_none(server):
    model = load_model("openai:m", {"base_url": server.url, "max_retries": 0})
    try:
        [completion] = model.generate([ChatRequest([{"role": "user", "content": "hi"}])])
    finally:
        model.close()
    assert "tools" not in server.bodies[0] and "tool_choice" not in server.bodies[0]
    assert completion.text == "plain text" and completion.tool_calls is None


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "function"}], None, "tools[0].function: must be a mapping"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0].type: must be 'function'"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name: 'has space'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters: must be a JSON schema with type: object"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, None, "tools[1].function.name: duplicate tool 'f'"),
    ([{"type": "function", "function": {"name": "f"}}], "sometimes", "tool_choice: 'sometimes'"),
    ([{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}},
     "names no defined tool; tools: f"),
    (None, "auto", "tool_choice: needs `tools`"),
])
def test_bad_tool_definitions_are_one_line_spec_errors(tmp_path, tools, choice, message):
    path = write_spec(tmp_path, "local:smollm2", tools, **({"tool_choice": choice} if choice else {}))
    with pytest.raises(SpecError) as info:
        load_eval_spec(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_parse_tool_calls():
    text, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "transfer", "arguments": {"amount": 5, "to": "Anna"}}\n'
                                   '</tool_call><tool_call>{"name": "get_balance", "arguments": "{}"}</tool_call>')
    assert text == "Sure."
    assert [c["function"]["name"] for c in calls] == ["transfer", "get_balance"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"amount": 5, "to": "Anna"}
    assert calls[1]["function"]["arguments"] == "{}"
    # unreadable or nameless blocks stay text; an unclosed final block is read
    assert parse_tool_calls("<tool_call>{oops}</tool_call>") == ("<tool_call>{oops}</tool_call>", [])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []
    assert parse_tool_calls('<tool_call>{"name": "f"}')[1][0]["function"] == {"name": "f", "arguments": "{}"}


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_local_templates_render_tools_their_own_way_or_in_the_hermes_block(tmp_path, tiny_model_dir):
    tools = PLATFORM_ROW["tools"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "balance?"}]
    plain = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32"})
    hermes = plain.render_prompt(messages, tools, "required")
    assert "Be brief.\n\nYou may call functions" in hermes and '"name": "get_balance"' in hermes
    assert "You must call a function." in hermes
    assert plain.render_prompt(messages, tools, "none") == plain.render_prompt(messages)
    own = tmp_path / "tool-template"
    shutil.copytree(tiny_model_dir, own)
    config = json.loads((own / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (own / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in own.glob("chat_template.*"):
        extra.unlink()
    templated = load_model(f"local:{own}", {"dtype": "fp32"})
    assert templated.render_prompt(messages, tools).startswith("<|im_start|>system\nTOOLS: get_balance<|im_end|>")
    # a request with tools goes through generate and comes back as a completion
    [completion] = templated.generate([ChatRequest(messages, tools=tools)])
    assert completion.error is None


def test_local_replies_with_tool_call_blocks_become_calls():
    tools = PLATFORM_ROW["tools"]
    requests = [ChatRequest([], tools=tools), ChatRequest([]), ChatRequest([], tools=tools, tool_choice="none")]
    reply = '<tool_call>{"name": "get_balance", "arguments": {"account": "savings"}}</tool_call>'
    completions = [Completion(text=reply), Completion(text=reply), Completion(text=reply)]
    attach_tool_calls(requests, completions)
    assert completions[0].text == "" and completions[0].finish_reason == "tool_calls"
    assert completions[0].tool_calls[0]["function"]["name"] == "get_balance"
    assert completions[1].tool_calls is None and completions[2].tool_calls is None  # no tools / tool_choice none


def test_bundled_tool_eval_grader(tmp_path):
    spec = load_eval_spec(BUNDLED)
    assert [t["function"]["name"] for t in spec.tools] == ["get_balance", "block_card", "transfer"]
    item = {"function": "transfer", "arguments": {"amount": 12.5, "to": "Lena"}}

    def call(name, arguments):
        return [{"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]

    with graders.build_grader(spec.graders[0]) as grader:
        samples = [graders.make_sample("", output_tools=call("transfer", {"amount": "12.50", "to": "lena"})),
                   graders.make_sample("", output_tools=call("transfer", {"amount": 12, "to": "Lena"})),
                   graders.make_sample("", output_tools=call("get_balance", {"account": "savings"})),
                   graders.make_sample("I would transfer 12.50 to Lena")]
        grades = grader.grade_batch(samples, [item] * 4)
    assert [g.score for g in grades] == [1.0, 0.5, 0.0, 0.0], [g.error_details for g in grades]
    assert [g.passed for g in grades] == [True, False, False, False]


def test_bundled_tool_eval_runs_end_to_end_on_a_local_model(tmp_path, store, tiny_model_dir):
    result = run_eval(load_eval_spec(BUNDLED, overrides=[f"model=local:{tiny_model_dir}", "sampling.max_tokens=4"]),
                      store, split="test")
    assert result.n_samples == 6 and result.n_errors == 0
    inputs = [json.loads(r[0]) for r in store.db.execute("select input_json from samples")]
    assert all(i[-1]["role"] == "user" for i in inputs)


def test_hermes_rendering_writes_earlier_calls_and_results_back():
    from flywheel.tools import with_tools

    messages = [{"role": "user", "content": "balance?"}, *PLATFORM_ROW["messages"][1:],
                {"role": "tool", "content": "120.50 EUR"}]
    out = with_tools(messages, PLATFORM_ROW["tools"], "auto")
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>{"name": "get_balance", "arguments": {"account": "savings"}}</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n120.50 EUR\n</tool_response>"}
    _, calls = parse_tool_calls(out[2]["content"])
    assert calls[0]["function"] == PLATFORM_ROW["messages"][1]["tool_calls"][0]["function"]


class ScriptedReply:
    """Wraps a real local model (tokenization, tool rendering and call parsing all real); only the
    sampled text is scripted, since a tiny random model never writes a tool call."""

    def __init__(self, model, text):
        self.model, self.text = model, text
        self.prompts: list[str] = []
        model._generate_batch = self._generate_batch

    def _generate_batch(self, rows, sampling, repeats):
        _, tokenizer = self.model.load()
        self.prompts += [tokenizer.decode(r) for r in rows]
        return [Completion(text=self.text, prompt_tokens=len(r), completion_tokens=5) for r in rows]


def test_serve_model_accepts_tools_and_answers_tool_calls(tiny_model_dir):
    import openai

    from flywheel.model_server import create_app

    # The scripted reply replaces the HF-generate path's batch step, so this model decodes with it.
    model = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32", "engine": "hf"})
    scripted = ScriptedReply(model, 'ok <tool_call>{"name": "get_balance", "arguments": {"account": "savings"}}</tool_call>')
    with BackgroundServer(create_app(model, name="tiny")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "balance?"}],
                                               tools=PLATFORM_ROW["tools"], tool_choice="required")
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "balance?"}],
                                                tools=PLATFORM_ROW["tools"], stream=True)
        streamed = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                           tools=PLATFORM_ROW["tools"],
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "ok"
    assert choice.message.tool_calls[0].function.name == "get_balance"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"account": "savings"}
    assert streamed[0][0].function.name == "get_balance"
    assert '"name": "get_balance"' in scripted.prompts[0] and "You must call a function." in scripted.prompts[0]


def test_round_trip_jsonl_spec_request_capture_jsonl(server, tmp_path, store):
    """Tools from a platform JSONL row -> eval spec -> request through the recording proxy ->
    captured -> exported as a platform SFT JSONL row: the definitions arrive unchanged, with the call."""
    from flywheel.proxy.captures import export_sft
    from flywheel.proxy import create_proxy_app
    from flywheel.store import Store

    with BackgroundServer(create_proxy_app(server.url, str(tmp_path / "traffic.db"))) as proxy:
        path = write_spec(tmp_path, "openai:m", PLATFORM_ROW["tools"],
                          model_options={"base_url": proxy.url + "/v1", "max_retries": 0})
        result = run_eval(load_eval_spec(path), store, split="test")
    assert result.pass_rate == 1.0
    traffic = Store.open(tmp_path / "traffic.db")
    try:
        export_sft(traffic, tmp_path / "sft.jsonl")
    finally:
        traffic.close()
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["tools"] == PLATFORM_ROW["tools"] for r in rows)
    assert {r["messages"][-1]["tool_calls"][0]["function"]["name"] for r in rows} == {"get_balance"}


def test_training_rows_render_calls_as_inference_reads_them(tiny_model_dir):
    from transformers import AutoTokenizer

    from flywheel.tools import render_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's template: no tools
    messages = PLATFORM_ROW["messages"]
    full = render_chat(tokenizer, messages, PLATFORM_ROW["tools"])
    prompt = render_chat(tokenizer, messages[:1], PLATFORM_ROW["tools"], add_generation_prompt=True)
    assert full.startswith(prompt) and "<tools>" in prompt  # prefix-consistent: assistant spans are found
    reply = full[len(prompt):].split("<|im_end|>")[0]
    _, calls = parse_tool_calls(reply)
    assert calls[0]["function"] == messages[1]["tool_calls"][0]["function"]
    assert render_chat(tokenizer, messages[:1]) == tokenizer.apply_chat_template(messages[:1], tokenize=False)
