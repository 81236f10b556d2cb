"""Job workers as processes (`serve --api --worker-processes`): the queue's workers outside the
server process, so training and generation never share the server's interpreter (and its GIL)
with request handling.

Each worker is `python -m flywheel.api.runners.workers --db PATH`: one `JobQueue` thread in its own
process, claiming jobs from the same `api_jobs` rows with the same guarded UPDATE (SQLite makes it
safe across processes), reading cancel / pause flags from the store as thread workers do. The
server re-queues orphaned jobs once at start, then starts the processes. Stopping the server sends
each a SIGTERM: its running job stops at its next check and returns to the queue, as with threads.
A worker whose server died (even by SIGKILL) gets a SIGTERM from the kernel (Linux
`PR_SET_PDEATHSIG`) or notices its parent is gone within a second, and does the same.

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

    def start(self) -> list[str]:
        """Re-queue orphaned jobs, then start the processes; returns the ids re-queued."""
        requeued = JobQueue(self.db_path, {}, workers=0).start()  # re-queues, starts no thread
        command = [sys.executable, "-m", "flywheel.api.runners.workers", "--db", self.db_path, "--parent", str(os.getpid()),
                   "--batch-size", str(self.batch_size), "--poll", str(self.poll_s)]
        self.processes = [subprocess.Popen(command) for _ in range(self.workers)]
        return requeued

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


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (elsewhere: the polling below)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """A worker process: run the queue until SIGTERM or until the parent is gone."""
    parser = argparse.ArgumentParser(prog="python -m flywheel.api.runners.workers")
    parser.add_argument("--db", required=True)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    _die_with_parent()
    queue = JobQueue(args.db, runners(args.batch_size), workers=1, poll_s=args.poll)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    queue.start(requeue=False)
    while not done.wait(1.0):
        if args.parent is not None and os.getppid() != args.parent:
            break  # the server is gone
    queue.stop()


if __name__ == "__main__":
    main()
