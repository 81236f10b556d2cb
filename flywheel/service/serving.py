"""The alias model server: `production` and `candidate` as OpenAI model names, read from the store.

Each request looks its alias up in the store (one indexed row), so a switch takes effect on the
next request and no request is lost or half-switched: a request already in flight finishes on the
target it started with. The alias's prompt (a stored prompt: instructions and demonstrations, fixed
or the nearest to the request) replaces the app's system messages (the prompt is part of the served
system: a student may answer with a shorter one), and the reply's `model` is the
alias, its `system_fingerprint` the target model's, so apps never change their code. Each target
model is loaded once (`flywheel.models.cached_model`) behind its own micro-batcher; the reply shape
is the model server's (`flywheel.model_server.chat_response`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flywheel.model_server import MicroBatcher, chat_response, model_fingerprint, parse_chat_call
from flywheel.service.aliases import prompt_of
from flywheel.service.spec import ALIASES
from flywheel.store import Store
from flywheel.store.service import AliasTarget
from flywheel.web import DEFAULT_MAX_BODY_BYTES, EXCEPTION_HANDLERS, ApiError, parse_json_object, read_body


class AliasModels:
    """One loaded model and micro-batcher per target model reference, made on first use."""

    def __init__(self, options: dict[str, Any] | None = None, batch_size: int = 16, max_wait_ms: float = 5.0):
        self.options = options or {}
        self.batch_size, self.max_wait_ms = batch_size, max_wait_ms
        self._served: dict[str, tuple[Any, MicroBatcher, str]] = {}
        self._lock = asyncio.Lock()

    async def get(self, ref: str) -> tuple[Any, MicroBatcher, str]:
        """The model, its batcher and its fingerprint for `ref` (loaded off the event loop)."""
        if ref not in self._served:
            async with self._lock:
                if ref not in self._served:
                    from flywheel.models import cached_model

                    loop = asyncio.get_running_loop()
                    model = await loop.run_in_executor(None, cached_model, ref, self.options or None)
                    if hasattr(model, "load"):
                        await loop.run_in_executor(None, model.load)
                    batcher = MicroBatcher(model, batch_size=self.batch_size, max_wait_ms=self.max_wait_ms)
                    batcher.start()
                    self._served[ref] = (model, batcher, model_fingerprint(model))
        return self._served[ref]

    async def close(self) -> None:
        for _, batcher, _ in self._served.values():
            await batcher.stop()
        self._served.clear()


def create_alias_app(db_path: str, *, preload: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                     options: dict[str, Any] | None = None) -> Starlette:
    """The OpenAI-compatible app answering the service's aliases from the store at `db_path`."""
    models = AliasModels(options)
    state: dict[str, Store] = {}

    def lookup(alias: str) -> AliasTarget:
        if alias not in ALIASES:
            raise ApiError(404, f"The model '{alias}' does not exist; this server serves {', '.join(ALIASES)}",
                           param="model", code="model_not_found")
        found = state["store"].service_alias(alias)
        if found is None:
            raise ApiError(503, f"alias '{alias}' is not set yet", code="alias_not_set")
        return found

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["store"] = Store.open(db_path)
        if preload:  # the first user request should not pay for loading weights
            for found in state["store"].service_aliases().values():
                await models.get(found.model)
        try:
            yield
        finally:
            await models.close()
            state["store"].close()

    async def chat_completions(request: Request) -> Response:
        call = parse_chat_call(parse_json_object(await read_body(request, max_body_bytes)))
        found = lookup(call.model)
        model, batcher, fingerprint = await models.get(found.model)
        if model.reads_images is False:
            from flywheel.images import has_images

            if has_images(call.messages):
                raise ApiError(400, f"'{call.model}' serves a text model: it does not read images",
                               param="messages", code="unsupported_content")
        prompt = prompt_of(state["store"], found)
        if prompt is not None:  # nearest demonstrations embed the request: off the event loop
            call.messages = (prompt.apply(call.messages) if not prompt.nearest else
                             await asyncio.get_running_loop().run_in_executor(None, prompt.apply, call.messages))
        return chat_response(call, await batcher.submit(call.requests()), call.model, fingerprint)

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": alias, "object": "model", "created": 0, "owned_by": "flywheel", "root": found.model}
            for alias, found in state["store"].service_aliases().items()]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "aliases": sorted(state["store"].service_aliases())})

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", list_models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
