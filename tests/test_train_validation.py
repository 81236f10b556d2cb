"""Validation during training on the tiny model: the validation loss every `eval_steps` stored as
events, checkpoints every `save_steps` registered with their losses and valid score, early
stopping with its reason, the best checkpoint chosen by score (not loss), `keep` pruning folders
but not rows, and a job killed with SIGKILL resuming from its last saved step."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl
from train_helpers import events, quick_sft, tiny_eval, write_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.spec import SpecError
from flywheel.store import Store
from flywheel.train import SFTSpec, TrainingDataError, TrainingError, build_sft_set, register_checkpoint
from flywheel.store import Checkpoint
from flywheel.train.config import EarlyStoppingSpec
from flywheel.train.methods import load_train_config
from flywheel.train.sft import train_sft
from flywheel.train.validation import EarlyStopper, JobValidation, choose_best, lock_job_folder, validation_set


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_model_dir):
    """SFT for 6 steps: valid loss every 2 steps, a checkpoint every 2 steps scored on 3 valid items."""
    folder = tmp_path_factory.mktemp("validate")
    spec = tiny_eval(folder, tiny_model_dir, n_per_split=6)
    store = Store.open(folder / "flywheel.db")
    capture(spec, store, "reference:label")
    config = quick_sft(eval_steps=2, save_steps=2, valid_subset=3, keep="all")
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=config, evaluate=False,
                       quiet=True)
    yield spec, store, result
    store.close()


def _validation_events(store, job_id):
    return [json.loads(e["data_json"]) for e in store.training_events(job_id) if e["type"] == "validation"]


def test_valid_loss_is_stored_beside_the_train_loss(validated):
    spec, store, result = validated
    points = _validation_events(store, result.job_id)
    losses = [(p["step"], p["valid_loss"]) for p in points if "valid_loss" in p]
    assert [s for s, _ in losses] == [2, 4, 6]
    assert all(v > 0 for _, v in losses)
    assert all(p["train_loss"] is not None for p in points)
    # The trainer's own log lines (train loss and eval_loss) are metrics events of the same job.
    logged = events(store, result.job_id)
    assert [e["step"] for e in logged if "eval_loss" in e] == [2, 4, 6]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # The validation rows are the valid split answered by the objective grader's reference.
    assert result.metrics["valid_rows"] == 6


def test_every_saved_step_is_a_registered_checkpoint_with_losses_and_score(validated):
    spec, store, result = validated
    checkpoints = store.job_checkpoints(result.job_id)
    assert [c.step for c in checkpoints] == [2, 4, 6]
    for checkpoint in checkpoints:
        m = checkpoint.metrics
        assert m["train_loss"] > 0 and m["valid_loss"] > 0
        assert m["valid_n"] == 3 and 0.0 <= m["valid_score"] <= 1.0
        iteration = store.get_iteration(m["valid_iteration_id"])
        assert iteration.stage == "validation" and iteration.split == "valid"
        assert iteration.model_ref == checkpoint.model_ref and iteration.n == 3
        assert Path(checkpoint.path, "adapter_config.json").is_file()  # keep: all
    scores = [p for p in _validation_events(store, result.job_id) if "valid_score" in p]
    assert [p["step"] for p in scores] == [2, 4, 6] and all(p["checkpoint_id"] for p in scores)
    assert [c["step"] for c in result.checkpoints] == [2, 4, 6]
    assert sum(c["best"] for c in result.checkpoints) == 1


def test_the_job_returns_its_best_checkpoint_and_drops_its_trainer_folder(validated):
    spec, store, result = validated
    checkpoints = store.job_checkpoints(result.job_id)
    best, why = choose_best(checkpoints)
    assert result.checkpoint.id == best.id and result.best_reason == why
    job = store.get_training_job(result.job_id)
    assert job.status == "succeeded" and job.checkpoint_id == best.id
    assert job.stop_reason == "end of the schedule" and result.stop_reason is None
    assert not Path(job.output_dir).exists()  # optimizer states go once the job succeeded
    last = store.get_checkpoint(checkpoints[-1].id).metrics
    assert last["steps"] == 6  # the run's summary joins the last checkpoint's row
    assert last["train_loss"] == result.metrics["last_loss"]  # its own step's loss, not the run's mean
    lines = "\n".join(result.summary_lines())
    assert "checkpoints (best:" in lines and all(c.id in lines for c in checkpoints)


def test_best_is_chosen_by_the_score_not_by_the_loss_and_keep_prunes_folders_not_rows(store, tmp_path):
    """Three registered adapters: the lowest valid loss is not the highest valid score."""
    job_id = store.create_training_job(backend="local", method="sft", base_model="local:x")
    spec = tiny_eval(tmp_path / "spec", tmp_path)  # read for its prompt only
    validation = JobValidation(store=store, job_id=job_id, method="sft", spec=spec, config=SFTSpec(keep="best"),
                               prompt=None, base_model="local:x", parent_id=None, training_set=_FakeSet(),
                               history=[])

    def adapter(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")

    measured = {2: (0.40, 0.50), 4: (0.90, 0.75), 6: (0.30, 0.25)}  # step: (valid loss, valid score)
    for step, (loss, score) in measured.items():
        register_checkpoint(store, method="sft", base_model="local:x", save=adapter, training_set_id=None,
                            training_set_hash="h", config={}, metrics={"valid_loss": loss, "valid_score": score},
                            job_id=job_id, step=step, finish_job=False)
    assert store.get_training_job(job_id).status == "running"  # intermediate checkpoints
    best, why, pruned = validation.finish()
    assert best.step == 4 and "highest valid score 0.75" in why
    by_step = {c.step: c for c in store.job_checkpoints(job_id)}
    assert len(by_step) == 3 and len(pruned) == 2  # every row stays, with its metrics
    assert by_step[4].pruned_at is None and Path(by_step[4].path).is_dir()
    for step in (2, 6):
        assert by_step[step].pruned_at and not Path(by_step[step].path).exists()
        assert by_step[step].metrics["valid_loss"] == measured[step][0]
    assert store.get_training_job(job_id).checkpoint_id == best.id
    # Without scores, the lowest valid loss wins; without either, the last step.
    plain = store.job_checkpoints(job_id)
    for c in plain:
        c.metrics.pop("valid_score")
    assert choose_best(plain)[0].step == 6
    for c in plain:
        c.metrics.pop("valid_loss")
    assert choose_best(plain)[0].step == 6 and "last step" in choose_best(plain)[1]


def test_a_tie_on_the_valid_score_says_how_it_was_broken():
    def point(step, score, loss=None):
        metrics = {"valid_score": score, **({"valid_loss": loss} if loss is not None else {})}
        return Checkpoint(id=f"c{step}", method="sft", backend="local", model_ref="local:x", base_model="local:x",
                          path=None, adapter_hash=None, training_set_id=None, training_set_hash=None,
                          parent_id=None, job_id=None, config={}, metrics=metrics, evals={}, step=step)

    best, why = choose_best([point(2, 0.5, 1.1), point(4, 0.5, 0.6), point(6, 0.5, 0.9), point(8, 0.25, 0.1)])
    assert best.step == 4 and why == "highest valid score 0.5 (step 4; tied with steps 2, 6: lowest valid loss 0.6 of those)"
    best, why = choose_best([point(2, 0.0), point(4, 0.0)])
    assert best.step == 4 and why == "highest valid score 0 (step 4; tied with step 2: the latest of those)"
    assert choose_best([point(2, 0.0), point(4, 1.0)])[1] == "highest valid score 1 (step 4)"


class _FakeSet:
    id = None
    content_hash = "h"


def test_keep_n_keeps_the_n_best(store):
    job_id = store.create_training_job(backend="local", method="sft", base_model="local:x")

    def adapter(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")

    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)]:
        register_checkpoint(store, method="sft", base_model="local:x", save=adapter, training_set_id=None,
                            training_set_hash="h", config={}, metrics={"valid_loss": loss}, job_id=job_id,
                            step=step, finish_job=False)
    from flywheel.train.validation import prune_checkpoints

    checkpoints = store.job_checkpoints(job_id)
    pruned = prune_checkpoints(store, checkpoints, "2")
    kept = [c.step for c in store.job_checkpoints(job_id) if not c.pruned_at]
    assert kept == [2, 3] and len(pruned) == 2


def test_early_stopping_counts_patience_and_min_delta():
    stopper = EarlyStopper(EarlyStoppingSpec(metric="valid_loss", patience=2, min_delta=0.05))
    assert stopper.update(1, 1.0) is None
    assert stopper.update(2, 0.97) is None  # not better by more than 0.05: one strike
    assert stopper.update(3, 0.90) is None  # better: strikes reset
    assert stopper.update(4, 0.89) is None
    reason = stopper.update(5, 0.95)
    assert reason and "step 5" in reason and "best 0.9 at step 3" in reason
    score = EarlyStopper(EarlyStoppingSpec(metric="valid_score", patience=1))
    assert score.update(1, 0.5) is None and score.update(2, 0.6) is None
    assert "valid_score did not improve" in score.update(3, 0.6)


def _train_file(folder: Path, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "system", "content": "Answer with one label"},
                          {"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": ["card_arrival", "pin_blocked"][i % 2]}]} for i in range(n)]
    return write_jsonl(folder / "train.jsonl", rows)


def test_early_stopping_fires_and_the_cli_prints_why_and_every_checkpoint(tmp_path, tiny_model_dir):
    spec_path = write_eval(tmp_path, f"local:{tiny_model_dir}", n_per_split=4)
    train = _train_file(tmp_path)
    db = tmp_path / "flywheel.db"
    args = ["train", "sft", str(spec_path), "--base", f"local:{tiny_model_dir}", "--data", str(train),
            "--db", str(db), "--no-eval", "-s", "precision=fp32", "-s", "batch_size=4", "-s", "max_steps=20",
            "-s", "eval_steps=1", "-s", "save_steps=1", "-s", "keep=all",
            "-s", "early_stopping.metric=valid_loss", "-s", "early_stopping.patience=1",
            "-s", "early_stopping.min_delta=100"]  # nothing improves by 100: stop at the second measurement
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stopped: early stopping at step 2: valid_loss did not improve by more than 100" in result.output
    assert "checkpoints (best: lowest valid loss" in result.output
    out = CliRunner().invoke(main, [*args[:-1], "early_stopping.min_delta=200", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["stop_reason"].startswith("early stopping at step 2") and data["metrics"]["steps"] == 2
    assert [c["step"] for c in data["checkpoints"]] == [1, 2]
    assert {"id", "train_loss", "valid_loss", "valid_score", "kept", "best"} <= set(data["checkpoints"][0])
    store = Store.open(db)
    job = store.get_training_job(data["job_id"])
    assert job.stop_reason == data["stop_reason"] and job.checkpoint_id == data["checkpoint"]["id"]
    assert [e for e in store.training_events(data["job_id"]) if e["type"] == "stop"]
    store.close()


def test_validation_settings_that_cannot_work_are_one_line_errors(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path / "e", tiny_model_dir, graders=[
        {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}])
    from flywheel.prompt import Prompt

    prompt = Prompt(messages=spec.messages())
    with pytest.raises(TrainingDataError, match="set validation_file, or validation_reference"):
        validation_set("sft", spec, SFTSpec(eval_steps=2), prompt)
    with pytest.raises(TrainingDataError, match="dpo: eval_steps needs validation_file"):
        validation_set("dpo", spec, SFTSpec(eval_steps=2), prompt)
    with pytest.raises(TrainingDataError, match="rft: GRPO has no validation loss"):
        validation_set("rft", spec, SFTSpec(eval_steps=2), prompt)
    bad = tmp_path / "valid.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\nnot json\n')
    with pytest.raises(TrainingDataError, match=r"valid.jsonl:2: invalid JSON"):
        validation_set("sft", spec, SFTSpec(eval_steps=2, validation_file=str(bad)), prompt)
    rows = validation_set("sft", spec, SFTSpec(eval_steps=2, validation_reference="{{item.label}}"), prompt).rows
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "card_arrival"}
    # A config that bypasses the checks made when it loads is still refused before training starts.
    config = quick_sft().model_copy(update={"early_stopping": EarlyStoppingSpec(metric="valid_score")})
    with pytest.raises(TrainingDataError, match="early_stopping on valid_score needs save_steps and valid_subset"):
        train_sft(spec, store, _tiny_set(), base=spec.model, evaluate=False, quiet=True, config=config)
    assert store.db.execute("select status from training_jobs").fetchall() in ([], [("failed",)])


@pytest.mark.parametrize("overrides, message", [
    (["valid_subset=8"], "train config: valid_subset scores the checkpoints saved every save_steps: set save_steps"),
    (["early_stopping=valid_score", "save_steps=2"], "train config: early_stopping on valid_score needs valid_subset"),
    (["early_stopping.metric=valid_score"], "train config: early_stopping on valid_score scores the checkpoints"),
    (["early_stopping.patience=3"], "train config: early_stopping on valid_loss needs eval_steps"),
    (["early_stopping=valid_los", "eval_steps=2"], "train config: early_stopping.metric: Input should be"),
])
def test_validation_settings_that_cannot_work_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises(SpecError) as caught:
        load_train_config("sft", overrides=overrides)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_the_step_settings_validation_needs_default_from_each_other():
    config = load_train_config("sft", overrides=["eval_steps=4", "valid_subset=16", "early_stopping=valid_score"])
    assert (config.eval_steps, config.save_steps, config.valid_subset) == (4, 4, 16)
    assert config.early_stopping == EarlyStoppingSpec(metric="valid_score")
    config = load_train_config("sft", overrides=["save_steps=3", "early_stopping=valid_loss"])
    assert (config.eval_steps, config.save_steps) == (3, 3)
    config = load_train_config("sft", overrides=["eval_steps=5", "save_steps=10", "valid_subset=4"])
    assert (config.eval_steps, config.save_steps) == (5, 10)  # set ones are kept
    # The train loss beside a checkpoint is the one logged at its step (default logging_steps is 5).
    assert [load_train_config("sft", overrides=[f"eval_steps={n}"]).logging_steps for n in (3, 4, 10, 12, 7)] == [
        3, 4, 5, 4, 1]
    assert load_train_config("sft", overrides=["eval_steps=3", "logging_steps=2"]).logging_steps == 2  # as set
    assert load_train_config("sft").logging_steps == 5
    plain = load_train_config("sft")  # validation stays off unless asked for
    assert (plain.eval_steps, plain.save_steps, plain.valid_subset, plain.early_stopping) == (None, None, 0, None)


def _tiny_set():
    from flywheel.train import TrainingSet

    return TrainingSet("sft", [{"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}] * 4)


def _wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended (status {process.returncode}) before it could be killed: "
                                 f"{process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint saved in time")


def _saved_steps(db: Path) -> list[int]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return [r[0] for r in conn.execute("select step from checkpoints where step is not null order by step")]
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_a_job_killed_with_sigkill_resumes_from_its_last_saved_step(tmp_path, tiny_model_dir):
    spec_path = write_eval(tmp_path, f"local:{tiny_model_dir}", n_per_split=4)
    train = _train_file(tmp_path, n=16)
    db = tmp_path / "flywheel.db"
    command = [sys.executable, "-m", "flywheel", "train", "sft", str(spec_path), "--db", str(db), "--no-eval"]
    settings = ["--base", f"local:{tiny_model_dir}", "--data", str(train), "-s", "precision=fp32",
                "-s", "batch_size=2", "-s", "max_steps=60", "-s", "save_steps=5", "-s", "logging_steps=1",
                "-s", "keep=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, *settings], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        _wait_for(lambda: len(_saved_steps(db)) >= 1, 240, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    store = Store.open(db)
    [job] = store.db.execute("select id, status, output_dir from training_jobs").fetchall()
    job_id, status, output_dir = job
    assert status == "running"  # killed: nothing marked it
    before = _saved_steps(db)
    assert before and before[-1] < 60
    store.close()

    done = subprocess.run([*command, "--resume", job_id, "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data["job_id"] == job_id and data["metrics"]["steps"] == 60
    store = Store.open(db)
    trail = store.training_events(job_id)
    [resume] = [json.loads(e["data_json"]) for e in trail if e["type"] == "resume"]
    assert resume["from_step"] >= before[-1] - 5 and resume["from_step"] % 5 == 0
    after = [json.loads(e["data_json"])["step"] for e in trail[[e["type"] for e in trail].index("resume"):]
             if e["type"] == "metrics" and "loss" in json.loads(e["data_json"])]
    assert after[0] == resume["from_step"] + 1  # not from step 1: the optimizer, schedule and data position resumed
    assert data["metrics"]["resumed_from_step"] == resume["from_step"]
    steps = [c.step for c in store.job_checkpoints(job_id)]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one row per saved step, none registered twice
    assert sum(1 for c in store.job_checkpoints(job_id) if not c.pruned_at) == 2  # keep: 2
    assert store.get_training_job(job_id).status == "succeeded"
    again = subprocess.run([*command, "--resume", job_id], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and f"job {job_id} already finished" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    store.close()


def test_the_same_call_after_a_crash_resumes_the_unfinished_job(tmp_path, tiny_model_dir):
    """A job that died after its step-2 save (here: an exception at step 4's validation) is picked
    up by the same call: same job, continued from step 2, not trained from scratch."""
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=4)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    training_set = build_sft_set(spec, store)
    config = quick_sft(max_steps=6, eval_steps=2, save_steps=2)

    def crash(point):
        if point.step == 4:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train_sft(spec, store, training_set, base=spec.model, config=config, evaluate=False, quiet=True,
                  monitor=crash)
    [job] = store.db.execute("select id, status, output_dir from training_jobs").fetchall()
    assert job[1] == "failed" and Path(job[2], "checkpoint-2", "trainer_state.json").is_file()
    held = lock_job_folder(job[2])  # as if the job were still training in another process
    with pytest.raises(TrainingError, match=f"job {job[0]} is still training in another process"):
        train_sft(spec, store, training_set, base=spec.model, config=config, evaluate=False, quiet=True,
                  resume=job[0])
    held.close()
    result = train_sft(spec, store, training_set, base=spec.model, config=config, evaluate=False, quiet=True)
    assert result.job_id == job[0] and result.metrics["resumed_from_step"] == 2
    trail = store.training_events(job[0])
    kinds = [e["type"] for e in trail]
    after = [json.loads(e["data_json"])["step"] for e in trail[kinds.index("resume"):]
             if e["type"] == "metrics" and "loss" in json.loads(e["data_json"])]
    assert after == [3, 4, 5, 6]
    assert [c.step for c in store.job_checkpoints(job[0])] == [2, 4, 6]
    assert store.get_training_job(job[0]).status == "succeeded"
    with pytest.raises(TrainingError, match=f"job {job[0]} already finished"):
        train_sft(spec, store, training_set, base=spec.model, config=config, evaluate=False, quiet=True,
                  resume=job[0])
    store.close()


def test_fresh_never_picks_up_another_unfinished_job(tmp_path, tiny_model_dir):
    """`run_local(fresh=True)` (the API, which resumes its own jobs by id) trains a new job even when an
    unfinished one of the same set, base and config waits to be resumed; that one stays resumable."""
    from flywheel.train.local import run_local
    from flywheel.train.sft import build_sft_trainer

    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=4)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    training_set = build_sft_set(spec, store)
    config = quick_sft(max_steps=4, save_steps=2)

    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # after the step-2 save
                raise RuntimeError("power cut")

    crasher = Crash()

    def build(model, tokenizer, output_dir, bf16):
        return build_sft_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=True)

    with pytest.raises(RuntimeError, match="power cut"):
        run_local("sft", spec, store, training_set, base=spec.model, config=config, build=build, evaluate=False,
                  quiet=True, callbacks=[crasher])
    [(killed, status)] = store.db.execute("select id, status from training_jobs").fetchall()
    assert status == "failed"
    result = run_local("sft", spec, store, training_set, base=spec.model, config=config, build=build,
                       evaluate=False, quiet=True, fresh=True)
    assert result.job_id != killed and "resumed_from_step" not in result.metrics
    assert store.get_training_job(killed).status == "failed"
    resumed = run_local("sft", spec, store, training_set, base=spec.model, config=config, build=build,
                        evaluate=False, quiet=True)  # without fresh, the same call resumes the killed one
    assert resumed.job_id == killed and resumed.metrics["resumed_from_step"] == 2
    store.close()


def test_the_missing_validation_reference_error_suggests_a_command_that_works(tmp_path, tiny_model_dir):
    """The suggested `-s validation_reference={{item.x}}`, split as a shell would and read by the CLI's
    override parser, is the template string (YAML alone read it as a mapping: "unhashable key")."""
    import re
    import shlex

    from flywheel.prompt import Prompt

    spec = tiny_eval(tmp_path / "e", tiny_model_dir, graders=[
        {"type": "python", "name": "label", "source": "def grade(sample, item):\n    return 1.0\n"}])
    prompt = Prompt(messages=spec.messages())
    with pytest.raises(TrainingDataError) as raised:
        validation_set("sft", spec, SFTSpec(eval_steps=2), prompt)
    suggested = re.search(r"`flywheel train \.\.\. (-s [^`]+)`", str(raised.value))[1]
    flag, setting = shlex.split(suggested)
    config = load_train_config("sft", overrides=[setting, "eval_steps=2"])
    assert flag == "-s" and config.validation_reference == "{{item.label}}"
    rows = validation_set("sft", spec, config, prompt).rows
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "card_arrival"}
    # Any -s value that starts as a template stays a string (other values are still YAML).
    assert load_train_config("sft", overrides=["validation_reference={{item.a}} / {{item.b}}", "epochs=2"]) \
        .validation_reference == "{{item.a}} / {{item.b}}"


def test_the_validation_reference_is_derived_from_a_python_objective_or_the_captures(tmp_path, tiny_model_dir):
    """A python objective grader names no `reference`; the item field its grade() compares with, hidden
    from the prompt, answers a valid item. Items from captures are answered by the captured reply."""
    from flywheel.prompt import Prompt
    from flywheel.spec import parse_eval_spec
    from flywheel.train.validation import default_reference

    source = ("def grade(sample, item):\n    text = item['text']\n"
              "    return float(sample['output_text'].strip() == item.get('label', ''))\n")
    spec = tiny_eval(tmp_path / "e", tiny_model_dir, graders=[{"type": "python", "name": "label", "source": source}])
    assert default_reference(spec) == "{{item.label}}"  # item.text is in the prompt: not the answer
    rows = validation_set("sft", spec, SFTSpec(eval_steps=2), Prompt(messages=spec.messages())).rows
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "card_arrival"}

    two = "def grade(sample, item):\n    return float(item['label'] in (item['a'], item['b']))\n"
    ambiguous = tiny_eval(tmp_path / "f", tiny_model_dir, graders=[{"type": "python", "name": "label", "source": two}])
    assert default_reference(ambiguous) is None  # which field answers is not said: the error suggests one

    captured = parse_eval_spec({"name": "c", "dataset": {"captures": {"db": "x.db"}},
                                "input": [{"role": "user", "content": "{{item.input}}"}],
                                "graders": [{"type": "python", "name": "ok",
                                             "source": "def grade(sample, item):\n    return 1.0\n"}]})
    assert default_reference(captured) == "{{item.output}}"
