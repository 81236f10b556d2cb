"""`flywheel run` end to end on the tiny real model: stages, decisions, test only at the end, resume
after SIGKILL at several points, and a task that is not the demo."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from flywheel import data
from flywheel.cli import main
from flywheel.run_spec import load_run_spec
from flywheel.store import Store
from flywheel.wheel import WheelState, run_wheel

from conftest import make_rows, spec_dict, write_jsonl

FAST = {"precision": "fp32", "batch_size": 4}


def write_run(tmp_path, model_dir, stages, rows=None, **run):
    write_jsonl(tmp_path / "data.jsonl", rows or make_rows(6))
    spec = spec_dict(f"local:{model_dir}", optimize={
        "minibatch": 4, "finalists": 1,
        "fewshot": {"source": "labels", "demo_output": "{{item.label}}", "label_field": "label",
                    "strategies": ["balanced"], "k": [1]}})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "stages": stages, **run}))
    return tmp_path / "run.yaml"


STAGES = [{"stage": "optimize"}, {"stage": "capture", "teacher": "reference:label"},
          {"stage": "sft", "config": {"max_steps": 2, **FAST}},
          {"stage": "capture", "teacher": "incumbent", "n": 2, "limit": 3},
          {"stage": "dpo", "config": {"max_steps": 1, **FAST}}]


def test_wheel_runs_every_stage_and_reports(tmp_path, tiny_model_dir, store):
    result = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, STAGES)), store,
                       report_dir=str(tmp_path / "reports"))
    assert [o.stage for o in result.stages] == ["optimize", "capture", "sft", "capture", "dpo"]
    by_stage = {o.stage: o for o in result.stages}
    assert result.stages[1].decision == "captured" and "reference:label" in result.stages[1].reason
    # The incumbent (base or the SFT checkpoint, whichever won) sampled its own best-of-2.
    assert result.stages[3].decision == "captured" and "6/6 train items" not in result.stages[3].reason
    assert "3 train items covered by local:" in result.stages[3].reason
    assert by_stage["sft"].decision in ("promoted", "rejected") and "checkpoint sft-" in by_stage["sft"].reason
    # Pairs: the passing reference answer vs the incumbent's failing sample of the same item.
    assert by_stage["dpo"].decision in ("promoted", "rejected") and "checkpoint dpo-" in by_stage["dpo"].reason
    iterations = store.iterations(result.run_id)
    # Valid decides; test is measured only after the wheel stopped, for baseline and promoted iterations.
    test_rows = [it for it in iterations if it.split == "test"]
    assert test_rows and all(it.stage == "test-report" for it in test_rows)
    assert max(it.seq for it in iterations if it.split == "valid") < min(it.seq for it in test_rows)
    sft_iteration = next(it for it in iterations if it.stage == "sft")
    assert sft_iteration.model_ref.startswith(f"local:{tiny_model_dir}+") and sft_iteration.parent_id
    assert store.db["checkpoints"].count == 2
    assert result.report_path and "<html" in open(result.report_path).read(200).lower()
    assert store.get_run(result.run_id).status == "completed"


def test_target_and_plateau_stop_the_wheel(tmp_path, tiny_model_dir, store):
    target = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, STAGES, target=0.0)), store)
    assert target.stages == [] and target.stopped.startswith("target 0.0 reached")
    plateau = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, STAGES, plateau=1)), store)
    assert [o.stage for o in plateau.stages] == ["optimize"] and plateau.stopped.startswith("plateau")


def test_bad_run_spec_is_one_line(tmp_path):
    (tmp_path / "run.yaml").write_text("eval: e.yaml\nstages:\n  - stage: sfft\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml"), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "run.yaml: stages[0]" in result.output and "Traceback" not in result.output


def test_a_task_that_is_not_the_demo(tmp_path, tiny_model_dir):
    """Different fields, graders and labels, CSV data, a python grader: no code changes."""
    (tmp_path / "qa.csv").write_text("question,answer,part\n" + "".join(
        f"What is {a} plus {b}?,{a + b},{['train', 'valid', 'test'][i % 3]}\n"
        for i, (a, b) in enumerate((x, x + 1) for x in range(12))))
    spec = {"name": "sums", "dataset": {"path": "qa.csv"}, "split": {"column": "part"},
            "input": [{"role": "user", "content": "Answer with a number. {{item.question}}"}],
            "model": f"local:{tiny_model_dir}", "sampling": {"max_tokens": 4},
            "graders": [{"type": "python", "name": "exact", "source":
                         "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])\n"},
                        {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
                         "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.5}],
            "objective": {"grader": "close", "metric": "mean_score"},
            "optimize": {"minibatch": 2, "variants": [{"name": "digits", "system": "Reply with digits only."}]}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "stages": [
        {"stage": "optimize"}, {"stage": "capture", "teacher": "reference:answer"},
        {"stage": "sft", "config": {"max_steps": 1, **FAST}}], "plateau": 5}))
    out = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml"), "--db", str(tmp_path / "w.db"), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [s["stage"] for s in data["stages"]] == ["optimize", "capture", "sft"]
    assert data["test"]["comparison"]["n"] == 4


def _wait_for(db, query, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    if conn.execute(query).fetchone()[0]:
                        return True
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_at_several_stages_then_resume(tmp_path, tiny_model_dir):
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "optimize"}, {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "config": {"max_steps": 30, **FAST}}, {"stage": "sft", "config": {"max_steps": 3, **FAST}}],
        rows=make_rows(12))
    db = tmp_path / "w.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flywheel = [sys.executable, "-m", "flywheel"]
    kill_points = [
        "select count(*) from samples",                                   # during the baseline
        "select count(*) from runs where kind = 'optimize'",              # inside prompt search
        "select count(*) from training_jobs where status = 'running'",    # while SFT trains
        "select count(*) from checkpoints",                               # after a checkpoint, before its eval
    ]
    command = flywheel + ["run", str(run_yaml), "--db", str(db), "--json"]
    killed_at = []
    for query in kill_points:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        if _wait_for(db, query, proc):
            proc.send_signal(signal.SIGKILL)
            killed_at.append(query)
        proc.wait()
        with sqlite3.connect(db) as conn:
            run_id = conn.execute("select id from runs where kind = 'wheel'").fetchone()[0]
        command = flywheel + ["run", "--resume", run_id, "--db", str(db), "--json"]
    assert len(killed_at) >= 3, killed_at  # the run really was killed mid-way several times
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert [s["stage"] for s in result["stages"]] == ["optimize", "capture", "sft", "sft"]
    store = Store.open(db)
    assert store.db.execute("select count(*) from runs where kind = 'wheel'").fetchone()[0] == 1
    assert store.get_run(run_id).status == "completed"
    # No sample stored twice anywhere, and each SFT stage trained exactly one registered checkpoint.
    dupes = store.db.execute("select count(*) from (select iteration_id, item_key, repeat, count(*) c from samples"
                             " group by 1, 2, 3 having c > 1)").fetchone()[0]
    assert dupes == 0
    assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 2
    store.close()


def test_a_kill_right_after_the_final_checkpoint_registers_does_not_train_it_again(tmp_path, tiny_model_dir):
    # The window the sigkill test above hit under load: the job's one (final) checkpoint is committed,
    # its job not yet marked succeeded. FLYWHEEL_KILL_AT lands the kill exactly there.
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label"}, {"stage": "sft", "config": {"max_steps": 1, **FAST}}])
    db = tmp_path / "w.db"
    command = [sys.executable, "-m", "flywheel", "run", str(run_yaml), "--db", str(db), "--json"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FLYWHEEL_KILL_AT": "checkpoint-registered"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Store.open(db)
    try:
        assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 1
        run_id = next(r.id for r in store.list_runs() if r.kind == "wheel")
        resumed = run_wheel(load_run_spec(run_yaml), store, resume=run_id)
        assert [o.stage for o in resumed.stages] == ["capture", "sft"]
        assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 1  # reused, not trained again
    finally:
        store.close()


def test_resuming_a_finished_run_says_so_in_one_line_and_changes_nothing(tmp_path, tiny_model_dir, store):
    run_yaml = write_run(tmp_path, tiny_model_dir, [{"stage": "capture", "teacher": "reference:label"}])
    db = str(store.path)
    result = run_wheel(load_run_spec(run_yaml), store)
    state = store.run_state(result.run_id, WheelState)
    assert state.finished and [r.outcome.stage for r in state.stages] == ["capture"]
    assert state.result["winner_model"] == result.winner_model and state.run_spec == str(run_yaml)
    before = (store.get_run(result.run_id), len(store.list_runs()), len(store.iterations(result.run_id)))
    for args in (["run", "--resume", result.run_id], ["run", str(run_yaml), "--resume", result.run_id[-12:]]):
        out = CliRunner().invoke(main, [*args, "--db", db])
        assert out.exit_code == 1, out.output
        assert out.output.strip().count("\n") == 0 and "already finished (completed)" in out.output
        assert "Traceback" not in out.output
    assert (store.get_run(result.run_id), len(store.list_runs()), len(store.iterations(result.run_id))) == before


def test_wheel_states_stored_the_old_way_still_load(tmp_path, tiny_model_dir, store):
    outcome = {"stage": "capture", "decision": "captured", "reason": "capture cap-1: 4/4", "lap": 1,
               "candidate": None, "valid": None, "iteration_id": None, "cost": None, "rule": None, "wall_s": 1.5,
               "search_run": None}
    kept = {"model_ref": "local:x", "prompt_id": "p-1", "iteration_id": "run-1/0", "score": 0.25,
            "cost": {"n": 4, "prompt_tokens": 30.0, "completion_tokens": 2.0, "latency_s": None, "money_per_1k": None}}
    running = WheelState.model_validate_json(json.dumps(
        {"run_spec": "run.yaml", "stages": [{"outcome": outcome, "incumbent": kept}], "elapsed_s": 12.0}))
    assert not running.finished and running.stages[0].outcome.decision == "captured"
    assert running.stages[0].incumbent.score == 0.25 and running.elapsed_s == 12.0
    assert WheelState.model_validate_json(running.model_dump_json()) == running
    # A finished run's result used to be merged into the state, its outcomes replacing the records.
    finished = WheelState.model_validate({"run_spec": "run.yaml", "stages": [outcome], "elapsed_s": 30.0,
                                          "run_id": "run-1", "baseline_valid": 0.25, "stopped": "1 lap(s) ran",
                                          "milestones": [], "wall_s": 30.0})
    assert finished.finished and finished.stages == [] and finished.result["stages"] == [outcome]
    assert finished.result["stopped"] == "1 lap(s) ran" and finished.elapsed_s == 30.0
    # ... and such a run is shown and refused by the CLI like any finished one.
    run_yaml = write_run(tmp_path, tiny_model_dir, [{"stage": "capture", "teacher": "reference:label"}])
    db = str(store.path)
    run_id = run_wheel(load_run_spec(run_yaml), store).run_id
    old = {**store.run_state(run_id, WheelState).result, "run_spec": str(run_yaml), "elapsed_s": 3.0}
    store.finish_run(run_id, "completed", old)
    shown = CliRunner().invoke(main, ["runs", "show", run_id, "--db", db, "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)["run"]["summary"]
    assert summary["result"]["run_id"] == run_id and summary["stages"] == []
    out = CliRunner().invoke(main, ["run", "--resume", run_id, "--db", db])
    assert out.exit_code == 1 and "already finished" in out.output


def test_one_wheel_run_parses_its_dataset_once(tmp_path, tiny_model_dir, store):
    # The wheel loads the dataset and builds the grader set once and hands them to every stage,
    # training included (flywheel.train.run takes them in its request).
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "optimize"}, {"stage": "capture", "teacher": "reference:label"},
        {"stage": "capture", "teacher": "incumbent", "limit": 2}, {"stage": "sft", "config": {"max_steps": 1, **FAST}}])
    path = str(tmp_path / "data.jsonl")
    before = data.PARSES[path]
    result = run_wheel(load_run_spec(run_yaml), store)
    assert [o.decision for o in result.stages][1:3] == ["captured", "captured"] and result.test
    assert result.stages[3].stage == "sft" and result.stages[3].decision != "failed", result.stages[3].reason
    assert data.PARSES[path] - before == 1


def test_a_stage_that_cannot_run_is_recorded_and_the_wheel_goes_on(tmp_path, tiny_model_dir, store):
    result = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, [
        {"stage": "dpo", "config": {"max_steps": 1, **FAST}}])), store)
    assert [(o.stage, o.decision) for o in result.stages] == [("dpo", "failed")]
    # DPO polishes a tuned model: with none in the run, it says what to do instead of training the base.
    assert "put an sft stage before it" in result.stages[0].reason
    assert store.get_run(result.run_id).status == "completed"


SHORT_STUDENT = [{"role": "user", "content": "{{item.text}}"}]


def test_a_cheaper_non_inferior_student_is_promoted_and_the_summary_names_the_milestones(tmp_path, tiny_model_dir, store):
    # The tiny model scores 0 with any prompt: the student with a one-line prompt is not worse (CI [0, 0])
    # and costs fewer prompt tokens, so the cost goal promotes it; the decision names that rule.
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "student_prompt": SHORT_STUDENT, "config": {"max_steps": 2, **FAST}}],
        goal={"minimise": "prompt_tokens", "margin": 0.05})
    result = run_wheel(load_run_spec(run_yaml), store)
    sft = result.stages[1]
    assert sft.decision == "promoted" and sft.rule == "cheaper and non-inferior"
    assert "prompt tokens/item vs" in sft.reason and "> −0.05 margin" in sft.reason
    labels = [m.label for m in result.milestones]
    assert labels == ["baseline", "final model"]
    base, final = result.milestones
    assert final.cost["prompt_tokens"] < base.cost["prompt_tokens"] and final.test is not None
    assert final.model_ref.startswith(f"local:{tiny_model_dir}+")
    # The student's prompt is part of the candidate: stored, and what the final model is measured with.
    assert json.loads(store.db["prompts"].get(final.prompt_id)["messages_json"]) == SHORT_STUDENT
    rows = {it.id: it for it in store.iterations(result.run_id)}
    assert rows[sft.iteration_id].lap == 1 and rows[sft.iteration_id].latency_s is not None


def test_without_a_goal_the_same_student_is_not_promoted(tmp_path, tiny_model_dir, store):
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "student_prompt": SHORT_STUDENT, "config": {"max_steps": 2, **FAST}}])
    result = run_wheel(load_run_spec(run_yaml), store)
    assert result.stages[1].decision == "rejected" and "not significantly better: McNemar" in result.stages[1].reason


def test_rft_without_reward_signal_says_so_and_does_not_train(tmp_path, tiny_model_dir, store):
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "config": {"max_steps": 2, **FAST}},
        {"stage": "rft", "config": {"max_steps": 1, "num_generations": 2, **FAST}}])
    result = run_wheel(load_run_spec(run_yaml), store)
    rft = result.stages[2]
    assert rft.decision == "failed" and rft.reason.startswith("no reward signal")
    # The probe sampled the tuned checkpoint (RL starts from it, not from the base model) and nothing trained.
    probe = next(it for it in store.iterations(result.run_id) if it.stage == "rft-probe")
    assert "+" in probe.model_ref
    assert store.db.execute("select count(*) from checkpoints where method = 'rft'").fetchone()[0] == 0


def test_laps_repeat_the_stages_and_the_cost_goal_stops_the_run(tmp_path, tiny_model_dir, store):
    stages = [{"stage": "capture", "teacher": "reference:label", "laps": [1]},
              {"stage": "sft", "student_prompt": SHORT_STUDENT, "config": {"max_steps": 2, **FAST}, "laps": [1]},
              {"stage": "sft", "config": {"max_steps": 1, **FAST}, "laps": [2]}]
    goal = {"minimise": "prompt_tokens", "margin": 0.05}
    two = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages, laps=2, goal=goal)), store)
    assert [(o.lap, o.stage) for o in two.stages] == [(1, "capture"), (1, "sft"), (2, "sft")]
    assert set(two.lap_wall_s) == {1, 2} and two.stopped == "2 lap(s) ran"
    # With `at_most` between the student's and the baseline's cost, the goal is met after lap 1's SFT
    # (promoted: cheaper, non-inferior) and lap 2 never runs.
    base, final = two.milestones[0].cost["prompt_tokens"], two.milestones[-1].cost["prompt_tokens"]
    assert final < base
    met = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages, laps=2, goal={
        "minimise": "prompt_tokens", "margin": 0.05, "at_most": (base + final) / 2})), store)
    assert [(o.lap, o.stage) for o in met.stages] == [(1, "capture"), (1, "sft")]
    assert "cost goal met" in met.stopped


@pytest.mark.slow
def test_sigkill_in_the_second_lap_then_resume(tmp_path, tiny_model_dir):
    run_yaml = write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label", "laps": [1]},
        {"stage": "sft", "config": {"max_steps": 2, **FAST}, "laps": [1]},
        {"stage": "sft", "config": {"max_steps": 40, **FAST}, "laps": [2]}], rows=make_rows(12), laps=2)
    db = tmp_path / "w.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flywheel", "run", str(run_yaml), "--db", str(db), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Lap 2's SFT is training: the second training job is running.
    assert _wait_for(db, "select (select count(*) from training_jobs) >= 2", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        run_id = conn.execute("select id from runs where kind = 'wheel'").fetchone()[0]
    store = Store.open(db)
    assert store.run_state(run_id, WheelState).stages
    store.close()
    finished = subprocess.run([sys.executable, "-m", "flywheel", "run", "--resume", run_id, "--db", str(db), "--json"],
                              capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert [(s["lap"], s["stage"]) for s in result["stages"]] == [(1, "capture"), (1, "sft"), (2, "sft")]
    store = Store.open(db)
    assert store.db.execute("select count(*) from runs where kind = 'wheel'").fetchone()[0] == 1
    dupes = store.db.execute("select count(*) from (select iteration_id, item_key, repeat, count(*) c from samples"
                             " group by 1, 2, 3 having c > 1)").fetchone()[0]
    assert dupes == 0
    assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 2  # one per SFT stage
    store.close()


def test_capture_from_the_tuned_model_with_its_own_prompt(tmp_path, tiny_model_dir, store):
    # `teacher: tuned`: the model DPO would polish (here the rejected SFT checkpoint), sampled with the
    # student prompt it was measured with: on-policy pairs.
    result = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, [
        {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "student_prompt": SHORT_STUDENT, "config": {"max_steps": 2, **FAST}},
        {"stage": "capture", "teacher": "tuned", "n": 2, "limit": 3}])), store)
    capture = result.stages[2]
    assert capture.decision == "captured" and f"covered by local:{tiny_model_dir}+" in capture.reason
    row = store.db.execute("select prompt_id, n from teacher_captures order by created_at desc limit 1").fetchone()
    assert json.loads(store.db["prompts"].get(row[0])["messages_json"]) == SHORT_STUDENT and row[1] == 2


@pytest.mark.parametrize("config, message", [
    ({"valid_subset": 4}, "config: valid_subset scores the checkpoints saved every save_steps"),
    ({"keep": "bset"}, "config.keep: keep must be best, all or a number N >= 1"),
    ({"early_stoping": {"metric": "valid_loss"}}, "config.early_stoping: unknown field"),
    ({"eval_steps": 2, "early_stopping": "valid_scor"}, "config.early_stopping.metric: Input should be"),
])
def test_a_training_stages_config_is_checked_when_the_run_spec_loads(tmp_path, config, message):
    path = write_run(tmp_path, tmp_path, [{"stage": "capture", "teacher": "reference:label"},
                                          {"stage": "sft", "config": {"max_steps": 2, **config}}])
    result = CliRunner().invoke(main, ["run", str(path), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {path}: stages[1].sft: {message}"), result.output
    assert not (tmp_path / "x.db").exists() or not Store.open(tmp_path / "x.db").db["runs"].count


def test_a_training_stage_with_validation_proposes_its_best_checkpoint(tmp_path, tiny_model_dir, store):
    """One sft stage that validates every 2 steps, scores each saved checkpoint on 3 valid items, may
    stop early and keeps 2 folders: the wheel proposes the job's best checkpoint by the graders."""
    from flywheel.train.validation import choose_best

    stages = [{"stage": "capture", "teacher": "reference:label"},
              {"stage": "sft", "config": {"max_steps": 6, "learning_rate": 2e-2, "logging_steps": 1, **FAST,
                                          "eval_steps": 2, "valid_subset": 3, "keep": 2,
                                          "early_stopping": {"metric": "valid_score", "patience": 2}}}]
    logged = []
    result = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages)), store, on_event=lambda e: logged.append(e.message),
                       report_dir=str(tmp_path / "reports"))
    sft = result.stages[1]
    assert sft.decision in ("promoted", "rejected"), sft.reason
    [job] = store.db["training_jobs"].rows
    saved = store.job_checkpoints(job["id"])  # pruned ones too
    assert job["status"] == "succeeded" and [c.step for c in saved][:2] == [2, 4]
    assert all(c.metrics.get("valid_score") is not None and c.metrics.get("valid_loss") is not None for c in saved)
    best, why = choose_best(saved)
    assert job["checkpoint_id"] == best.id and f"checkpoint {best.id}" in sft.reason
    assert any(f"best of {len(saved)} checkpoints: {why}" in line for line in logged), logged
    assert sum(1 for c in saved if c.pruned_at is None) == min(2, len(saved))  # keep: 2
    iteration = next(it for it in store.iterations(result.run_id) if it.stage == "sft")
    assert iteration.model_ref == best.model_ref
    html = open(result.report_path, encoding="utf-8").read()
    assert 'aria-label="train and valid loss by step"' in html and best.id in html


def test_the_stop_reason_names_the_target(tmp_path, tiny_model_dir, store):
    """Laps done without the target say which target was missed; a cost to minimise with no bound
    does not hide a met score target (it read "1 lap(s) ran")."""
    stages = [{"stage": "capture", "teacher": "reference:label"}]
    missed = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages, target=1.01)), store)
    assert missed.stopped.startswith("1 lap(s) ran; target 1.01 not met on valid ("), missed.stopped
    met = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages, target=0.0,
                                            goal={"minimise": "prompt_tokens"})), store)
    assert met.stages == [] and met.stopped.startswith("target 0.0 reached on valid"), met.stopped
