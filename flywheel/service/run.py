"""`flywheel serve --flywheel service.yaml`: the whole service in one process (one process group).

    app ─► proxy (ports.proxy, captures, redaction) ─► alias model server (ports.models)
                 └─ observer ─► shadow worker ─► candidate / previous production, graded online
    scheduler ─► triggers ─► a `service_lap` job ─► job queue (with the API's runners)
    API + review app (ports.api), with `/v1/service/laps` ─► queue_lap (trigger "api")

Everything runs in threads of this one process, so one kill stops all of it; a restart re-queues
the lap a kill left running (the job queue) and the lap resumes (flywheel.service.laps).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from flywheel.service import aliases
from flywheel.service.laps import LAP_JOB, due, new_captures, queue_lap, run_lap
from flywheel.service.spec import ServiceSpec
from flywheel.store import Store, now
from flywheel.store.service import ServiceLap

log = logging.getLogger("flywheel.service")


class LapRunner:
    """The job queue's runner of `service_lap` jobs."""

    def __init__(self, spec: ServiceSpec):
        self.spec = spec

    def run(self, ctx: Any) -> None:
        run_lap(ctx.store, self.spec, ctx.job["object_id"], check=ctx.check, event=ctx.event)

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        if status != "succeeded":
            store.update_service_lap(job["object_id"], status=status, reason=error or status, finished_at=now())


def lap_starter(spec: ServiceSpec, queue: Any) -> Callable[[Store, str], ServiceLap | None]:
    """The API's door to a lap (`POST /v1/service/laps`): `queue_lap` with this service's spec, then
    the queue woken so the lap starts now rather than at its next poll."""

    def start_lap(store: Store, trigger: str) -> ServiceLap | None:
        lap = queue_lap(store, spec, trigger=trigger)
        if lap is not None and lap.status == "queued":
            queue.notify()
        return lap

    return start_lap


def check_triggers(store: Store, spec: ServiceSpec) -> str | None:
    """Queue a lap when a trigger fires; the lap's id, else None."""
    trigger = due(store, spec, len(new_captures(store, spec)))
    lap = queue_lap(store, spec, trigger=trigger) if trigger else None
    return lap.id if lap else None


@dataclass
class Service:
    """The running parts; `stop()` ends them in order (proxy first: no request is cut mid-way)."""

    spec: ServiceSpec
    urls: dict[str, str]
    parts: list[Any] = field(default_factory=list)
    shadow: Any = None
    queue: Any = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stopping.set()
        for part in self.parts:
            part.stop()


def start_service(spec: ServiceSpec, *, workers: int = 1) -> Service:
    """Start every part of the service (see the module docstring) and return them running."""
    from flywheel.api.app import create_api_app
    from flywheel.api.jobs import JobQueue
    from flywheel.api.runners.workers import runners
    from flywheel.proxy.server import create_proxy_app
    from flywheel.report.review_app import create_app as create_review_app
    from flywheel.service.serving import create_alias_app
    from flywheel.service.shadow import ShadowWorker
    from flywheel.spec import load_eval_spec
    from flywheel.web import BackgroundServer

    db = str(spec.path(spec.db))
    graders = load_eval_spec(spec.path(spec.eval)).graders
    store = Store.open(db)
    try:
        aliases.ensure_aliases(store, spec)
    finally:
        store.close()
    host, ports = spec.ports.host, spec.ports
    privacy = None
    if spec.redact or spec.retention_days:
        from flywheel.privacy.policy import ProxyPrivacy
        from flywheel.privacy.redact import RedactionPolicy

        privacy = ProxyPrivacy(redact=RedactionPolicy() if spec.redact else None, retention_days=spec.retention_days)
    service = Service(spec, {})
    try:
        queue = JobQueue(db, {**runners(8), LAP_JOB: LapRunner(spec)}, workers=workers)
        models = BackgroundServer(create_alias_app(db), host=host, port=ports.models).start()
        service.parts.append(models)
        shadow = ShadowWorker(db, spec, graders, models.url + "/v1")
        shadow.start()
        service.parts.insert(0, shadow)
        proxy = BackgroundServer(create_proxy_app(models.url, db, privacy=privacy, observer=shadow.observe),
                                 host=host, port=ports.proxy, access_log=False).start()
        service.parts.insert(0, proxy)
        api = BackgroundServer(create_api_app(db, workers=0, fallback=create_review_app(db), report_base="/",
                                              start_lap=lap_starter(spec, queue)),
                               host=host, port=ports.api).start()
        service.parts.append(api)
        queue.start()
        service.parts.append(queue)
        scheduler = threading.Thread(target=_schedule, args=(db, spec, queue, service.stopping), name="scheduler",
                                     daemon=True)
        scheduler.start()
    except BaseException:
        service.stop()
        raise
    service.shadow, service.queue = shadow, queue
    service.urls = {"proxy": proxy.url + "/v1", "models": models.url + "/v1", "api": api.url + "/"}
    return service


def _schedule(db: str, spec: ServiceSpec, queue: Any, stopping: threading.Event) -> None:
    store = Store.open(db)
    try:
        while not stopping.wait(spec.triggers.check_every_s):
            try:
                if check_triggers(store, spec):
                    queue.notify()
            except Exception as exc:  # noqa: BLE001 - a failed check is logged; the next one tries again
                log.warning("scheduler: %s: %s", type(exc).__name__, exc)
    finally:
        store.close()


def serve_flywheel(spec: ServiceSpec, *, on_ready: Callable[[dict[str, str]], None] | None = None) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM)."""
    import signal

    service = start_service(spec)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if on_ready is not None:
        on_ready(service.urls)
    try:
        while not done.wait(1.0):
            pass
    finally:
        service.stop()
