"""`POST /v1/chat/completions` on the API server, for any Flywheel model reference and for the
`ft:` models its fine-tuning jobs made (their adapters, as `serve-model` serves them). With
`store: true` the call (and its `metadata`) is recorded in the captures table, as `flywheel proxy`
records calls, and evals read it back as a `stored_completions` source.

Requests are parsed and answered as `flywheel.model_server` does; models come from the process's
one model cache (flywheel.models.cached_model), shared with eval runs and wheel runs: they load on
first use and the last few stay loaded. Generation runs in a thread, one call per model at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.api.access import caller
from flywheel.api.errors import check_metadata
from flywheel.api.logs import store_completion
from flywheel.api.model_access import no_access, resolve_model
from flywheel.errors import FlywheelError
from flywheel.model_server import chat_payload, parse_chat_call, payload_response
from flywheel.models import cached_model
from flywheel.web import parse_json_object, read_body

if TYPE_CHECKING:
    from flywheel.api.state import ApiState

def routes(state: "ApiState") -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, state.max_upload_bytes)
        body = parse_json_object(raw)
        call = parse_chat_call(body)
        started = time.perf_counter()
        # only what the caller may name, with the provider's own URL and key (docs/security.md); a
        # load error reads the same whether or not a folder exists
        resolved = resolve_model(state.store(), call.model, caller(request), state.models, param="model", status=404)
        try:
            model = cached_model(resolved.ref, resolved.options or None)
        except FlywheelError:
            raise no_access(call.model, "model", 404) from None

        # The model generates one call at a time, whichever thread asks (an eval run may share it).
        completions = await asyncio.get_running_loop().run_in_executor(None, model.generate, call.requests())
        payload = chat_payload(call, completions, call.model, None)
        if body.get("store") is True:
            # as `flywheel proxy` records calls: evals read them back as stored completions
            usage = payload["usage"]
            store_completion(state.store(), {
                "endpoint": "/v1/chat/completions", "upstream": "flywheel-api", "model": call.model,
                "stream": int(call.stream), "status": 200, "latency_s": time.perf_counter() - started,
                "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "metadata_json": json.dumps(check_metadata(body.get("metadata")) or {}),
                "request_json": raw.decode("utf-8"), "request_bytes": len(raw), "response_json": json.dumps(payload),
                "response_id": payload["id"]}, caller(request).project)
        return payload_response(call, payload)

    return [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
