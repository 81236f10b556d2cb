"""Hosted fine-tuning through the real openai SDK against a real HTTP server on 127.0.0.1.

The platform's fine-tuning API cannot be reached from here (no network, and it is closing to new
users). So the server below REPLAYS RECORDED RESPONSES (fixtures/hosted_finetuning/, assembled from
the platform's documented examples, see its README): these tests check the requests we build (the
multipart upload, the job body with the grader config passed as is) and how we parse what comes
back (job states, paged events, failures). They cannot show that the live service accepts them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from train_helpers import tiny_eval

from flywheel.distill import capture
from flywheel.errors import ModelError
from flywheel.web import BackgroundServer
from flywheel.train import SFTSpec, TrainingDataError, TrainingError, build_dpo_set, build_rft_set, build_sft_set
from flywheel.train.config import DPOSpec, RFTSpec
from flywheel.train.methods import load_train_config
from flywheel.train.hosted import HostedBackend, HostedJob, job_request, train_hosted

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "hosted_finetuning"


class ReplayServer:
    """Serves one recorded scenario; keeps every request it received."""

    def __init__(self, scenario: str, answers: dict | None = None):
        self.scenario = json.loads((RECORDED / scenario).read_text())
        self.answers = answers or {}
        self.requests: list[dict] = []
        self.uploads: list[dict] = []
        self.polls = 0
        self.job: dict = {}
        self.app = Starlette(routes=[
            Route("/v1/files", self.files, methods=["POST"]),
            Route("/v1/fine_tuning/jobs", self.create, methods=["POST"]),
            Route("/v1/fine_tuning/jobs/{job_id}", self.retrieve, methods=["GET"]),
            Route("/v1/fine_tuning/jobs/{job_id}/events", self.events, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])

    async def files(self, request: Request) -> JSONResponse:
        form = await request.form()
        upload = form["file"]
        content = await upload.read()
        self.uploads.append({"purpose": form["purpose"], "filename": upload.filename, "content": content.decode()})
        return JSONResponse({**self.scenario["file"], "bytes": len(content), "filename": upload.filename})

    async def create(self, request: Request) -> JSONResponse:
        self.requests.append(json.loads(await request.body()))
        self.job = copy.deepcopy(self.scenario["created"])
        return JSONResponse(self.job)

    def _revealed(self) -> list[dict]:
        return [e for poll in self.scenario["polls"][:self.polls] for e in poll["events"]]

    async def retrieve(self, request: Request) -> JSONResponse:
        index = min(self.polls, len(self.scenario["polls"]) - 1)
        self.job.update(self.scenario["polls"][index]["job"])
        self.polls = min(self.polls + 1, len(self.scenario["polls"]))
        return JSONResponse(self.job)

    async def events(self, request: Request) -> JSONResponse:
        newest_first = list(reversed(self._revealed()))
        after = request.query_params.get("after")
        if after:
            newest_first = newest_first[[e["id"] for e in newest_first].index(after) + 1:]
        limit = int(request.query_params.get("limit", 20))
        return JSONResponse({"object": "list", "data": newest_first[:limit], "has_more": len(newest_first) > limit})

    async def chat(self, request: Request) -> JSONResponse:
        # Not recorded: the fine-tuned model (and its base) answering eval items, scripted per model.
        body = json.loads(await request.body())
        answer = self.answers.get(body["model"], lambda question: "no idea")(body["messages"][-1]["content"])
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": answer}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})


@pytest.fixture
def spec(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    capture(spec, store, "reference:label")
    return spec


def _serve(scenario: str, monkeypatch, **kwargs):
    monkeypatch.setenv("FLYWHEEL_TEST_KEY", "sk-test")
    replay = ReplayServer(scenario, **kwargs)
    server = BackgroundServer(replay.app).start()
    replay.url = server.url + "/v1"
    replay.server = server
    return replay


def _options(replay) -> dict:
    return {"base_url": replay.url, "api_key_env": "FLYWHEEL_TEST_KEY", "poll_interval": 0, "max_retries": 0}


def test_sft_job_uploads_creates_polls_and_registers_the_model(spec, store, monkeypatch):
    replay = _serve("sft_succeeded.json", monkeypatch,
                    answers={"ft:gpt-4.1-mini-2025-04-14:flywheel:tiny:B7xQ2kLm":
                             lambda question: question.split(" about ")[-1].replace(" ", "_")})
    try:
        config = load_train_config("sft", overrides=["epochs=2"])
        training_set = build_sft_set(spec, store)
        result = train_hosted("sft", spec, store, training_set, base="openai:gpt-4.1-mini-2025-04-14",
                              config=config, splits=("valid",), suffix="tiny", seed=42, **_options(replay))
    finally:
        replay.server.stop()
    [upload] = replay.uploads
    assert upload["purpose"] == "fine-tune" and upload["filename"].startswith("ts-sft-")
    assert [json.loads(line) for line in upload["content"].splitlines()] == training_set.rows
    [body] = replay.requests
    assert body["model"] == "gpt-4.1-mini-2025-04-14" and body["training_file"] == "file-Hf2xV9cR1mTq8ZpLw3YbN6"
    # Only what the user set is sent; the rest stays the platform's "auto".
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    assert body["suffix"] == "tiny" and body["seed"] == 42 and body["metadata"]["flywheel_eval"] == "tiny"
    ckpt = result.checkpoint
    assert ckpt.backend == "hosted" and ckpt.path is None
    assert ckpt.model_ref == "openai:ft:gpt-4.1-mini-2025-04-14:flywheel:tiny:B7xQ2kLm"
    assert ckpt.metrics["trained_tokens"] == 1840 and ckpt.metrics["steps"] == 4
    assert (ckpt.metrics["first_loss"], ckpt.metrics["last_loss"]) == (1.9213, 0.0311)
    assert ckpt.metrics["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    job = store.db.execute("select status, remote_id from training_jobs where id = ?", [result.job_id]).fetchone()
    assert job == ("succeeded", "ftjob-Qm3kT8vWz1XyR5nB2cL7dF4g")
    logged = store.training_events(result.job_id)
    remote = [e["remote_id"] for e in logged if e["remote_id"]]
    assert remote == [f"ftevent-aQ{i}" for i in range(1, 10)]  # each event once, oldest first
    # The fine-tuned model is evaluated like any other, paired with its base.
    [valid] = result.evals
    # 4 of 4 fixed: McNemar's exact p = 0.125, so on 4 items the pass-rate objective's test cannot promote
    # (the decision names the test that made it; it is not taken by another statistic).
    assert valid.score == 1.0 and valid.parent_score == 0.0 and valid.decision == "rejected"
    assert "McNemar exact p=0.125" in store.get_iteration(valid.iteration_id).reason


def test_events_are_paged_with_after(spec, store, monkeypatch):
    replay = _serve("sft_succeeded.json", monkeypatch)
    try:
        backend = HostedBackend(base_url=replay.url, api_key_env="FLYWHEEL_TEST_KEY", max_retries=0)
        backend.create_job({"model": "m", "training_file": "f"})
        for _ in range(4):
            backend.retrieve("ftjob-Qm3kT8vWz1XyR5nB2cL7dF4g")
        seen = {"ftevent-aQ1"}
        page_size_two = backend.client.fine_tuning.jobs.list_events("ftjob-Qm3kT8vWz1XyR5nB2cL7dF4g", limit=2)
        assert page_size_two.has_more
        fresh = backend.new_events("ftjob-Qm3kT8vWz1XyR5nB2cL7dF4g", seen)
    finally:
        replay.server.stop()
    assert [e["id"] for e in fresh] == [f"ftevent-aQ{i}" for i in range(2, 10)]


def test_rft_sends_the_spec_grader_as_written(spec, store, monkeypatch):
    replay = _serve("rft_succeeded.json", monkeypatch)
    try:
        result = train_hosted("rft", spec, store, build_rft_set(spec), base="openai:o4-mini-2025-04-16",
                              config=RFTSpec(), evaluate=False,
                              hyperparameters={"reasoning_effort": "medium"}, **_options(replay))
    finally:
        replay.server.stop()
    [body] = replay.requests
    assert body["method"]["type"] == "reinforcement"
    assert body["method"]["reinforcement"]["grader"] == spec.graders[0]
    assert body["method"]["reinforcement"]["hyperparameters"] == {"reasoning_effort": "medium"}
    rows = [json.loads(line) for line in replay.uploads[0]["content"].splitlines()]
    assert set(rows[0]) == {"messages", "id", "text", "label", "split"}  # item fields for {{item.x}}
    assert result.metrics["first_reward"] == 0.42 and result.metrics["last_reward"] == 0.68
    assert result.checkpoint.model_ref == "openai:ft:o4-mini-2025-04-16:flywheel:tiny-rft:Zq9w"


def test_a_failed_job_is_a_clear_error_and_registers_nothing(spec, store, monkeypatch):
    capture(spec, store, spec.model, n=2, temperature=1.0)
    replay = _serve("dpo_failed.json", monkeypatch)
    try:
        with pytest.raises(TrainingError, match=r"ftjob-Dp9nB2cL7dF4gQm3 failed: invalid_training_file: .*at least "
                                                r"10 lines.*\(param training_file\)"):
            train_hosted("dpo", spec, store, build_dpo_set(spec, store), base="openai:gpt-4.1-mini-2025-04-14",
                         config=DPOSpec(beta=0.2), **_options(replay))
    finally:
        replay.server.stop()
    assert replay.requests[0]["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    dpo_rows = [json.loads(line) for line in replay.uploads[0]["content"].splitlines()]
    assert set(dpo_rows[0]) == {"input", "preferred_output", "non_preferred_output"}
    assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 0
    status, error = store.db.execute("select status, error from training_jobs").fetchone()
    assert status == "failed" and "invalid_training_file" in error
    assert any(e["level"] == "error" for e in store.db.query("select level from training_events"))


def test_no_wait_returns_the_created_job(spec, store, monkeypatch):
    replay = _serve("sft_succeeded.json", monkeypatch)
    try:
        job = train_hosted("sft", spec, store, build_sft_set(spec, store), base="openai:gpt-4.1-mini-2025-04-14",
                           config=SFTSpec(), wait=False, **_options(replay))
    finally:
        replay.server.stop()
    assert isinstance(job, HostedJob) and job.status == "validating_files" and replay.polls == 0


def test_request_building_refuses_what_the_platform_would(spec, store, tmp_path, tiny_model_dir, monkeypatch):
    label_model = {"type": "label_model", "name": "judge", "model": "gpt-4o-mini", "labels": ["ok", "bad"],
                   "passing_labels": ["ok"], "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    judged = tiny_eval(tmp_path / "judged", tiny_model_dir, graders=[label_model])
    rft = build_rft_set(spec)
    with pytest.raises(TrainingDataError, match="grader 'judge' is label_model; reinforcement fine-tuning accepts"):
        job_request("rft", judged, rft, "o4-mini", RFTSpec(), training_file="file-1")
    with pytest.raises(TrainingDataError, match="epochs must be a whole number"):
        job_request("sft", spec, rft, "m", SFTSpec(epochs=1.5), training_file="file-1")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ModelError, match=r"set \$NO_SUCH_KEY"):
        train_hosted("sft", spec, store, build_sft_set(spec, store), base="openai:m", config=SFTSpec(),
                     api_key_env="NO_SUCH_KEY")
    with pytest.raises(ModelError, match="hosted options: unknown colour; known: base_url"):
        train_hosted("sft", spec, store, build_sft_set(spec, store), base="openai:m", config=SFTSpec(), colour=1)
