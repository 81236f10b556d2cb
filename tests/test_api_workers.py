"""Job workers as processes (`serve --api --worker-processes`): real worker processes run eval runs
on a tiny model, honour cancel, stop with the server, and die with it when it is SIGKILLed (their
running job goes back to the queue and finishes after a restart)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from api_helpers import client_for, completions_source, create_eval, items, wait_run
from flywheel.api.app import create_api_app
from flywheel.store import Store
from flywheel.web import BackgroundServer
from test_api_jobs import start_server, wait_for


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_processes_run_and_cancel_jobs_and_stop_with_the_server(tmp_path, tiny_model_dir):
    app = create_api_app(str(tmp_path / "w.db"), workers=2, worker_processes=True)
    with BackgroundServer(app) as server:
        pool = app.state.api.queue
        pids = [p.pid for p in pool.processes]
        assert len(set(pids)) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
        client = client_for(server.url)
        evaluation = create_eval(client)
        runs = [client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_content", "content": items(3)})) for _ in range(3)]
        for run in runs:
            done = wait_run(client, evaluation.id, run.id)
            assert done.status == "completed" and done.result_counts.total == 3, done.error
        long = client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_content", "content": items(400)}, max_tokens=16))
        wait_for(lambda: client.evals.runs.retrieve(long.id, eval_id=evaluation.id).status == "in_progress", 120)
        client.evals.runs.cancel(long.id, eval_id=evaluation.id)
        stopped = wait_run(client, evaluation.id, long.id, timeout=60)
        assert stopped.status == "canceled" and stopped.result_counts.total < 400
    assert [p.poll() for p in pool.processes] == [] and not any(alive(p) for p in pids)  # stopped, reaped
    store = Store.open(tmp_path / "w.db")
    try:
        attempts = [job["attempts"] for job in store.api_list("api_jobs", order="asc", limit=100)[0]]
        assert attempts == [1, 1, 1, 1]  # each job ran once, in one of the processes
    finally:
        store.close()


@pytest.mark.slow
def test_worker_processes_die_with_a_killed_server_and_their_job_finishes_after_restart(tmp_path, tiny_model_dir):
    db = tmp_path / "flywheel.db"
    proc, url = start_server(db, "--worker-processes")
    try:
        client = client_for(url)
        evaluation = create_eval(client)
        run = client.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_content", "content": items(400)}, max_tokens=16))
        wait_for(lambda: len(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=5).data) > 0,
                 timeout=120)
        workers = children(proc.pid)
        assert workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers):
        assert time.monotonic() < deadline, "a worker outlived its server"
        time.sleep(0.1)
    proc, url = start_server(db)
    try:
        client = client_for(url)
        done = wait_run(client, evaluation.id, run.id)
        assert done.status == "completed" and done.result_counts.total == 400, done.error
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    store = Store.open(db)
    try:
        job = store.api_list("api_jobs", order="asc")[0][0]
        assert (job["status"], job["attempts"]) == ("succeeded", 2)
    finally:
        store.close()


@pytest.mark.slow
def test_no_worker_outlives_a_server_sigkilled_five_times(tmp_path, tiny_model_dir):
    # Killed at different moments: as the workers start, and while one runs a job. The kernel kills
    # each worker with its server (PR_SET_PDEATHSIG=SIGKILL, set before exec); the job is taken over
    # by the next server once its lease runs out, and finishes.
    db = tmp_path / "flywheel.db"
    survivors: list[int] = []
    run = evaluation = None
    for attempt in range(5):
        proc, url = start_server(db, "--worker-processes", "--workers", "2")
        try:
            wait_for(lambda: len(children(proc.pid)) == 2)
            workers = children(proc.pid)
            if attempt % 2:
                client = client_for(url)
                if run is None:
                    evaluation = create_eval(client)
                    run = client.evals.runs.create(evaluation.id, data_source=completions_source(
                        tiny_model_dir, {"type": "file_content", "content": items(400)}, max_tokens=16))
                wait_for(lambda: client.evals.runs.retrieve(run.id, eval_id=evaluation.id).status == "in_progress",
                         120)
                workers = children(proc.pid)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert workers
        # "At once": a SIGKILL from the kernel; a worker that stops gracefully instead (it used to, on a
        # SIGTERM: it waited for its job's next batch, paying as it went) takes seconds.
        deadline = time.monotonic() + 3
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in workers if alive(p)]
        survivors += left
        for pid in left:  # leave nothing behind for the next round, whatever the outcome
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert survivors == []
