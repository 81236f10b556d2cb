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
import time
import uuid
from typing import Any, Protocol

from flywheel.store import Store

log = logging.getLogger("flywheel.api")

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")


def unix_now() -> int:
    return int(time.time())


def new_object_id(prefix: str) -> str:
    """A platform-looking id: `eval_…`, `evalrun_…`, `file-…`, `ftjob-…`."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


class JobInterrupted(Exception):
    """Raised inside a job when the server stops: the job returns to the queue."""


class JobPaused(Exception):
    """Raised inside a job when it was asked to pause: the job waits, `paused`, until resumed."""


def request_job_pause(store: Store, object_id: str) -> str | None:
    """Pause the job of an API object: a queued one at once, a running one at its next check.
    Returns the job's status now ('paused', 'running' while it stops, None: nothing to pause)."""
    with store.db.conn:
        store.db.conn.execute("update api_jobs set pause_requested = 1 where object_id = ? and status = 'running'"
                              " and not cancel_requested", [object_id])
        store.db.conn.execute("update api_jobs set status = 'paused' where object_id = ? and status = 'queued'",
                              [object_id])
    row = store.db.conn.execute("select status from api_jobs where object_id = ? order by rowid desc limit 1",
                                [object_id]).fetchone()
    return row[0] if row and row[0] in ("paused", "running") else None


def resume_job(store: Store, object_id: str) -> bool:
    """Queue a paused job again; False when the object's job is not paused."""
    with store.db.conn:
        return store.db.conn.execute(
            "update api_jobs set status = 'queued', pause_requested = 0, finished_at = null"
            " where object_id = ? and status = 'paused'", [object_id]).rowcount > 0


def cancel_paused_job(store: Store, object_id: str) -> bool:
    """Cancel a paused job (it runs nothing, so at once); False when it is not paused."""
    with store.db.conn:
        return store.db.conn.execute(
            "update api_jobs set status = 'cancelled', cancel_requested = 1, finished_at = ?"
            " where object_id = ? and status = 'paused'", [unix_now(), object_id]).rowcount > 0


class JobContext:
    """What a running job may ask: stop here if cancelled or interrupted, record an event."""

    def __init__(self, store: Store, job: dict[str, Any], stopping: threading.Event):
        self.store = store
        self.job = job
        self.stopping = stopping

    def check(self) -> None:
        """Raise JobCancelled / JobPaused / JobInterrupted when the job should stop now."""
        row = self.store.db.conn.execute("select cancel_requested, pause_requested from api_jobs where id = ?",
                                         [self.job["id"]]).fetchone()
        if row and row[0]:
            raise JobCancelled(self.job["id"])
        if row and row[1]:
            raise JobPaused(self.job["id"])
        if self.stopping.is_set():
            raise JobInterrupted(self.job["id"])

    def event(self, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        self.store.add_api_event(self.job["object_id"], message, created_at=unix_now(), level=level,
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
                store.add_api_event(job["object_id"], "Job resumed after a server restart.", created_at=unix_now())
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
                job = store.claim_job(unix_now())
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
        store.finish_job(job["id"], status, unix_now(), error)
        if runner is not None:
            runner.settle(store, job, status, error)
