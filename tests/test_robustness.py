"""Hostile and careless use through the real CLI: bad input is one clean line and loses no data;
two writers on one store never crash; a kill near the end of an eval keeps what was generated.

Real subprocesses (`python -m flywheel`) and real SQLite files; the model is the tiny Llama of
conftest.py.
"""

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
import yaml
from click.testing import CliRunner

from flywheel.cli import main

from conftest import make_rows, spec_dict, write_jsonl

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def one_clean_line(result, *needles: str) -> None:
    output = getattr(result, "output", None) or (result.stdout + result.stderr)
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code in (1, 2), output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for needle in needles:
        assert needle in lines[0], lines[0]


def runs_of(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select id, status from runs").fetchall()


@pytest.mark.parametrize("model, options, needle", [
    ("local:/etc", {}, "/etc is not a model folder"),
    ("local:/nonexistent", {}, "unknown local model '/nonexistent'"),
    ("local:smollm2", {"dtype": "int3"}, "unknown dtype 'int3'"),
    ("openai:x", {"base_url": "not a url"}, "is not an http(s) URL"),
    ("openai:gpt-4o-mini", {"api_key_env": "NO_SUCH_KEY_FOR_FLYWHEEL_TESTS"}, "no API key"),
])
def test_a_model_that_cannot_work_is_one_line_and_leaves_no_running_run(tmp_path, monkeypatch, model, options,
                                                                        needle):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(model, model_options=options)))
    db = tmp_path / "x.db"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "eval.yaml"), "--db", str(db)])
    one_clean_line(result, needle)
    assert all(status != "running" for _, status in runs_of(db)) if db.exists() else True


def test_report_into_a_missing_folder(tiny_spec, tmp_path):
    db = tmp_path / "r.db"
    run_id = json.loads(CliRunner().invoke(main, ["eval", str(tiny_spec), "--db", str(db), "--json"]).stdout)["run_id"]
    result = CliRunner().invoke(main, ["report", run_id, "--db", str(db), "-o", str(tmp_path / "no" / "r.html")])
    one_clean_line(result, "cannot write the report", "does not exist")


@pytest.mark.parametrize("item", ["[1]", "1", '"x"', "null"])
def test_graders_run_item_must_be_an_object(tmp_path, item):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"type": "string_check", "name": "a", "input": "{{sample.output_text}}",
                                "reference": "x", "operation": "eq"}))
    result = CliRunner().invoke(main, ["graders", "run", str(path), "--item", item, "--sample", "x"])
    assert result.exit_code == 2 and "must be a JSON object" in result.output and "Traceback" not in result.output


def test_a_db_missing_a_table_and_a_db_from_the_future(tiny_spec, tmp_path):
    db = tmp_path / "d.db"
    assert CliRunner().invoke(main, ["eval", str(tiny_spec), "--db", str(db)]).exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("pragma user_version = 99")
    before = db.read_bytes()
    one_clean_line(CliRunner().invoke(main, ["runs", "list", "--db", str(db)]), "newer flywheel", "99")
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        conn.execute("pragma user_version = 0")
        conn.execute("drop table grades")
    one_clean_line(CliRunner().invoke(main, ["eval", str(tiny_spec), "--db", str(db)]), "table grades missing")


def test_a_lock_held_past_the_timeout_is_one_line_naming_the_holder(tiny_spec, tmp_path):
    db = tmp_path / "busy.db"
    assert CliRunner().invoke(main, ["runs", "list", "--db", str(db)]).exit_code == 0  # create it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1]); "
         "c.execute('begin immediate'); print('locked', flush=True); time.sleep(120)", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = subprocess.run([sys.executable, "-m", "flywheel", "eval", str(tiny_spec), "--db", str(db)],
                                capture_output=True, text=True, env={**ENV, "FLYWHEEL_DB_TIMEOUT": "1"}, timeout=300)
        one_clean_line(result, str(db), "database is busy", f"pid {holder.pid}", "more than 1 s")
    finally:
        holder.kill()
        holder.wait()
    assert runs_of(db) == []  # nothing half-written


