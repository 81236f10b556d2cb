"""`openai:` judges get structured outputs: an enum of the labels, a number bounded by the range.

The server is a small real Starlette app on 127.0.0.1 that plays a strict structured-output
server: it rejects (HTTP 400) a request whose json_schema is not the expected shape, and answers
with JSON that follows the schema it was sent. The real openai SDK talks to it.
"""

from __future__ import annotations

import json

import pytest
from serving_helpers import completion_body
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import graders
from graders.judge import score_response_format
from flywheel.models import load_model
from flywheel.web import BackgroundServer


class StructuredServer:
    """Answers a json_schema request with a reply the schema allows; 400 for any other request."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    @staticmethod
    def problem(body: dict) -> str | None:
        fmt = body.get("response_format") or {}
        if fmt.get("type") != "json_schema":
            return "response_format.type must be json_schema"
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") or {}
        if spec.get("strict") is not True or not spec.get("name"):
            return "json_schema needs a name and strict: true"
        if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
            return "schema must be a closed object"
        result = schema.get("properties", {}).get("result")
        if "result" not in schema.get("required", []) or not result:
            return "schema must require 'result'"
        if result.get("type") == "string" and not result.get("enum"):
            return "a string result needs an enum"
        if result.get("type") == "number" and not {"minimum", "maximum"} <= set(result):
            return "a number result needs minimum and maximum"
        return None

    async def chat(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.bodies.append(body)
        problem = self.problem(body)
        if problem:
            return JSONResponse({"error": {"message": problem, "type": "invalid_request_error"}}, status_code=400)
        result = body["response_format"]["json_schema"]["schema"]["properties"]["result"]
        text = body["messages"][-1]["content"]
        happy = "love" in text
        if result["type"] == "string":
            reply = {"result": result["enum"][0 if happy else -1]}
        else:
            reply = {"steps": [{"description": "read it", "conclusion": "happy" if happy else "unhappy"}],
                     "result": result["maximum"] if happy else result["minimum"]}
        return JSONResponse(completion_body(json.dumps(reply), model=body["model"]))


@pytest.fixture
def server():
    upstream = StructuredServer()
    with BackgroundServer(upstream.app) as running:
        upstream.url = running.url + "/v1"
        yield upstream


def openai_judge(url):
    return load_model("openai:judge", {"base_url": url, "max_retries": 0})


def test_label_model_sends_an_enum_of_its_labels(server):
    cfg = {"type": "label_model", "name": "sentiment", "model": "judge",
           "input": [{"role": "user", "content": "{{sample.output_text}}"}],
           "labels": ["positive", "negative"], "passing_labels": ["positive"]}
    judge = openai_judge(server.url)
    try:
        grades = graders.build_grader(cfg, judge=judge).grade_batch(["I love it", "I hate it"], [{}, {}])
    finally:
        judge.close()
    assert [g.details.get("label") for g in grades] == ["positive", "negative"], [g.error_details for g in grades]
    schema = server.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["result"] == {"type": "string", "enum": ["positive", "negative"]}
    assert "constrained" not in grades[0].details  # a remote judge writes; the server constrains it


def test_score_model_sends_its_range_as_bounds(server):
    cfg = {"type": "score_model", "name": "happy", "model": "judge", "range": [1, 7], "pass_threshold": 4,
           "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    judge = openai_judge(server.url)
    try:
        grades = graders.build_grader(cfg, judge=judge).grade_batch(["I love it", "I hate it"], [{}, {}])
    finally:
        judge.close()
    assert [(g.score, g.passed) for g in grades] == [(7.0, True), (1.0, False)], [g.error_details for g in grades]
    result = server.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["result"]
    assert result == {"type": "number", "minimum": 1, "maximum": 7}
    assert grades[0].details["steps"][0]["conclusion"] == "happy"


def test_the_server_refuses_a_request_without_bounds(server):
    """The checking server is real: a schema without bounds is refused, and the grade records why."""

    class Unbounded:
        def __init__(self, model):
            self.model = model

        def chat(self, conversations, **kwargs):
            kwargs["response_format"] = score_response_format()  # no low/high: no bounds
            return self.model.chat(conversations, **kwargs)

    cfg = {"type": "score_model", "name": "happy", "model": "judge", "range": [1, 7],
           "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    judge = openai_judge(server.url)
    try:
        grade = graders.build_grader(cfg, judge=Unbounded(judge)).grade("I love it", {})
    finally:
        judge.close()
    assert grade.error == "model_grader_server_error"
    assert "a number result needs minimum and maximum" in grade.error_details
