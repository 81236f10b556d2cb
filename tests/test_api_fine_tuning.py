"""Fine-tuning over the API with the real openai SDK: a supervised job on a tiny real Llama, its
events (paged with `after`), its checkpoint, and a chat with the resulting `ft:` model id."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from api_helpers import client_for, completions_source, create_eval, items, jsonl, wait_run
from flywheel.api.app import create_api_app
from flywheel.store import Store
from flywheel.web import BackgroundServer

GRADER = {"type": "string_check", "name": "says_card", "input": "{{sample.output_text}}",
          "reference": "card", "operation": "like"}
ROWS = [{"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": ["card_arrival", "pin_blocked"][i % 2]}]} for i in range(8)]


@pytest.fixture
def server(tmp_path):
    with BackgroundServer(create_api_app(str(tmp_path / "flywheel.db"))) as running:
        yield running


def wait_job(client, job_id, timeout=600.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.2)


@pytest.mark.slow
def test_supervised_job_events_and_chat_with_the_tuned_model(server, tiny_model_dir):
    client = client_for(server.url)
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=f"local:{tiny_model_dir}", training_file=training.id, suffix="intents", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        metadata={"team": "a"})
    assert (job.object, job.status, job.metadata, job.seed) == ("fine_tuning.job", "queued", {"team": "a"}, 3)
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:") and ":intents:" in done.fine_tuned_model
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # the SDK follows `after`
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed."  # newest first
    assert messages[-1].startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].data["total_steps"] == 2
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    second = client.fine_tuning.jobs.list_events(job.id, limit=2, after=first_page.data[-1].id)
    assert [e.id for e in second.data] == [e.id for e in events[2:4]]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    # 2 steps, a checkpoint at each (about every 10% of the steps, at least every step), newest first
    assert [c.step_number for c in checkpoints] == [2, 1] and checkpoints[0].fine_tuning_job_id == job.id

    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=3,
                                           messages=[{"role": "user", "content": "question 1"}])
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:nothing:here:0", messages=[{"role": "user", "content": "x"}])

    # an eval run on the tuned model by its ft: id, as a platform script would do next
    evaluation = create_eval(client)
    source = {"type": "file_content", "content": items(3)}
    run = client.evals.runs.create(evaluation.id, data_source={
        **completions_source(tiny_model_dir, source), "model": done.fine_tuned_model})
    run = wait_run(client, evaluation.id, run.id)
    assert run.status == "completed" and run.result_counts.total == 3, run.error
    assert run.model == done.fine_tuned_model and run.per_model_usage[0].model_name == done.fine_tuned_model
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.evals.runs.create(evaluation.id, data_source={
            **completions_source(tiny_model_dir, source), "model": "ft:nothing:here:0"})
    assert excinfo.value.body["param"] == "data_source.model"


def test_job_requests_are_checked(server, tiny_model_dir):
    client = client_for(server.url)
    evals_file = client.files.create(file=("items.jsonl", jsonl([{"item": {"a": 1}}])), purpose="evals")
    rft = client.files.create(file=("rft.jsonl", jsonl([{"messages": [{"role": "user", "content": "q"}],
                                                          "answer": "a"}])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id)
    assert excinfo.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file="file-nope")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=evals_file.id,
                                       method={"type": "distillation"})
    assert excinfo.value.body["param"] == "method.type"
    with pytest.raises(openai.BadRequestError) as excinfo:  # RFT needs its grader
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id,
                                       method={"type": "reinforcement"})
    assert excinfo.value.body["param"] == "method.reinforcement.grader"
    with pytest.raises(openai.BadRequestError, match="label_model graders cannot be RFT rewards") as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {
                "type": "label_model", "name": "l", "model": "local:smollm2", "input": [], "labels": ["a"],
                "passing_labels": ["a"]}}})
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {"type": "string_check", "name": "x"}}})
    assert excinfo.value.body["param"] == "method.reinforcement.grader"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id, method={
            "type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"reasoning_effort": "max"}}})
    assert excinfo.value.body["param"] == "method.reinforcement.hyperparameters.reasoning_effort"
    with pytest.raises(openai.BadRequestError) as excinfo:  # chat examples are not preference pairs
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=rft.id, method={"type": "dpo"})
    assert excinfo.value.body["param"] == "training_file"
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}})
    assert excinfo.value.body["param"] == "method.supervised.hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model="nonsense", training_file=training.id)
    assert excinfo.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as excinfo:  # validation rows in the method's format too
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id,
                                       validation_file=rft.id)
    assert excinfo.value.body["param"] == "validation_file"
    with pytest.raises(openai.BadRequestError, match=r"seed must be between 0 and 4294967295") as excinfo:
        client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, seed=10**30)
    assert excinfo.value.body["param"] == "seed"
    assert list(client.fine_tuning.jobs.list()) == []  # nothing stored from a refused create


def test_cancel_a_queued_job(tmp_path, tiny_model_dir):
    with BackgroundServer(create_api_app(str(tmp_path / "q.db"), workers=0)) as running:
        client = client_for(running.url)
        training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id)
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert [e.message for e in client.fine_tuning.jobs.list_events(job.id)][0] == "The job was cancelled."
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_cancel_a_running_job_stops_training(server, tiny_model_dir, tmp_path):
    client = client_for(server.url)
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_job(client, job.id, timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert max(steps) < 400
    from flywheel.store import Store

    store = Store.open(tmp_path / "flywheel.db")  # the server fixture's store
    try:
        training_job = store.get_training_job(store.api_get("api_fine_tuning_jobs", job.id)["training_job_id"])
    finally:
        store.close()
    # one status per fine-tune: the training job's; the API never resumes a cancelled job (its trainer state is gone)
    assert training_job.status == "cancelled" and not Path(training_job.output_dir).exists()


PAIRS = [{"input": {"messages": [{"role": "user", "content": f"question {i}"}]},
          "preferred_output": [{"role": "assistant", "content": "card_arrival"}],
          "non_preferred_output": [{"role": "assistant", "content": "I am not sure"}]} for i in range(4)]


@pytest.mark.slow
def test_dpo_job(server, tiny_model_dir):
    client = client_for(server.url)
    pairs = client.files.create(file=("pairs.jsonl", jsonl(PAIRS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=f"local:{tiny_model_dir}", training_file=pairs.id, validation_file=pairs.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "beta": 0.2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data if e.type == "metrics"]
    # 4 steps; DPO's loss on the validation pairs at each, the last one on the whole file
    valid = sorted((d for d in metrics if "valid_loss" in d), key=lambda d: d["step"])
    assert [d["step"] for d in valid] == [1, 2, 3, 4] and valid[-1]["full_valid_loss"] == valid[-1]["valid_loss"]
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].metrics.full_valid_loss == valid[-1]["valid_loss"]
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                           messages=[{"role": "user", "content": "question 0"}])
    assert reply.choices[0].message.role == "assistant"


def test_trained_tokens_count_every_epoch(server, tiny_model_dir, tmp_path):
    """The platform counts `trained_tokens` over all epochs: two epochs train the set's tokens twice."""
    client = client_for(server.url)
    training = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=f"local:{tiny_model_dir}", training_file=training.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    store = Store.open(tmp_path / "flywheel.db")
    try:
        [checkpoint] = [c for c in store.db["checkpoints"].rows if c["id"] == store.api_get(
            "api_fine_tuning_jobs", job.id)["checkpoint_id"]]
        one_pass = json.loads(checkpoint["metrics_json"])["tokens"]
    finally:
        store.close()
    assert one_pass > 0 and done.trained_tokens == 2 * one_pass
