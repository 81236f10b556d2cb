"""Models an API caller may name (flywheel.api.model_access, docs/security.md): the server's
registry only — no URL, no server environment variable, no folder — tried as a hostile key holder
would, against a real server on 127.0.0.1 (and a real recorder standing in for an upstream)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api_helpers import jsonl
from conftest import make_rows, spec_dict
from flywheel.api.access import create_key
from flywheel.api.app import create_api_app
from flywheel.api.model_access import OpenAIProvider, ServerModels, load_server_models
from flywheel.errors import SpecError
from flywheel.store import Store
from flywheel.web import BackgroundServer


def keys(db: str, *specs: tuple[str, str]) -> list[str]:
    store = Store.open(db)
    try:
        return [create_key(store, f"{project}-{role}", project=project, role=role)[0] for project, role in specs]
    finally:
        store.close()


class Upstream:
    """A real HTTP server standing in for an OpenAI-compatible upstream: it records each call's
    Authorization header and answers one chat completion."""

    def __init__(self):
        self.seen: list[str] = []

        async def chat(request: Request) -> JSONResponse:
            self.seen.append(request.headers.get("authorization", ""))
            return JSONResponse({"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "hi"}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def upstream():
    recorder = Upstream()
    with BackgroundServer(recorder.app) as server:
        recorder.url = server.url + "/v1"
        yield recorder


def chat(http: httpx.Client, url: str, key: str, model: str) -> httpx.Response:
    return http.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                     json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})


def test_an_inline_wheel_run_cannot_send_a_server_secret_to_a_url_of_its_choice(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("SERVER_SECRET", "s3cret")
    db = str(tmp_path / "w.db")
    (member,) = keys(db, ("team-a", "member"))
    with BackgroundServer(create_api_app(db, require_key=True, workers=0)) as server, \
            httpx.Client(base_url=server.url + "/v1", timeout=30,
                         headers={"Authorization": f"Bearer {member}"}) as http:
        file_id = http.post("/files", files={"file": ("rows.jsonl", jsonl([{"item": r} for r in make_rows(6)]))},
                            data={"purpose": "evals"}).json()["id"]
        hostile = {**spec_dict("openai:gpt-4o-mini"),
                   "model_options": {"base_url": upstream.url, "api_key_env": "SERVER_SECRET"}}
        for eval_spec, param in (
                (hostile, "eval_spec.model_options.base_url"),
                ({**spec_dict("openai:gpt-4o-mini"), "model_options": {"api_key_env": "SERVER_SECRET"}},
                 "eval_spec.model_options.api_key_env"),
                (spec_dict("openai:gpt-4o-mini"), "eval_spec.model"),  # no provider for it: the server's own key
                ({**spec_dict("local:smollm2"), "graders": [{"type": "score_model", "name": "j", "model": "gpt-4o",
                                                            "input": [{"role": "user", "content": "{{sample.output_text}}"}]}]},
                 "eval_spec.graders[0].model"),
                # a Ray cluster of the caller's choosing would receive the items and the graders' code
                ({**spec_dict("local:smollm2"), "executor": {"kind": "ray", "address": "ray://127.0.0.1:9"}},
                 "eval_spec.executor"),
                # a prompt read from the server's own store
                ({**spec_dict("local:smollm2"), "prompt": {"id": "pmpt_x"}}, "eval_spec.prompt")):
            response = http.post("/flywheel/runs", json={"run_spec": {"stages": [{"stage": "optimize"}]}, "eval_spec": eval_spec,
                                                         "file_id": file_id})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error"
        assert http.get("/flywheel/runs").json()["data"] == []
    assert upstream.seen == []


def test_a_folder_on_the_server_is_no_model_for_a_key(tmp_path, tiny_model_dir):
    db = str(tmp_path / "f.db")
    member, reader = keys(db, ("team-a", "member"), ("team-a", "reader"))
    existing = tmp_path / "team-b-checkpoint"
    existing.mkdir()
    with BackgroundServer(create_api_app(db, require_key=True, workers=0,
                                         models=ServerModels(local_bases=[str(tiny_model_dir)]))) as server, \
            httpx.Client(timeout=60) as http:
        answers = {}
        for model in (f"local:{tiny_model_dir}+{existing}", f"local:{tiny_model_dir}+{tmp_path}/missing",
                      f"local:{existing}", f"local:{tmp_path}/missing", "local:HuggingFaceTB/SmolLM2-360M",
                      "ft:local:someone-else:1", "openai:gpt-4o-mini"):
            response = chat(http, server.url, member, model)
            assert response.status_code == 404, (model, response.text)
            error = response.json()["error"]
            assert error["code"] == "model_not_found" and error["param"] == "model"
            answers[model] = error["message"].replace(repr(model), "MODEL")
        # the same words whether the folder exists or not: the errors draw no map of the server's disk
        assert len(set(answers.values())) == 1, answers
        assert str(tmp_path) not in next(iter(answers.values()))
        # a base the admin offered answers (a reader may not chat: it is a POST)
        assert chat(http, server.url, reader, f"local:{tiny_model_dir}").status_code == 403
        offered = chat(http, server.url, member, f"local:{tiny_model_dir}")
        assert offered.status_code == 200, offered.text


def test_a_members_openai_chat_uses_only_a_provider_an_admin_configured(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "the-servers-own-key")
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    monkeypatch.setenv("TEAM_A_KEY", "team-a-key")
    db = str(tmp_path / "o.db")
    key_a, key_b = keys(db, ("team-a", "member"), ("team-b", "member"))
    models = ServerModels(openai=[OpenAIProvider(base_url=upstream.url, api_key_env="TEAM_A_KEY",
                                                 models=["gpt-4o-mini"], projects=["team-a"])])
    with BackgroundServer(create_api_app(db, require_key=True, workers=0, models=models)) as server, \
            httpx.Client(timeout=30) as http:
        assert chat(http, server.url, key_b, "openai:gpt-4o-mini").status_code == 404  # not offered to team-b
        assert chat(http, server.url, key_a, "openai:gpt-4o").status_code == 404  # not a model offered
        assert upstream.seen == []  # nothing went upstream with the server's own key
        answer = chat(http, server.url, key_a, "openai:gpt-4o-mini")
        assert answer.status_code == 200, answer.text
        assert upstream.seen == ["Bearer team-a-key"]


def test_python_graders_need_a_member_and_judges_go_through_the_registry(tmp_path):
    db = str(tmp_path / "g.db")
    reader, member = keys(db, ("team-a", "reader"), ("team-a", "member"))
    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    judge = {"type": "score_model", "name": "j", "model": "local:/etc",
             "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    check = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "a",
             "operation": "eq"}
    with BackgroundServer(create_api_app(db, require_key=True, workers=0)) as server, httpx.Client(timeout=60) as http:
        def run(key: str, grader: dict) -> httpx.Response:
            return http.post(server.url + "/v1/fine_tuning/alpha/graders/run", headers={"Authorization": f"Bearer {key}"},
                             json={"grader": grader, "model_sample": "a"})

        refused = run(reader, python)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"
        nested = run(reader, {"type": "multi", "name": "m", "graders": {"p": python}, "calculate_output": "p"})
        assert nested.status_code == 403
        assert run(reader, check).status_code == 200
        assert run(member, python).status_code == 200
        assert run(member, python).json()["reward"] == 1.0
        judged = run(member, judge)
        assert judged.status_code == 400 and judged.json()["error"]["param"] == "grader.model"


def test_the_providers_file_is_checked_with_file_and_field(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text("openai:\n  - base_url: http://x/v1\n    api_key: nope\n", encoding="utf-8")
    with pytest.raises(SpecError) as caught:
        load_server_models(path)
    assert str(path) in str(caught.value) and "openai.0" in str(caught.value)
    path.write_text("local_bases: [/srv/m]\nopenai:\n  - {base_url: 'http://x/v1', api_key_env: K}\n",
                    encoding="utf-8")
    loaded = load_server_models(path)
    assert loaded.local_bases == ["/srv/m"] and loaded.openai[0].offers("any", "team-z")


def test_a_members_openai_eval_run_goes_to_the_configured_provider_only(tmp_path, upstream, monkeypatch):
    import time

    from api_helpers import CRITERIA, client_for, create_eval, items

    monkeypatch.setenv("OPENAI_API_KEY", "the-servers-own-key")
    monkeypatch.setenv("TEAM_A_KEY", "team-a-key")
    db = str(tmp_path / "e.db")
    (member,) = keys(db, ("team-a", "member"))
    models = ServerModels(openai=[OpenAIProvider(base_url=upstream.url, api_key_env="TEAM_A_KEY",
                                                 models=["gpt-4o-mini"], projects=["team-a"])])
    with BackgroundServer(create_api_app(db, require_key=True, workers=1, models=models)) as server:
        client = client_for(server.url, member)
        evaluation = create_eval(client, CRITERIA)
        source = {"type": "completions", "model": "openai:gpt-4o-mini",
                  "source": {"type": "file_content", "content": items(2)},
                  "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.text}}"}]}}
        run = client.evals.runs.create(evaluation.id, data_source=source)
        deadline = time.monotonic() + 120
        while run.status in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
            run = client.evals.runs.retrieve(run.id, eval_id=evaluation.id)
        assert run.status == "completed", run
        # the URL and key variable stay on the server: the run object shows neither
        assert "TEAM_A_KEY" not in run.model_dump_json() and upstream.url not in run.model_dump_json()
    assert upstream.seen and set(upstream.seen) == {"Bearer team-a-key"}
