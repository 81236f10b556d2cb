"""The API's ASGI app: routes under `/v1`, the store, the job queue's workers, key checks.

    app = create_api_app("flywheel.db")                       # loopback: no key needed
    app = create_api_app("flywheel.db", require_key=True)     # any other bind
    app = create_api_app("flywheel.db", rate_limit_rpm=600)   # 600 requests a minute per key
    app = create_api_app("flywheel.db", start_lap=...)        # + /v1/service/laps (flywheel.service.run)
    serve_api("flywheel.db", host="127.0.0.1", port=8765)     # `flywheel serve --api`

The review app (`flywheel.report.review_app`) can be mounted under `/` of the same server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flywheel.api.access import LOOPBACK_ROLES, Access
from flywheel.api.errors import HANDLERS
from flywheel.api.jobs import JobQueue
from flywheel.api.limits import RateLimiter
from flywheel.api.model_access import ServerModels, load_server_models
from flywheel.api.routes import chat, evals, files, fine_tuning, graders, service, wheel_runs
from flywheel.api.runners.workers import WorkerProcesses, runners
from flywheel.api.state import ApiState
from flywheel.errors import FlywheelError
from flywheel.report.review_app import create_app
from flywheel.store import Store
from flywheel.web import ApiError, HostGuard, bind_socket, is_loopback, page_url, serve_forever

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def create_api_app(db_path: str, *, require_key: bool = False, workers: int = 1, batch_size: int = 8,
                   max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, fallback: Any = None,
                   report_base: str | None = None, rate_limit_rpm: int | None = None,
                   rate_limit_burst: int | None = None, worker_processes: bool = False,
                   models: ServerModels | None = None, loopback_role: str = "admin",
                   allowed_hosts: list[str] | None = None,
                   start_lap: service.LapStarter | None = None) -> Starlette:
    """The API app over the store at `db_path`, running `workers` job workers while it is up.

    `workers=0` queues jobs without running them (another server on the same store runs them).
    `fallback` (an ASGI app, e.g. the review app) answers every path the API does not.
    `rate_limit_rpm`: requests per minute per key (None: unlimited), `rate_limit_burst` of them at once.
    `worker_processes`: the workers run as processes (`flywheel.api.runners.workers`) rather than threads.
    `models`: the models API callers may name (`flywheel.api.model_access`; default: the embedded
    bases and their projects' `ft:` models); `loopback_role`: what a keyless loopback client may do
    (`none`: nothing); `allowed_hosts`: the Host / Origin names the port answers for, API and pages
    alike (default: loopback names; "*": any). See docs/security.md.
    `start_lap`: the running service's lap door (`flywheel.service.run`): with it the API has
    `/v1/service/laps` (flywheel.api.routes.service); without it those paths are a 404.
    """
    if loopback_role not in LOOPBACK_ROLES:
        raise FlywheelError(f"loopback role must be one of {', '.join(LOOPBACK_ROLES)}, got {loopback_role!r}")
    Store.open(db_path).close()  # fail now (and migrate) rather than on the first request
    state = ApiState(db_path, max_upload_bytes=max_upload_bytes, report_base=report_base, models=models)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if workers > 0 and worker_processes:
            state.queue = WorkerProcesses(db_path, workers=workers, batch_size=batch_size)
            state.queue.start()
        elif workers > 0:
            state.queue = JobQueue(db_path, runners(batch_size), workers=workers)
            state.queue.start()
        try:
            yield
        finally:
            if state.queue is not None:
                state.queue.stop()
                state.queue = None
            state.close()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "jobs": state.store().count_jobs()})

    async def no_route(request: Request) -> JSONResponse:
        raise ApiError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")

    routes: list[Any] = [Route("/v1/health", health, methods=["GET"]), *files.routes(state), *evals.routes(state),
                         *fine_tuning.routes(state), *graders.routes(state), *chat.routes(state),
                         *wheel_runs.routes(state), *service.routes(state, start_lap),
                         Route("/v1/{rest:path}", no_route, methods=["GET", "POST", "DELETE", "PUT", "PATCH"])]
    if fallback is not None:
        routes.append(Mount("/", app=fallback))
    limiter = RateLimiter(rate_limit_rpm, rate_limit_burst) if rate_limit_rpm else None
    middleware = [Middleware(HostGuard, allowed_hosts=allowed_hosts),
                  Middleware(Access, store=state.store, require_key=require_key, limiter=limiter,
                             loopback_role=loopback_role)]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=HANDLERS, lifespan=lifespan)
    app.state.api = state
    return app


def serve_api(db_path: str, *, host: str = "127.0.0.1", port: int = 8765, workers: int = 1,
              review: bool = False, reviewer: str | None = None, rate_limit_rpm: int | None = None,
              rate_limit_burst: int | None = None, worker_processes: bool = False,
              on_ready: Callable[[str], None] | None = None, loopback_role: str = "admin",
              providers: str | None = None, allowed_hosts: list[str] | None = None) -> None:
    """Run the API (and the review app beside it, behind the same keys) until interrupted; keys are
    required off loopback. `providers`: the file of models API callers may name
    (`flywheel.api.model_access`); `allowed_hosts`: the Host names clients use (default: loopback
    names on a loopback bind, the bind address otherwise; a wildcard bind needs them)."""
    import ipaddress

    local = is_loopback(host)
    if not allowed_hosts and not local:
        try:
            wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
        except ValueError:
            wildcard = False
        if wildcard:
            raise FlywheelError(f"listening on {host} needs --allowed-host NAME (each name clients use to reach "
                                "this server; the Host and Origin checks refuse the others)")
        allowed_hosts = [host]
    models = load_server_models(providers)
    # the pages' own host check is the port's (HostGuard, before the keys)
    pages = create_app(db_path, review=review, reviewer=reviewer, allowed_hosts=["*"])
    app = create_api_app(db_path, require_key=not local, workers=workers, fallback=pages, report_base="/",
                         rate_limit_rpm=rate_limit_rpm, rate_limit_burst=rate_limit_burst,
                         worker_processes=worker_processes, models=models, loopback_role=loopback_role,
                         allowed_hosts=allowed_hosts)
    sock = bind_socket(host, port)
    if on_ready is not None:
        on_ready(page_url(host, sock))
    serve_forever(app, sock)