def _many_items_spec(tmp_path: Path, tiny_model_dir: Path, n: int, **options) -> Path:
    rows = [{"id": f"i{k}", "text": f"item number {k}", "label": "x", "split": "test"} for k in range(n)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    spec = spec_dict(f"local:{tiny_model_dir}", model_options=options)
    spec["sampling"]["max_tokens"] = 12
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "eval.yaml"


def test_the_same_eval_twice_at_once_both_succeed_with_one_copy_of_each_sample(tmp_path, tiny_model_dir):
    spec = _many_items_spec(tmp_path, tiny_model_dir, 40, batch_size=2)
    db = tmp_path / "two.db"  # a fresh file: the two processes also race the first migrations
    command = [sys.executable, "-m", "flywheel", "eval", str(spec), "--db", str(db), "--json"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert json.loads(out)["n_samples"] == 40
    with sqlite3.connect(db) as conn:
        per_iteration = conn.execute(
            "select iteration_id, count(*), count(distinct item_key) from samples group by iteration_id").fetchall()
        assert per_iteration and all(n == distinct == 40 for _, n, distinct in per_iteration)
        assert conn.execute("select count(*) from grades").fetchone()[0] == 40 * len(per_iteration)
        assert {status for (status,) in conn.execute("select status from runs")} == {"completed"}


@pytest.mark.parametrize("options, kill_at", [
    # Chunked generation (the path of remote models): the default local batch is 32, and before
    # commits by time the 60 items were one commit.
    ({"engine": "hf"}, 40),
    # The continuous decoder streams: one running batch of 8 rows, finished rows committed as they finish.
    ({"batch_size": 1}, 24),
], ids=["chunked", "streamed"])
def test_kill_near_the_end_of_a_60_item_eval_keeps_what_was_generated(tmp_path, tiny_model_dir, options, kill_at):
    spec = _many_items_spec(tmp_path, tiny_model_dir, 60, **options)
    db = tmp_path / "kill.db"
    command = [sys.executable, "-m", "flywheel", "eval", str(spec), "--db", str(db), "--json"]
    env = {**ENV, "FLYWHEEL_COMMIT_EVERY_S": "0.02"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stored, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    stored = conn.execute("select count(*) from samples").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
            if stored >= kill_at:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the eval finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        before = conn.execute("select count(*) from samples").fetchone()[0]
    assert kill_at <= before < 60
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    # Every item not committed is generated again or, when its answer came back before the kill, read
    # from the completion cache (written as each completion returns): none is paid twice.
    assert result["n_samples"] == 60 and result["resumed"] == before
    assert result["model_calls"] + result["cache_hits"] == 60 - before
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*), count(distinct item_key) from samples").fetchone() == (60, 60)


def test_a_second_writer_joining_a_running_eval_shares_its_run(tmp_path, tiny_model_dir):
    # The case that crashed with an IntegrityError: the second command finds the first's running
    # run and works on the same iteration; each sample is stored once, both commands succeed.
    spec = _many_items_spec(tmp_path, tiny_model_dir, 300, batch_size=2)
    db = tmp_path / "join.db"
    command = [sys.executable, "-m", "flywheel", "eval", str(spec), "--db", str(db), "--json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                if conn.execute("select count(*) from samples").fetchone()[0] >= 4:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.01)
    assert first.poll() is None, "the first eval finished before the second started; make it longer"
    # Hold the first still (SIGSTOP) while the second starts, so it cannot finish before the second
    # looks for a running run; resume it once the second has written (or after a while: the first
    # may have been stopped holding the write lock).
    first.send_signal(signal.SIGSTOP)
    with sqlite3.connect(db, timeout=1) as conn:
        before = conn.execute("select count(*) from samples").fetchone()[0]
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and second.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                if conn.execute("select count(*) from samples").fetchone()[0] > before:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    first.send_signal(signal.SIGCONT)
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert json.loads(out)["n_samples"] == 300
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*), count(distinct item_key) from samples").fetchone() == (300, 300)
        assert conn.execute("select count(*) from grades").fetchone()[0] == 300
        assert conn.execute("select count(*), min(status) from runs").fetchone() == (1, "completed")


# -- paid once: a remote model's calls are not paid twice, by a kill or by a second run ----------------
def _remote_spec(tmp_path: Path, url: str, n: int) -> Path:
    rows = [{"id": f"i{k}", "text": f"item number {k}", "label": "x", "split": "test"} for k in range(n)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    spec = spec_dict("openai:scripted", model_options={"base_url": f"{url}/v1", "max_retries": 0})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "eval.yaml"


def test_a_kill_before_the_commit_re_pays_no_call_that_came_back(tmp_path):
    # Four of six calls return, two stall: nothing is committed yet (the chunk is not done), but the
    # four answers are in the completion cache the moment they came back, so the resumed run pays
    # only the two that never returned.
    from flywheel.web import BackgroundServer
    from serving_helpers import ScriptedUpstream

    upstream = ScriptedUpstream(plan=["ok"] * 4 + ["stall"] * 2, stall_s=15)
    db = tmp_path / "kill.db"
    with BackgroundServer(upstream.app) as server:
        command = [sys.executable, "-m", "flywheel", "eval", str(_remote_spec(tmp_path, server.url, 6)), "--db",
                   str(db), "--json"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        cached, deadline = 0, time.monotonic() + 60
        while cached < 4 and time.monotonic() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    cached = conn.execute("select count(*) from completion_cache").fetchone()[0]
            except sqlite3.Error:
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert cached == 4, "the answers that came back were not cached before the commit"
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from samples").fetchone()[0] == 0  # killed before the commit
        paid = len(upstream.bodies)
        finished = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout)
    assert result["n_samples"] == 6 and result["model_calls"] == 2
    assert len(upstream.bodies) - paid == 2


def test_the_same_remote_eval_twice_at_once_pays_each_call_once(tmp_path):
    # Two runs of one eval at the same time used to pay nearly every call twice (they walk the items
    # in the same order); now a request one run is generating is claimed, and the other waits for its
    # answer in the cache.
    from flywheel.web import BackgroundServer
    from serving_helpers import ScriptedUpstream

    upstream = ScriptedUpstream(hold_s=0.05)
    db = tmp_path / "two.db"
    with BackgroundServer(upstream.app) as server:
        command = [sys.executable, "-m", "flywheel", "eval", str(_remote_spec(tmp_path, server.url, 40)), "--db",
                   str(db), "--json"]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert json.loads(out)["n_samples"] == 40
    assert len(upstream.bodies) == 40
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from completion_claims").fetchone()[0] == 0  # all released
