"""The job queue: work (eval runs, fine-tuning jobs) as rows of `api_jobs`, run by worker threads.

A job goes queued -> running (<-> paused) -> succeeded | failed | cancelled. A worker claims the oldest free
job with one guarded UPDATE and holds it under a lease (`$FLYWHEEL_JOB_LEASE_S`, default 15 s) that a
heartbeat thread renews every third of it, so no job runs twice at once, even with two servers on one
store: a server that starts leaves a job with a live lease alone. A job whose lease ran out belonged to a
worker that died (a SIGKILLed server): any worker takes it over, and its runner resumes (the harness and
the trainers skip what they already stored, and the completion cache answers every call that came back).
A worker that finds its lease taken stops the job at its next check without recording anything.
Cancelling sets a flag that the running job reads between batches (`JobContext.check`), so it stops
within a batch; a queued job is cancelled at once. Stopping the server puts its running jobs back in
the queue. A pause (fine-tuning jobs) is a flag read like cancel: the job leaves the queue as `paused`
until resumed.

    queue = JobQueue(db_path, {"eval_run": EvalRunRunner()}, workers=1)
    queue.start(); ...; queue.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any, Protocol

from flywheel.settings import env_seconds
from flywheel.store import Store

log = logging.getLogger("flywheel.api")

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
LEASE_S = 15.0


def lease_seconds() -> float:
    """Seconds a worker's claim on a running job lasts unless renewed ($FLYWHEEL_JOB_LEASE_S, default 15)."""
    return env_seconds("FLYWHEEL_JOB_LEASE_S", LEASE_S)


def new_object_id(prefix: str) -> str:
    """A platform-looking id: `eval_…`, `evalrun_…`, `file-…`, `ftjob-…`."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


class JobInterrupted(Exception):
    """Raised inside a job when the server stops: the job returns to the queue."""


class JobPaused(Exception):
    """Raised inside a job when it was asked to pause: the job waits, `paused`, until resumed."""


class JobLost(Exception):
    """Raised inside a job whose lease ran out and another worker took it: this worker records nothing."""


class JobContext:
    """What a running job may ask: stop here if cancelled or interrupted, record an event."""

    def __init__(self, store: Store, job: dict[str, Any], stopping: threading.Event, owner: str = ""):
        self.store = store
        self.job = job
        self.owner = owner  # the worker holding the job's lease
        self.stopping = stopping
        self.lost = threading.Event()  # set by the heartbeat when another worker holds the job now

    def check(self) -> None:
        """Raise JobLost / JobCancelled / JobPaused / JobInterrupted when the job should stop now."""
        if self.lost.is_set():
            raise JobLost(self.job["id"])
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
    """Worker threads over the store's queue, each job held under a lease that a heartbeat renews."""

    def __init__(self, db_path: str, runners: dict[str, Runner], *, workers: int = 1, poll_s: float = 0.2,
                 lease_s: float | None = None):
        self.db_path = db_path
        self.runners = runners
        self.workers = workers
        self.poll_s = poll_s
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []
        self.running: dict[str, JobContext] = {}  # job id -> its context, while this queue runs it
        self.lock = threading.Lock()

    def start(self) -> None:
        """Start the workers and the heartbeat. Jobs a dead server left running are taken over once
        their lease runs out; a job another live server runs is left to it."""
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, args=(f"{self.owner}:{index}",),
                                      name=f"flywheel-worker-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.workers:
            thread = threading.Thread(target=self._heartbeat, name="flywheel-heartbeat", daemon=True)
            thread.start()
            self.threads.append(thread)

    def notify(self) -> None:
        """A job was queued: wake an idle worker now rather than at its next poll."""
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wake.set()
        for thread in self.threads:
            thread.join(timeout=timeout)
        self.threads = []

    def _heartbeat(self) -> None:
        """Renew the lease of every job this queue runs, every third of a lease, until the queue stops
        (a job being put back or finished after that is still held: its worker drops the lease)."""
        store = Store.open(self.db_path)
        try:
            while True:
                with self.lock:
                    held = list(self.running.items())
                for job_id, ctx in held:
                    if not store.renew_job_lease(job_id, ctx.owner, self.lease_s):
                        ctx.lost.set()
                if self.stopping.wait(self.lease_s / 3) and not self.running:
                    return
        finally:
            store.close()

    def _work(self, owner: str) -> None:
        store = Store.open(self.db_path)
        try:
            while not self.stopping.is_set():
                job = store.claim_job(owner, self.lease_s)
                if job is None:
                    self.wake.wait(self.poll_s)
                    self.wake.clear()
                    continue
                self._execute(store, job, owner)
        finally:
            store.close()

    def _execute(self, store: Store, job: dict[str, Any], owner: str) -> None:
        runner = self.runners.get(job["kind"])
        ctx = JobContext(store, job, self.stopping, owner)
        if job.get("taken_over"):
            store.add_api_event(job["object_id"], "Job resumed after a server restart.")
        with self.lock:
            self.running[job["id"]] = ctx
        try:
            status, error = "succeeded", None
            try:
                if runner is None:
                    raise RuntimeError(f"no runner for job kind {job['kind']!r}")
                ctx.check()
                runner.run(ctx)
            except JobLost:
                log.warning("job %s: its lease ran out and another worker runs it now", job["id"])
                return
            except JobInterrupted:
                # The server is stopping: the job goes back to the queue for the next worker, which resumes it.
                store.release_job(job["id"], owner)
                return
            except JobCancelled:
                status = "cancelled"
            except JobPaused:
                status = "paused"
            except Exception as exc:  # noqa: BLE001 - a failing job is recorded, the worker goes on
                log.exception("job %s failed", job["id"])
                status, error = "failed", f"{type(exc).__name__}: {exc}"
            if not store.finish_job(job["id"], status, error, owner=owner):
                log.warning("job %s: another worker took it over; its outcome here is not recorded", job["id"])
                return
            if runner is not None:
                runner.settle(store, job, status, error)
        finally:
            with self.lock:
                self.running.pop(job["id"], None)
