"""The job queue: work (eval runs, fine-tuning jobs) as rows of `api_jobs`, run by worker threads.

A job goes queued -> running (<-> paused) -> succeeded | failed | cancelled. A worker claims the oldest queued
job with one guarded UPDATE, so no job runs twice at once. A job found `running` when the server
starts belonged to a server that died: it goes back to the queue, and its runner resumes (the
harness and the trainers skip what they already stored). Cancelling sets a flag that the running
job reads between batches (`JobContext.check`), so it stops within a batch; a queued job is
cancelled at once. Stopping the server puts its running jobs back in the queue. A pause (fine-
tuning jobs) is a flag read like cancel: the job leaves the queue as `paused` until resumed.

    queue = JobQueue(db_path, {"eval_run": EvalRunRunner()}, workers=1)
    queue.start(); ...; queue.stop()
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Protocol

from flywheel.store import Store

log = logging.getLogger("flywheel.api")

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")


def new_object_id(prefix: str) -> str:
    """A platform-looking id: `eval_…`, `evalrun_…`, `file-…`, `ftjob-…`."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


class JobInterrupted(Exception):
    """Raised inside a job when the server stops: the job returns to the queue."""


class JobPaused(Exception):
    """Raised inside a job when it was asked to pause: the job waits, `paused`, until resumed."""


class JobContext:
    """What a running job may ask: stop here if cancelled or interrupted, record an event."""

    def __init__(self, store: Store, job: dict[str, Any], stopping: threading.Event):
        self.store = store
        self.job = job
        self.stopping = stopping

    def check(self) -> None:
        """Raise JobCancelled / JobPaused / JobInterrupted when the job should stop now."""
        cancel, pause = self.store.job_stop_flags(self.job["id"])
        if cancel:
            raise JobCancelled(self.job["id"])
        if pause:
            raise JobPaused(self.job["id"])
        if self.stopping.is_set():
            raise JobInterrupted(self.job["id"])

    def event(self, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        self.store.add_api_event(self.job["object_id"], message, level=level,
                                 type=type, data=data)


class Runner(Protocol):
    """Executes one kind of job; `settle` records its outcome on the API object."""

    def run(self, ctx: JobContext) -> None: ...

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None: ...


class JobQueue:
    """Worker threads over the store's queue; `start` re-queues jobs a dead server left running."""

    def __init__(self, db_path: str, runners: dict[str, Runner], *, workers: int = 1, poll_s: float = 0.2):
        self.db_path = db_path
        self.runners = runners
        self.workers = workers
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, requeue: bool = True) -> list[str]:
        """Re-queue orphaned jobs (unless `requeue` is False: a worker process, whose server did)
        and start the workers; returns the ids re-queued."""
        requeued: list[str] = []
        store = Store.open(self.db_path)
        try:
            if requeue:
                requeued = store.requeue_running_jobs()
            for job_id in requeued:
                job = store.api_get("api_jobs", job_id)
                store.add_api_event(job["object_id"], "Job resumed after a server restart.")
        finally:
            store.close()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"flywheel-worker-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return requeued

    def notify(self) -> None:
        """A job was queued: wake an idle worker now rather than at its next poll."""
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wake.set()
        for thread in self.threads:
            thread.join(timeout=timeout)
        self.threads = []

    def _work(self) -> None:
        store = Store.open(self.db_path)
        try:
            while not self.stopping.is_set():
                job = store.claim_job()
                if job is None:
                    self.wake.wait(self.poll_s)
                    self.wake.clear()
                    continue
                self._execute(store, job)
        finally:
            store.close()

    def _execute(self, store: Store, job: dict[str, Any]) -> None:
        runner = self.runners.get(job["kind"])
        ctx = JobContext(store, job, self.stopping)
        status, error = "succeeded", None
        try:
            if runner is None:
                raise RuntimeError(f"no runner for job kind {job['kind']!r}")
            ctx.check()
            runner.run(ctx)
        except JobInterrupted:
            # The server is stopping: leave the job to the next start, which resumes it.
            store.requeue_running_jobs(job["id"])
            return
        except JobCancelled:
            status = "cancelled"
        except JobPaused:
            status = "paused"
        except Exception as exc:  # noqa: BLE001 - a failing job is recorded, the worker goes on
            log.exception("job %s failed", job["id"])
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        store.finish_job(job["id"], status, error)
        if runner is not None:
            runner.settle(store, job, status, error)
