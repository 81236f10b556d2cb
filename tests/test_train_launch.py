"""`flywheel train --launcher accelerate`: the real `accelerate launch`, 2 CPU processes over gloo."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_helpers import write_eval

from flywheel.cli import main
from flywheel.models.loading import dir_fingerprint
from flywheel.train.launch import LaunchSpec, accelerate_command, launch_env, templates

ROOT = Path(__file__).resolve().parents[1]


def worker_marker(folder: Path) -> str:
    """A `pgrep -f` pattern matching the command line of every launched process of a store in
    `folder` (`python -m flywheel.train.worker <folder>/.flywheel/tmp/launch-.../request.json ...`)."""
    return f"flywheel.train.worker {folder}"


def test_cpu_processes_use_torchrun_and_the_cpu_switch():
    spec = LaunchSpec(kind="accelerate", num_processes=2, cpu=True)
    command = accelerate_command(spec, ["flywheel.train.worker", "request.json", "result.json"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # accelerate's own --cpu would start one process: N > 1 CPU processes go through torchrun.
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert int(command[command.index("--main_process_port") + 1]) > 0
    assert command[-4:] == ["-m", "flywheel.train.worker", "request.json", "result.json"]
    assert launch_env(spec)["ACCELERATE_USE_CPU"] == "true"
    one = accelerate_command(LaunchSpec(kind="accelerate", cpu=True), ["flywheel.train.worker"])
    assert "--cpu" in one and "--multi_gpu" not in one


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_shipped_templates_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(templates()[name]))
    assert config.distributed_type.value == kind and config.num_machines == 1
    command = accelerate_command(LaunchSpec(kind="accelerate", config_file=name), ["flywheel.train.worker"])
    assert command[command.index("--config_file") + 1] == str(templates()[name])


def test_a_multi_node_config_keeps_its_own_port(tmp_path):
    import yaml

    config = yaml.safe_load(templates()["ddp"].read_text())
    config.update(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555)
    path = tmp_path / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    command = accelerate_command(LaunchSpec(kind="accelerate", config_file=str(path)), ["flywheel.train.worker"])
    assert "--main_process_port" not in command  # every node must use the config's 29555
    pinned = accelerate_command(LaunchSpec(kind="accelerate", config_file=str(path),
                                           main_process_port=29600), ["flywheel.train.worker"])
    assert pinned[pinned.index("--main_process_port") + 1] == "29600"


def test_a_missing_config_is_one_clean_error_before_anything_starts(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    result = CliRunner().invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}",
                                       "--launcher", "accelerate", "--accelerate-config", "nope.yaml",
                                       "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    assert result.output.startswith("error: --accelerate-config: no file 'nope.yaml' and no template")
    assert "ddp, deepspeed_zero2" in result.output
    assert not (tmp_path / "f.db").exists()  # nothing was started or stored


def test_launcher_options_without_the_accelerate_launcher_are_a_usage_error(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    result = CliRunner().invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}",
                                       "--num-processes", "2", "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 2 and "--launcher accelerate" in result.output


@pytest.mark.slow
def captured_eval(tmp_path, model_dir):
    """An eval spec on the model and a store holding its reference-label capture: (spec, db)."""
    spec = write_eval(tmp_path, f"local:{model_dir}")
    db = tmp_path / "flywheel.db"
    captured = CliRunner().invoke(main, ["capture", str(spec), "--teacher", "reference:label", "--db", str(db)])
    assert captured.exit_code == 0, captured.output
    return spec, db


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_cpu_processes_train_one_checkpoint(tmp_path, tiny_model_dir, method):
    spec, db = captured_eval(tmp_path, tiny_model_dir)
    if method == "dpo":  # pairs need worse outputs too: the student's own (as tests/test_train_dpo.py)
        worse = CliRunner().invoke(main, ["capture", str(spec), "--teacher", f"local:{tiny_model_dir}",
                                          "--n", "2", "--temperature", "1.0", "--db", str(db), "--json"])
        assert worse.exit_code == 0, worse.output
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    trained = subprocess.run(
        [sys.executable, "-m", "flywheel", "train", method, str(spec), "--base", f"local:{tiny_model_dir}",
         "-s", "max_steps=2", "-s", "precision=fp32", "-s", "batch_size=2", "-s", "learning_rate=0.01",
         "-s", "logging_steps=1", "--no-eval", "--db", str(db), "--json",
         "--launcher", "accelerate", "--num-processes", "2", "--cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads(trained.stdout)  # one result: only the main process prints
    assert result["metrics"]["processes"] == 2 and result["metrics"]["steps"] == 2
    checkpoint = result["checkpoint"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, path, adapter_hash, job_id FROM checkpoints").fetchall()
        jobs = conn.execute("SELECT id, status FROM training_jobs").fetchall()
        events = conn.execute("SELECT count(*) FROM training_events WHERE type = 'metrics'").fetchone()[0]
    assert len(rows) == 1 and rows[0][0] == checkpoint["id"]  # registered once
    assert jobs == [(rows[0][3], "succeeded")]
    assert events >= 2  # the main process streamed its logs into the store
    assert dir_fingerprint(Path(rows[0][1]))[:16] == rows[0][2] == checkpoint["adapter_hash"]


@pytest.mark.slow
def test_an_interrupted_launch_stops_every_process_and_fails_the_job(tmp_path, tiny_model_dir):
    import signal
    import time

    spec, db = captured_eval(tmp_path, tiny_model_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flywheel", "train", "sft", str(spec), "--base", f"local:{tiny_model_dir}",
         "-s", "max_steps=100000", "-s", "precision=fp32", "-s", "batch_size=2", "-s", "logging_steps=1",
         "--no-eval", "--db", str(db), "--launcher", "accelerate", "--num-processes", "2", "--cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    steps = 0
    while time.monotonic() < deadline and launcher.poll() is None and steps < 2:
        time.sleep(1)
        with sqlite3.connect(db) as conn:
            try:
                steps = conn.execute("SELECT count(*) FROM training_events WHERE type = 'metrics'").fetchone()[0]
            except sqlite3.OperationalError:
                steps = 0
    assert steps >= 2, "training never started"
    launcher.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 1
    assert "error: accelerate launch interrupted (SIGINT)" in err
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT status, error FROM training_jobs").fetchall()
        checkpoints = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    assert len(jobs) == 1 and jobs[0][0] == "failed" and "KeyboardInterrupt" in jobs[0][1]
    assert checkpoints == 0
    leftovers = subprocess.run(["pgrep", "-f", worker_marker(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""  # no worker outlived the launcher


@pytest.mark.slow
def test_two_cpu_processes_validate_register_each_checkpoint_once_and_stop_together(tmp_path, tiny_model_dir):
    """Only the main process scores and registers; the valid-score stop decision reaches both."""
    spec, db = captured_eval(tmp_path, tiny_model_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    trained = subprocess.run(
        [sys.executable, "-m", "flywheel", "train", "sft", str(spec), "--base", f"local:{tiny_model_dir}",
         "-s", "max_steps=6", "-s", "precision=fp32", "-s", "batch_size=2", "-s", "logging_steps=1",
         "-s", "eval_steps=1", "-s", "save_steps=1", "-s", "valid_subset=2", "-s", "keep=all",
         "-s", "early_stopping.metric=valid_score", "-s", "early_stopping.patience=1",
         "--no-eval", "--db", str(db), "--json", "--launcher", "accelerate", "--num-processes", "2", "--cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads(trained.stdout)
    # The tiny model scores 0 at every checkpoint: no improvement after the first, so both processes stop at 2.
    assert result["stop_reason"].startswith("early stopping at step 2: valid_score")
    assert result["metrics"]["processes"] == 2 and result["metrics"]["steps"] == 2
    with sqlite3.connect(db) as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM checkpoints ORDER BY step")]
    assert steps == [1, 2]


def _rank_zero_worker(marker: str) -> int | None:
    """The pid of the `accelerate launch` worker of rank 0 whose command line holds `marker`."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=0" in environ and b"LOCAL_RANK=0" in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_killed_launch_resumes_under_the_launcher_from_its_saved_step(tmp_path, tiny_model_dir):
    """SIGKILL the main worker after a saved step; `--resume JOB --launcher accelerate` finishes the job."""
    import signal
    import time

    spec, db = captured_eval(tmp_path, tiny_model_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launch = ["--launcher", "accelerate", "--num-processes", "2", "--cpu"]
    max_steps = 60
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flywheel", "train", "sft", str(spec), "--base", f"local:{tiny_model_dir}",
         "-s", f"max_steps={max_steps}", "-s", "precision=fp32", "-s", "batch_size=2", "-s", "logging_steps=1",
         "-s", "save_steps=3", "-s", "keep=all", "-s", "learning_rate=0.01", "--no-eval", "--db", str(db), *launch],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    saved, killed = [], None
    while time.monotonic() < deadline and launcher.poll() is None and not killed:
        time.sleep(0.2)
        saved = [p for p in (db.parent / ".flywheel" / "jobs").glob("*/checkpoint-*/trainer_state.json")]
        if saved:
            killed = _rank_zero_worker(worker_marker(tmp_path))
            if killed:
                os.kill(killed, signal.SIGKILL)
    assert killed, f"no saved step before the run ended: {launcher.poll()}"
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1 and "error: accelerate launch exited with status" in err, err[-2000:]
    with sqlite3.connect(db) as conn:
        (job_id, status), = conn.execute("SELECT id, status FROM training_jobs").fetchall()
        before = dict(conn.execute("SELECT step, adapter_hash FROM checkpoints").fetchall())
    assert status != "succeeded" and before and max(before) < max_steps  # killed part-way, a step saved

    resumed = subprocess.run(
        [sys.executable, "-m", "flywheel", "train", "sft", str(spec), "--resume", job_id, "--no-eval",
         "--db", str(db), "--json", *launch],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)  # one result: only the main process prints
    assert result["job_id"] == job_id and result["metrics"]["processes"] == 2
    assert result["metrics"]["resumed_from_step"] in before and result["metrics"]["steps"] == max_steps
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT id, status FROM training_jobs").fetchall()
        rows = conn.execute("SELECT id, step, path, adapter_hash FROM checkpoints ORDER BY step").fetchall()
        resumes = conn.execute("SELECT count(*) FROM training_events WHERE type = 'resume'").fetchone()[0]
    assert jobs == [(job_id, "succeeded")] and resumes == 1
    steps = [r[1] for r in rows]
    assert len(steps) == len(set(steps)) and steps[-1] == max_steps  # each step registered once, by one process
    assert {s: h for _, s, _, h in rows if s in before} == before  # the steps saved before the kill are kept as they were
    chosen = [r for r in rows if r[0] == result["checkpoint"]["id"]]
    assert len(chosen) == 1  # one checkpoint chosen
    assert dir_fingerprint(Path(chosen[0][2]))[:16] == chosen[0][3] == result["checkpoint"]["adapter_hash"]
