"""The wheel's weight stages under `accelerate launch` (issue 17): the `launcher` setting, validated
with the run spec, and a real 2-process CPU launch inside `flywheel run`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_rows, spec_dict, write_jsonl
from test_train_launch import worker_marker

from flywheel.errors import SpecError
from flywheel.run_spec import load_run_spec
from flywheel.train.launch import LaunchSpec

ROOT = Path(__file__).resolve().parents[1]
FAST = {"precision": "fp32", "batch_size": 2, "logging_steps": 1}


def write_run(folder: Path, model_dir, sft: dict) -> Path:
    write_jsonl(folder / "data.jsonl", make_rows(6))
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{model_dir}")))
    (folder / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "stages": [
        {"stage": "capture", "teacher": "reference:label"}, {"stage": "sft", **sft}]}))
    return folder / "run.yaml"


def test_the_launcher_setting_is_validated_with_the_run_spec(tmp_path):
    def load(sft: dict):
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "stages": [{"stage": "sft", **sft}]}))
        return load_run_spec(tmp_path / "run.yaml")

    spec = load({"launcher": {"kind": "accelerate", "num_processes": 2, "cpu": True}})
    launcher = spec.stages[0].launcher
    assert (launcher.kind, launcher.num_processes, launcher.cpu) == ("accelerate", 2, True)
    assert load({}).stages[0].launcher.kind == "local"
    cases = [({"launcher": {"num_processes": 2}}, "need kind: accelerate"),
             ({"launcher": {"kind": "deepspeed"}}, "launcher.kind"),
             ({"launcher": {"kind": "accelerate", "config_file": "zero9"}}, "neither a shipped template"),
             ({"launcher": {"kind": "accelerate", "procs": 2}}, "launcher.procs"),
             ({"config": {"lora": {"rr": 4}}}, "config.lora.rr: unknown field"),
             ({"config": {"report_to": ["comet"]}}, "config.report_to.0")]
    for sft, message in cases:
        with pytest.raises(SpecError, match="run.yaml: stages") as caught:
            load(sft)
        assert message in str(caught.value), str(caught.value)


def test_a_missing_tracker_package_fails_the_run_spec_at_load(tmp_path, monkeypatch):
    import importlib.util

    # The only double: "is wandb installed?" answers no, as on a machine without the extra.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "stages": [
        {"stage": "sft", "config": {"report_to": ["wandb"]}}]}))
    with pytest.raises(SpecError, match=r"config.report_to: wandb needs the wandb package.*flywheel\[wandb\]"):
        load_run_spec(tmp_path / "run.yaml")


def test_a_config_file_resolves_against_the_run_spec_folder(tmp_path):
    (tmp_path / "mine.yaml").write_text("compute_environment: LOCAL_MACHINE\n")
    spec = LaunchSpec(kind="accelerate", config_file="mine.yaml").resolved(tmp_path)
    assert spec.config_file == str((tmp_path / "mine.yaml").resolve())
    assert LaunchSpec(kind="accelerate", config_file="ddp").resolved(tmp_path).config_file == "ddp"


@pytest.mark.slow
def test_the_wheel_trains_sft_under_a_two_process_cpu_accelerate_launch(tmp_path, tiny_model_dir):
    run_yaml = write_run(tmp_path, tiny_model_dir, {
        "config": {"max_steps": 2, **FAST},
        "launcher": {"kind": "accelerate", "num_processes": 2, "cpu": True}})
    db = tmp_path / "flywheel.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ran = subprocess.run([sys.executable, "-m", "flywheel", "run", str(run_yaml), "--db", str(db), "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)  # the launched processes' output did not reach the wheel's stdout
    sft = result["stages"][1]
    assert sft["stage"] == "sft" and sft["decision"] in ("promoted", "rejected"), sft
    with sqlite3.connect(db) as conn:
        checkpoints = conn.execute("SELECT id, model_ref, metrics_json, job_id FROM checkpoints").fetchall()
        jobs = conn.execute("SELECT id, status FROM training_jobs").fetchall()
        iteration = conn.execute("SELECT model_ref FROM iterations WHERE stage = 'sft' AND split = 'valid'").fetchone()
        checks = conn.execute("SELECT checks_json FROM training_sets WHERE kind = 'sft'").fetchone()[0]
    assert len(checkpoints) == 1 and checkpoints[0][0] in sft["reason"]  # registered once, by the main process
    assert json.loads(checkpoints[0][2])["processes"] == 2 and json.loads(checkpoints[0][2])["steps"] == 2
    assert jobs == [(checkpoints[0][3], "succeeded")]
    assert iteration[0] == checkpoints[0][1]  # the wheel evaluated the checkpoint the launch registered
    assert json.loads(checks)["examples"] == 6  # the data checks ran before the launch


@pytest.mark.slow
def test_ctrl_c_during_a_launched_stage_stops_the_wheel_and_every_process(tmp_path, tiny_model_dir):
    import signal
    import time

    run_yaml = write_run(tmp_path, tiny_model_dir, {
        "config": {"max_steps": 100000, **FAST},
        "launcher": {"kind": "accelerate", "num_processes": 2, "cpu": True}})
    db = tmp_path / "flywheel.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    wheel = subprocess.Popen([sys.executable, "-m", "flywheel", "run", str(run_yaml), "--db", str(db)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline, steps = time.monotonic() + 600, 0
    while time.monotonic() < deadline and wheel.poll() is None and steps < 2:
        time.sleep(1)
        try:
            with sqlite3.connect(db) as conn:
                steps = conn.execute("SELECT count(*) FROM training_events WHERE type = 'metrics'").fetchone()[0]
        except sqlite3.OperationalError:
            steps = 0
    assert steps >= 2, "training never started"
    wheel.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = wheel.communicate(timeout=180)
    assert wheel.returncode != 0 and "Aborted" in err
    assert "lap 1 stage 2/2 sft" in out + err and "-> failed" not in out + err  # not a stage failure: stopped
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT status, error FROM training_jobs").fetchall()
        checkpoints = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    assert len(jobs) == 1 and jobs[0][0] == "failed" and "KeyboardInterrupt" in jobs[0][1] and checkpoints == 0
    leftovers = subprocess.run(["pgrep", "-f", worker_marker(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""  # no worker outlived the wheel
