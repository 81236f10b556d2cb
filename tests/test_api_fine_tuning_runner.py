"""What fine-tuning jobs run, with the real openai SDK against the real server on 127.0.0.1: the
validation file's loss in events and checkpoint metrics, a reinforcement (RFT) job rewarded by its
grader, and pause / resume (a running job saves its adapter at the pause and continues from it)."""

from __future__ import annotations

import json
import math
import signal
import time

import httpx
import openai
import pytest

from api_helpers import client_for, jsonl
from flywheel.api.app import create_api_app
from flywheel.api.runners.fine_tuning import job_train_config, schedule, train_config
from flywheel.train.config import SFTSpec
from flywheel.web import BackgroundServer

ROWS = [{"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": ["card_arrival", "pin_blocked"][i % 2]}]} for i in range(8)]
PROMPTS = [{"messages": [{"role": "user", "content": f"question {i}"}], "answer": "card"} for i in range(4)]
GRADER = {"type": "string_check", "name": "says_card", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "like"}


@pytest.fixture
def server(tmp_path):
    with BackgroundServer(create_api_app(str(tmp_path / "flywheel.db"))) as running:
        yield running


def wait_job(client, job_id, states=("succeeded", "failed", "cancelled"), timeout=600.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.1)


def metric_events(client, job_id):
    return [e for e in client.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"]


def start_a_long_job(client, tiny_model_dir):
    """A supervised job of 10 epochs at batch 1, once it has reported its first training metrics."""
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 1}}})
    deadline = time.monotonic() + 300
    while not metric_events(client, job.id):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_hyperparameters_map_onto_our_configs():
    def row(method):
        import json

        return {"method_json": json.dumps(method), "seed": 5}

    sft = train_config(row({"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 2}}}))
    assert (sft.epochs, sft.batch_size, sft.learning_rate, sft.seed) == (3.0, 8, 1e-3, 5)
    rft = train_config(row({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
        "n_epochs": "auto", "batch_size": 2, "compute_multiplier": 2, "reasoning_effort": "low"}}}))
    assert (type(rft).__name__, rft.batch_size, rft.num_generations, rft.epochs) == ("RFTSpec", 2, 8, 1.0)
    dpo = train_config(row({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}))
    assert (type(dpo).__name__, dpo.beta) == ("DPOSpec", 0.3)


def test_jobs_save_and_validate_about_every_tenth_of_their_steps():
    def row(method):
        return {"method_json": json.dumps(method), "seed": 0}

    sft = row({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}})
    config = job_train_config(sft, rows=100, validation_path="valid.jsonl")  # 13 steps an epoch, 26 in all
    assert (config.save_steps, config.eval_steps, config.validation_file, config.keep) == (2, 2, "valid.jsonl", "all")
    assert job_train_config(sft, rows=3).save_steps == 1 and job_train_config(sft, rows=3).eval_steps is None
    assert schedule(SFTSpec(epochs=3, batch_size=4), 1000) == 75  # 750 steps
    assert train_config(sft).save_steps is None  # what `flywheel import openai-job --config-out` writes
    rft = row({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "eval_interval": 5}}})
    config = job_train_config(rft, rows=40, validation_path="valid.jsonl")
    assert (config.save_steps, config.eval_steps) == (5, None)  # GRPO has no validation loss


