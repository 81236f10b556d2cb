"""The API's job queue: no job runs twice, cancel and stop are honoured, and a run killed with the
server (SIGKILL of a real `flywheel serve --api` process) finishes after a restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from api_helpers import client_for, completions_source, create_eval, items, wait_run
from flywheel.api.jobs import JobContext, JobQueue
from flywheel.store import Store

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A runner that records each job it runs (and can be told to spin until stopped)."""

    def __init__(self, spin: bool = False):
        self.ran: list[str] = []
        self.settled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.spin = spin
        self.started = threading.Event()

    def run(self, ctx: JobContext) -> None:
        with self.lock:
            self.ran.append(ctx.job["object_id"])
        self.started.set()
        while self.spin:
            ctx.check()
            time.sleep(0.01)
        time.sleep(0.002)

    def settle(self, store, job, status, error) -> None:
        with self.lock:
            self.settled.append((job["object_id"], status))


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_four_workers_run_every_job_exactly_once(tmp_path):
    db = str(tmp_path / "q.db")
    store = Store.open(db)
    for index in range(60):
        store.enqueue_job(f"job-{index}", "noop", f"obj-{index}")
    recorder = Recorder()
    queue = JobQueue(db, {"noop": recorder}, workers=4, poll_s=0.01)
    queue.start()
    try:
        wait_for(lambda: store.count_jobs() == {"succeeded": 60})
    finally:
        queue.stop()
        store.close()
    assert Counter(recorder.ran) == Counter(f"obj-{i}" for i in range(60))
    assert len(recorder.settled) == 60


def test_cancel_stops_a_running_job_and_stop_requeues_one(tmp_path):
    db = str(tmp_path / "q.db")
    store = Store.open(db)
    store.enqueue_job("job-a", "spin", "obj-a")
    recorder = Recorder(spin=True)
    queue = JobQueue(db, {"spin": recorder}, workers=1, poll_s=0.01)
    queue.start()
    try:
        recorder.started.wait(10)
        store.request_job_cancel("obj-a")
        wait_for(lambda: store.count_jobs() == {"cancelled": 1})
        assert recorder.settled == [("obj-a", "cancelled")]
        recorder.started.clear()
        store.enqueue_job("job-b", "spin", "obj-b")
        recorder.started.wait(10)
    finally:
        queue.stop()
    # stopped mid-job: back in the queue for the next start, not failed
    assert store.api_get("api_jobs", "job-b")["status"] == "queued"
    store.close()


SPIN_WORKER = """
import os, signal, sys, threading, time
from flywheel.api.jobs import JobQueue

db, log = sys.argv[1], sys.argv[2]

class Spin:
    def run(self, ctx):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {ctx.job['id']}\\n")
        while True:
            ctx.check()
            time.sleep(0.02)

    def settle(self, store, job, status, error):
        pass

queue = JobQueue(db, {"spin": Spin()}, workers=1, poll_s=0.02)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
queue.start()
print("started", flush=True)
done.wait()
queue.stop()
"""


def start_spin_worker(tmp_path: Path, db: Path, log: Path, lease_s: float) -> subprocess.Popen:
    script = tmp_path / "spin_worker.py"
    script.write_text(SPIN_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYWHEEL_JOB_LEASE_S": str(lease_s)}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(log)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "started"
    return proc


def test_a_second_process_on_the_store_neither_steals_a_live_job_nor_loses_a_dead_ones(tmp_path):
    # Two queues in two real processes on one store (as two `serve --api` would be): the second one
    # starting must not take the job the first runs under a live lease (it used to re-queue every
    # `running` job at start, and both ran it); once the first is SIGKILLed, its lease runs out and
    # the second takes the job over.
    db, log, lease_s = tmp_path / "q.db", tmp_path / "ran.log", 1.5
    store = Store.open(db)
    store.enqueue_job("job-a", "spin", "obj-a")
    first = start_spin_worker(tmp_path, db, log, lease_s)
    second = None
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") == 1)
        second = start_spin_worker(tmp_path, db, log, lease_s)
        held = store.api_get("api_jobs", "job-a").get("lease_expires_at")
        # Two leases: the second queue polls all the while, and the first must renew to keep the job.
        time.sleep(2 * lease_s)
        assert log.read_text().split() == [str(first.pid), "job-a"]
        assert store.api_get("api_jobs", "job-a")["lease_expires_at"] > held  # renewed by the heartbeat
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: log.read_text().count("\n") == 2)
        assert log.read_text().split() == [str(first.pid), "job-a", str(second.pid), "job-a"]
        job = store.api_get("api_jobs", "job-a")
        assert (job["status"], job["attempts"]) == ("running", 2)
        assert any("resumed after a server restart" in e["message"]
                   for e in store.api_events("obj-a", limit=10)[0])
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        store.close()


def start_server(db: Path, *options: str) -> tuple[subprocess.Popen, str]:
    # A short lease: a job the killed server left `running` is taken over by the restarted one soon.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "FLYWHEEL_JOB_LEASE_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--api", "--port", "0", "--db", str(db),
                             *options],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=db.parent)
    for line in proc.stderr:
        match = re.search(r"serving the API at (http://[\d.]+:\d+)/v1", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, match.group(1)
    raise AssertionError(f"server did not start (exit {proc.wait()})")


@pytest.mark.slow
def test_a_run_killed_with_the_server_finishes_after_restart(tmp_path, tiny_model_dir):
    db = tmp_path / "flywheel.db"
    proc, url = start_server(db)
    try:
        client = client_for(url)
        evaluation = create_eval(client)
        run = client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_content", "content": items(400)}, max_tokens=16))

        def some_done():
            return len(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=5).data) > 0

        wait_for(some_done, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = Store.open(db)
    (job,), _ = store.api_list("api_jobs")
    store.close()
    assert (job["status"], job["attempts"]) == ("running", 1)  # as the dead server left it

    proc, url = start_server(db)
    try:
        client = client_for(url)
        done = wait_run(client, evaluation.id, run.id)
        assert done.status == "completed", done.error
        assert done.result_counts.total == 400
        listed = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=100))
        assert sorted(i.datasource_item_id for i in listed) == list(range(400))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    store = Store.open(db)
    try:
        (job,), _ = store.api_list("api_jobs")
        assert (job["status"], job["attempts"]) == ("succeeded", 2)
        runs = store.list_runs()
        assert len(runs) == 1 and runs[0].status == "completed"  # the harness resumed its own run
        events, _ = store.api_events(run.id, limit=100, newest_first=False)
        assert any("resumed after a server restart" in e["message"] for e in events)
    finally:
        store.close()
