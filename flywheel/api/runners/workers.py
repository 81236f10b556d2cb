"""Job workers as processes (`serve --api --worker-processes`): the queue's workers outside the
server process, so training and generation never share the server's interpreter (and its GIL)
with request handling.

Each worker is `python -m flywheel.api.runners.workers --db PATH`: one `JobQueue` thread in its own
process, claiming jobs from the same `api_jobs` rows with the same guarded UPDATE and lease (SQLite
makes it safe across processes), reading cancel / pause flags from the store as thread workers do.
Stopping the server sends each a SIGTERM: its running job stops at its next check and returns to the
queue, as with threads.

A worker dies with its server, even a SIGKILLed one, at once: the kernel SIGKILLs it when the server
dies (Linux `PR_SET_PDEATHSIG`, set between fork and exec so no window is left open, and set from the
thread that lives as long as the server: the signal follows the *thread* that forked, so a pool
started from a short-lived thread would lose its workers early, and one started before the flag was
set in the child would keep them). Elsewhere, or if the kernel's signal was missed, the worker polls
its parent every second and exits at once when it is gone. A worker that dies this way leaves its job
`running` under a lease that runs out in `$FLYWHEEL_JOB_LEASE_S`; the next server takes it over, and
every call that came back is in the completion cache.

Local models take turns on the cores across processes too: `eval_runs.local_turn` holds a file
lock beside the store.

    pool = WorkerProcesses("flywheel.db", workers=2)
    pool.start(); ...; pool.stop()
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from flywheel.api.jobs import JobQueue
from flywheel.api.runners.eval_runs import EvalRunRunner
from flywheel.api.runners.fine_tuning import FineTuningRunner
from flywheel.api.runners.wheel_runs import WheelRunner


class WorkerProcesses:
    """`workers` worker processes over the store's queue, with `JobQueue`'s start / notify / stop."""

    def __init__(self, db_path: str, *, workers: int = 1, batch_size: int = 8, poll_s: float = 0.2):
        self.db_path = db_path
        self.workers = workers
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        """Start the processes, each set to die with this one (jobs left by a dead server are taken
        over by the workers once their lease runs out)."""
        command = [sys.executable, "-m", "flywheel.api.runners.workers", "--db", self.db_path, "--parent", str(os.getpid()),
                   "--batch-size", str(self.batch_size), "--poll", str(self.poll_s)]
        prctl = _prctl()
        die_with_parent = (lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)) if prctl else None
        self.processes = [subprocess.Popen(command, preexec_fn=die_with_parent) for _ in range(self.workers)]

    def notify(self) -> None:
        """Workers in other processes poll (every `poll_s`); nothing to wake here."""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (their running jobs return to the queue) and wait for them."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def runners(batch_size: int) -> dict:
    """The job kinds every worker runs (threads in the server, or these processes)."""

    return {"eval_run": EvalRunRunner(batch_size), "fine_tuning": FineTuningRunner(), "wheel_run": WheelRunner()}


_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's `prctl`, looked up here in the parent (the forked child, where other threads' locks may
    be held, only calls it); None off Linux, where the polling in `main` is the only guard."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> None:
    """A worker process: run the queue until SIGTERM or until the parent is gone."""
    parser = argparse.ArgumentParser(prog="python -m flywheel.api.runners.workers")
    parser.add_argument("--db", required=True)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)

    def orphaned() -> bool:
        return args.parent is not None and os.getppid() != args.parent

    if orphaned():  # the server died before this process got going
        os._exit(1)
    queue = JobQueue(args.db, runners(args.batch_size), workers=1, poll_s=args.poll)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    queue.start()
    while not done.wait(1.0):
        if orphaned():
            # The server is gone: nobody would stop this job, and another server may take it over
            # when its lease runs out, so the worker ends now rather than after its job's next batch.
            os._exit(1)
    queue.stop()


if __name__ == "__main__":
    main()