@pytest.mark.slow
def test_validation_loss_is_reported_in_events_and_checkpoint_metrics(server, tiny_model_dir):
    client = client_for(server.url)
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", jsonl(ROWS[:4])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=f"local:{tiny_model_dir}", training_file=training.id, validation_file=validation.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 40}}})
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    events = metric_events(client, job.id)
    valid = sorted((e for e in events if "valid_loss" in e.data), key=lambda e: e.data["step"])
    # 8 steps: the validation file's loss every ~10% of them (at least every step), and at the last
    assert [e.data["step"] for e in valid] == list(range(1, 9))
    assert all(e.data["total_steps"] == 8 and "valid_loss=" in e.message for e in valid)
    assert [e.data["step"] for e in valid if "full_valid_loss" in e.data] == [8]
    first_train_loss = min((e for e in events if "loss" in e.data), key=lambda e: e.data["step"]).data["loss"]
    losses = [e.data["valid_loss"] for e in valid]
    # rows it trained on: the tuned adapter's loss falls well under the untrained first step's
    assert all(math.isfinite(x) for x in losses) and 0 < losses[-1] < min(losses[0], first_train_loss)
    assert valid[-1].data["full_valid_loss"] == losses[-1]
    # every step was a checkpoint; the last three are kept and listed, newest first
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 7, 6]
    assert all(c.id.startswith("ftckpt_") and c.fine_tuning_job_id == job.id for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-8"
    assert checkpoints[0].metrics.valid_loss == pytest.approx(losses[-1])
    assert checkpoints[0].metrics.full_valid_loss == pytest.approx(losses[-1])
    assert checkpoints[1].metrics.valid_loss == pytest.approx(losses[-2])
    assert checkpoints[1].metrics.full_valid_loss is None
    # the platform's checkpoint object (reference §5.7, §5.8), field by field
    raw = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/checkpoints").json()
    assert raw["object"] == "list" and raw["has_more"] is False
    assert set(raw["data"][0]) == {"object", "id", "created_at", "fine_tuned_model_checkpoint",
                                   "fine_tuning_job_id", "step_number", "metrics"}
    assert raw["data"][0]["object"] == "fine_tuning.job.checkpoint" and isinstance(raw["data"][0]["created_at"], int)
    assert set(raw["data"][0]["metrics"]) == {"step", "train_loss", "valid_loss", "full_valid_loss"}
    assert set(raw["data"][1]["metrics"]) == {"step", "train_loss", "valid_loss"}
    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1, after=checkpoints[0].id)
    assert [c.step_number for c in page.data] == [7] and page.has_more
    # a listed step checkpoint is a model the server answers with; a pruned one is not
    reply = client.chat.completions.create(model=checkpoints[2].fine_tuned_model_checkpoint, max_tokens=2,
                                           messages=[{"role": "user", "content": "question 0"}])
    assert reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{done.fine_tuned_model}:ckpt-step-2", max_tokens=2,
                                       messages=[{"role": "user", "content": "question 0"}])


@pytest.mark.slow
def test_a_reinforcement_job_trains_on_its_grader(server, tiny_model_dir):
    client = client_for(server.url)
    prompts = client.files.create(file=("rft.jsonl", jsonl(PROMPTS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=f"local:{tiny_model_dir}", training_file=prompts.id, validation_file=prompts.id, suffix="rft",
        method={"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "reasoning_effort": "low"}}})
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    events = metric_events(client, job.id)
    train_steps = [e for e in events if "reward" in e.data]
    assert train_steps and train_steps[0].data["total_steps"] == 2  # 4 prompts / 2 per step
    assert any(f"rewards/{GRADER['name']}" in key for e in train_steps for key in e.data)
    # the platform's RFT metric event fields (fixtures/hosted_finetuning/rft_succeeded.json)
    shaped = train_steps[0].data
    assert shaped["train_mean_reward"] == shaped["reward"] == shaped["scores"]["train_reward_mean"]
    assert shaped["scores"]["graders"][0]["name"] == GRADER["name"]
    assert shaped["scores"]["graders"][0]["type"] == "string_check"
    valid = [e for e in events if "full_valid_mean_reward" in e.data]
    assert len(valid) == 1 and 0.0 <= valid[0].data["full_valid_mean_reward"] <= 1.0
    assert valid[0].data["scores"]["valid_reward_mean"] == valid[0].data["full_valid_mean_reward"]
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                           messages=[{"role": "user", "content": "question 0"}])
    assert reply.model == done.fine_tuned_model and ":rft:" in done.fine_tuned_model


def test_pause_and_resume_a_queued_job_and_cancel_a_paused_one(tmp_path, tiny_model_dir):
    with BackgroundServer(create_api_app(str(tmp_path / "q.db"), workers=0)) as running:
        client = client_for(running.url)
        training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id)
        with httpx.Client(base_url=running.url + "/v1") as http:
            paused = http.post(f"/fine_tuning/jobs/{job.id}/pause")
            assert paused.status_code == 200 and paused.json()["status"] == "paused"
            again = http.post(f"/fine_tuning/jobs/{job.id}/pause")
            assert again.status_code == 400 and again.json()["error"]["param"] == "fine_tuning_job_id"
            resumed = http.post(f"/fine_tuning/jobs/{job.id}/resume")
            assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
            assert http.post(f"/fine_tuning/jobs/{job.id}/resume").status_code == 400  # not paused
            assert http.post(f"/fine_tuning/jobs/{job.id}/pause").json()["status"] == "paused"
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
        assert messages[0] == "The job was cancelled." and "The job was resumed and is queued." in messages
        missing = httpx.post(running.url + "/v1/fine_tuning/jobs/ftjob-nope/pause")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_a_running_job_paused_saves_its_adapter_and_resume_continues_from_it(server, tiny_model_dir):
    client = client_for(server.url)
    job = start_a_long_job(client, tiny_model_dir)
    with httpx.Client(base_url=server.url + "/v1") as http:
        assert http.post(f"/fine_tuning/jobs/{job.id}/pause").status_code == 200
        paused = wait_job(client, job.id, states=("paused", "succeeded", "failed"))
        assert paused.status == "paused", paused.error
        pause_event = next(e for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
                           if e.message.startswith("The job was paused at step"))
        step = int(pause_event.message.split("step ")[1].split("/")[0])
        assert 0 < step < 80
        time.sleep(0.5)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"  # nothing runs while paused
        assert http.post(f"/fine_tuning/jobs/{job.id}/resume").json()["status"] in ("queued", "running")
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert f"Fine-tuning job resumed from step {step}." in messages
    steps = [e.data["step"] for e in metric_events(client, job.id) if "loss" in e.data]
    assert max(steps) == 80 and all(e.data["total_steps"] == 80 for e in metric_events(client, job.id))
    after = sorted(s for s in steps if s > step)
    assert after[0] == step + 1 and len(after) == 80 - step  # the remaining steps, each once
    # the trainer's own state was restored: the linear schedule goes on falling across the pause
    # (a fresh optimiser and schedule would jump back to the peak learning rate)
    rates = [e.data["learning_rate"] for e in sorted(metric_events(client, job.id), key=lambda e: e.data["step"])
             if "learning_rate" in e.data]
    assert len(rates) == 80 and all(a > b for a, b in zip(rates, rates[1:]))


@pytest.mark.slow
def test_a_job_killed_with_the_server_resumes_from_its_last_saved_step(tmp_path, tiny_model_dir):
    from flywheel.store import Store
    from flywheel.train.validation import last_saved_step
    from test_api_jobs import start_server, wait_for

    db = tmp_path / "flywheel.db"
    rows = ROWS * 2  # 16 rows x 20 epochs, one per step: 320 steps, a checkpoint every 32
    proc, url = start_server(db)
    try:
        client = client_for(url)
        training = client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 1}}})
        # killed once a step checkpoint is listed, well before the end
        wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = Store.open(db)
    try:
        row = store.api_get("api_fine_tuning_jobs", job.id)
        # as the dead server left it
        assert store.fine_tuning_status(job.id) == "running" and row["fine_tuned_model"] is None
        training_job = store.get_training_job(row["training_job_id"])
        saved, _ = last_saved_step(training_job["output_dir"])
        logged = [json.loads(r["data_json"]) for r in store.training_events(training_job["id"])
                  if r["type"] == "metrics"]
        killed_at = max(d["step"] for d in logged)
    finally:
        store.close()
    assert 32 <= saved <= killed_at < 320

    proc, url = start_server(db)
    try:
        client = client_for(url)
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]  # oldest first
        messages = [e.message for e in events]
        assert "Job resumed after a server restart." in messages
        resumed = messages.index(f"Fine-tuning job resumed from step {saved}.")
        trained_after = [e.data["step"] for e in events[resumed:] if e.type == "metrics" and "loss" in e.data]
        # after the restart only the steps after the last saved one were trained, each once
        assert trained_after == list(range(saved + 1, 321))
        assert len(trained_after) < 320
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [320, 288, 256]
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                               messages=[{"role": "user", "content": "question 0"}])
        assert reply.model == done.fine_tuned_model
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    store = Store.open(db)
    try:
        training_job = store.get_training_job(store.api_get("api_fine_tuning_jobs", job.id)["training_job_id"])
        assert training_job["status"] == "succeeded"
        resumes = [r for r in store.training_events(training_job["id"]) if r["type"] == "resume"]
        assert [json.loads(r["data_json"])["from_step"] for r in resumes] == [saved]
        final = store.get_checkpoint(store.api_get("api_fine_tuning_jobs", job.id)["checkpoint_id"])
        assert json.loads(final["metrics_json"])["resumed_from_step"] == saved
    finally:
        store.close()


@pytest.mark.slow
def test_a_server_stopped_mid_job_saves_the_step_and_resumes_there(tmp_path, tiny_model_dir):
    db = str(tmp_path / "flywheel.db")
    with BackgroundServer(create_api_app(db)) as running:
        client = client_for(running.url)
        job = start_a_long_job(client, tiny_model_dir)
    # the stop (Ctrl-C) saved the step it was at, between the periodic checkpoints (every 8)
    with BackgroundServer(create_api_app(db)) as running:
        client = client_for(running.url)
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]
        messages = [e.message for e in events]
        resumed = next(m for m in messages if m.startswith("Fine-tuning job resumed from step "))
        step = int(resumed.split("step ")[1].rstrip("."))
        before = [e.data["step"] for e in events[:messages.index(resumed)] if e.type == "metrics" and "loss" in e.data]
        after = [e.data["step"] for e in events[messages.index(resumed):] if e.type == "metrics" and "loss" in e.data]
        assert step == max(before) and after == list(range(step + 1, 81))



def training_job_status(db, job_id: str) -> str | None:
    """The status of the training job a fine-tuning job trains in (None before it has one)."""
    from flywheel.store import Store

    store = Store.open(db)
    try:
        training_job_id = store.api_get("api_fine_tuning_jobs", job_id)["training_job_id"]
        return store.get_training_job(training_job_id)["status"] if training_job_id else None
    finally:
        store.close()


def test_a_job_whose_training_fails_reads_failed_as_its_training_job_does(tmp_path):
    db = str(tmp_path / "flywheel.db")
    with BackgroundServer(create_api_app(db)) as running:
        client = client_for(running.url)
        training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
        # a base folder that is not there: the training job exists, then loading the model fails
        job = client.fine_tuning.jobs.create(model=f"local:{tmp_path / 'no-model'}", training_file=training.id)
        done = wait_job(client, job.id, timeout=120)
        assert done.status == "failed" and "no-model" in done.error.message
        assert training_job_status(db, job.id) == "failed"


@pytest.mark.slow
def test_the_api_status_is_the_training_jobs_at_every_stage(tmp_path, tiny_model_dir):
    """running, paused, queued (a server stopped mid-job), cancelled, succeeded: what the API shows
    is what the job's training job says."""
    db = str(tmp_path / "flywheel.db")
    with BackgroundServer(create_api_app(db)) as running:
        client = client_for(running.url)
        job = start_a_long_job(client, tiny_model_dir)
        assert (client.fine_tuning.jobs.retrieve(job.id).status, training_job_status(db, job.id)) == ("running",) * 2
        with httpx.Client(base_url=running.url + "/v1") as http:
            assert http.post(f"/fine_tuning/jobs/{job.id}/pause").status_code == 200
            paused = wait_job(client, job.id, states=("paused", "succeeded", "failed"))
            assert (paused.status, training_job_status(db, job.id)) == ("paused", "paused")
            assert http.post(f"/fine_tuning/jobs/{job.id}/resume").status_code == 200
        wait_for_metrics = len(metric_events(client, job.id))
        deadline = time.monotonic() + 300
        while len(metric_events(client, job.id)) <= wait_for_metrics:  # training again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (client.fine_tuning.jobs.retrieve(job.id).status, training_job_status(db, job.id)) == ("running",) * 2
    # the server stopped mid-job: it waits in the queue; a server without workers shows it there
    with BackgroundServer(create_api_app(db, workers=0)) as running:
        client = client_for(running.url)
        assert (client.fine_tuning.jobs.retrieve(job.id).status, training_job_status(db, job.id)) == ("queued",) * 2
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert training_job_status(db, job.id) == "cancelled"
        second = client.fine_tuning.jobs.create(
            model=f"local:{tiny_model_dir}", training_file=job.training_file,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
        assert second.status == "queued" and training_job_status(db, second.id) is None  # the queue row's, until one
    with BackgroundServer(create_api_app(db)) as running:
        client = client_for(running.url)
        done = wait_job(client, second.id)
        assert (done.status, training_job_status(db, second.id)) == ("succeeded", "succeeded")
        assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"  # cancelled stays so
