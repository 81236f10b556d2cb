"""`openai:NAME` — any OpenAI-compatible chat server through the official openai SDK.

    model = load_model("openai:gpt-4o-mini")                                  # api.openai.com
    model = load_model("openai:smollm2", {"base_url": "http://127.0.0.1:8000/v1"})

The same backend serves OpenAI itself, vLLM, SGLang, TGI, llama.cpp, Ollama and
`flywheel serve-model`. Options (the eval spec's `model_options`):

    base_url      server URL ending in /v1 (default $OPENAI_BASE_URL, else api.openai.com), or a
                  list of URLs serving the same model: a fleet (see below)
    api_key_env   environment variable holding the key (default OPENAI_API_KEY); local servers
                  that need no key get a placeholder
    concurrency   requests in flight at once, per server (default 8)
    max_retries   SDK retries with exponential backoff on 408/409/429/5xx, connection errors
                  and timeouts (default 3)
    timeout       seconds per request attempt (default 120)
    prices        {input, output, cached_input} USD per 1M tokens, overriding flywheel.pricing
    use_n         send repeats of one prompt as one call with `n` (default true)
    max_tokens_param  max_tokens | max_completion_tokens (default: the latter on api.openai.com)
    extra_body    extra JSON fields sent with every request (e.g. vLLM's top_k)

A fleet (`base_url: [http://a:8000/v1, http://b:8000/v1]`) spreads requests over its servers, each
with its own `concurrency` slots, the least loaded first (flywheel.models.fleet). A request that
fails for a server's reason (connection refused, timeout, 429, 5xx) marks that server down for a
cool-down and is sent again to another; the dead server is tried again when its cool-down ends.
Every request still yields exactly one completion (an error row only when every server failed
it, `(max_retries + 1) x servers` times in all), so no sample is lost or stored twice. In a
fleet the SDK's own retries are off: failing over is the retry.

`generate` is synchronous, as the harness wants, and drives an `AsyncOpenAI` client on a private
event loop in a background thread, so the connection pool lives across calls and `generate` also
works when called from inside someone else's event loop. A failing request becomes a
`Completion` with `error` set; only a missing API key raises.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model
from flywheel.models.fleet import Fleet, Server
from flywheel.pricing import Price, find_price
from flywheel.tools import calls_from_message

OPENAI_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
OPTIONS = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout", "prices", "use_n",
           "max_tokens_param", "extra_body")


def resolve_base_url(base_url: str | None) -> str:
    """The option, else $OPENAI_BASE_URL, else OpenAI's own; without a trailing slash."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")


def resolve_base_urls(ref: str, base_url: str | list[str] | None) -> list[str]:
    """One URL or a list of them (a fleet), each resolved as `resolve_base_url`; no duplicates."""
    if isinstance(base_url, (list, tuple)):
        if not base_url or not all(isinstance(u, str) and u.strip() for u in base_url):
            raise ModelError(f"{ref}: model_options.base_url: a list must hold one or more URLs")
        urls = [resolve_base_url(u.strip()) for u in base_url]
        if len(set(urls)) != len(urls):
            raise ModelError(f"{ref}: model_options.base_url: a URL is listed twice: {', '.join(urls)}")
        return urls
    if base_url is not None and not isinstance(base_url, str):
        raise ModelError(f"{ref}: model_options.base_url must be a URL or a list of URLs")
    return [resolve_base_url(base_url)]


def _server_fault(exc: Exception) -> bool:
    """Whether another server might answer: connection, timeout, 408/409/429 and 5xx."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


class OpenAIModel(Model):
    """A chat model behind an OpenAI-compatible HTTP API. Constructing it makes no network call."""

    def __init__(self, ref: str, name: str, *, base_url: str | list[str] | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, max_retries: int = 3,
                 timeout: float = 120.0, prices: dict[str, float] | None = None, use_n: bool = True,
                 max_tokens_param: str | None = None, extra_body: dict[str, Any] | None = None,
                 **unknown: Any):
        if unknown:
            raise ModelError(f"{ref}: model_options: unknown option(s) for openai models: "
                             f"{', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
        self.ref = ref
        self.name = name
        self.base_urls = resolve_base_urls(ref, base_url)
        for url in self.base_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                origin = "model_options.base_url" if base_url else "$OPENAI_BASE_URL"
                raise ModelError(f"{ref}: {origin} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self.base_url = self.base_urls[0]
        self.api_key_env = api_key_env
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ModelError(f"{ref}: model_options.concurrency must be a positive integer")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ModelError(f"{ref}: model_options.max_retries must be an integer >= 0")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ModelError(f"{ref}: model_options.timeout must be a positive number of seconds")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.price: Price = find_price(name, prices)
        self.use_n = bool(use_n)
        is_openai = self.base_url.startswith(OPENAI_BASE_URL)
        self.max_tokens_param = max_tokens_param or ("max_completion_tokens" if is_openai else "max_tokens")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ModelError(f"{ref}: model_options.max_tokens_param must be max_tokens or max_completion_tokens")
        self.extra_body = dict(extra_body or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self.fleet: Fleet | None = None
        self._start_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """Server(s) and model name, and `extra_body` when set (its fields, e.g. vLLM's `top_k`,
        change outputs). Timeouts, retries, concurrency, `use_n`, `max_tokens_param` and prices
        change how a request is sent or billed, not what it answers, so they are left out."""
        servers = self.base_url if len(self.base_urls) == 1 else f"[{','.join(sorted(self.base_urls))}]"
        extra = ""
        if self.extra_body:
            extra = "+extra_body:" + hashlib.sha256(json.dumps(self.extra_body, sort_keys=True).encode()).hexdigest()[:16]
        return f"openai:{servers}:{self.name}{extra}"

    @property
    def preferred_batch_size(self) -> int:
        # The harness hands over `4 x this` requests per chunk: enough to keep every slot busy.
        return max(self.concurrency * len(self.base_urls), 8)

    # -- the private event loop -------------------------------------------------------------------
    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url.startswith(OPENAI_BASE_URL):
            raise ModelError(f"{self.ref}: no API key: set ${self.api_key_env} "
                             "(or model_options.api_key_env to the variable that holds it)")
        return PLACEHOLDER_KEY

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                from openai import AsyncOpenAI

                key = self._api_key()
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"openai-{self.name}", daemon=True)
                thread.start()

                # In a fleet, failing over to another server is the retry.
                retries = self.max_retries if len(self.base_urls) == 1 else 0

                async def make_fleet() -> Fleet:
                    return Fleet([Server(url, AsyncOpenAI(api_key=key, base_url=url, max_retries=retries,
                                                          timeout=self.timeout), limit=self.concurrency)
                                  for url in self.base_urls])

                self.fleet = asyncio.run_coroutine_threadsafe(make_fleet(), loop).result()
                self._client = self.fleet.servers[0].client
                self._loop, self._thread = loop, thread
        return self._loop

    def close(self) -> None:
        with self._start_lock:
            loop, fleet = self._loop, self.fleet
            if loop is None:
                return
            for server in fleet.servers if fleet else []:
                try:
                    asyncio.run_coroutine_threadsafe(server.client.close(), loop).result(timeout=10)
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = self._client = self.fleet = None

    # -- generation -------------------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        loop = self._ensure_started()
        return asyncio.run_coroutine_threadsafe(self._generate(requests), loop).result()

    def stream(self, requests: list[ChatRequest]) -> Iterator[tuple[int, Completion]]:
        """Yield (request index, completion) as each call returns, while the others are in flight,
        so the harness caches what came back before the last call ends."""
        if not requests:
            return
        loop = self._ensure_started()
        returned: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._generate(requests, returned.put), loop)
        for _ in range(len(requests)):
            while True:
                try:
                    yield returned.get(timeout=0.05)
                    break
                except queue.Empty:
                    if future.done() and returned.empty():
                        future.result()  # raises what the calls raised
                        return

    def _groups(self, requests: list[ChatRequest]) -> list[list[int]]:
        """Indexes of requests to send as one call: repeats of one prompt share a call via `n`."""
        if not self.use_n:
            return [[i] for i in range(len(requests))]
        by_prompt: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps([request.messages, request.sampling.__dict__, request.response_format,
                              request.tools, request.tool_choice],
                             sort_keys=True, default=str)
            by_prompt.setdefault(key, []).append(index)
        return [sorted(group, key=lambda i: requests[i].repeat) for group in by_prompt.values()]

    async def _generate(self, requests: list[ChatRequest],
                        returned: Callable[[tuple[int, Completion]], None] | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)

        async def run(group: list[int]) -> None:
            completions = await self._call([requests[i] for i in group])
            for index, completion in zip(group, completions):
                results[index] = completion
                if returned is not None:
                    returned((index, completion))
            # A server that ignores `n` returns fewer choices: ask for the rest one by one.
            missing = group[len(completions):]
            if missing:
                await asyncio.gather(*(run([i]) for i in missing))

        await asyncio.gather(*(run(group) for group in self._groups(requests)))
        return results  # type: ignore[return-value]

    def _params(self, request: ChatRequest, n: int) -> dict[str, Any]:
        sampling = request.sampling
        params: dict[str, Any] = {
            "model": self.name,
            "messages": request.messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            self.max_tokens_param: sampling.max_tokens,
        }
        if not sampling.greedy:
            # Distinct seeds per repeat, so servers that honour `seed` give distinct samples.
            params["seed"] = sampling.seed + (request.repeat if n == 1 else 0)
        if n > 1:
            params["n"] = n
        if request.response_format is not None:
            params["response_format"] = request.response_format
        if request.tools:
            params["tools"] = request.tools
        if request.tool_choice is not None:
            params["tool_choice"] = request.tool_choice
        if self.extra_body:
            params["extra_body"] = self.extra_body
        return params

    async def _call(self, group: list[ChatRequest]) -> list[Completion]:
        """One API call for a group of repeats, failing over in a fleet; failures become error
        completions."""
        fleet = self.fleet
        assert fleet is not None
        attempts = 1 if len(fleet.servers) == 1 else (self.max_retries + 1) * len(fleet.servers)
        params = self._params(group[0], len(group))
        for attempt in range(attempts):
            server = await fleet.acquire()
            started = time.perf_counter()
            try:
                response = await server.client.chat.completions.create(**params)
            except Exception as exc:  # noqa: BLE001 - sorted out below
                if len(fleet.servers) > 1 and _server_fault(exc):
                    fleet.failed(server)
                    if attempt + 1 < attempts:
                        continue
                return _failed(self._describe(exc, server.url), len(group))
            finally:
                fleet.release(server)
            fleet.succeeded(server)
            return self._completions(response, group, time.perf_counter() - started)
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns

    def _describe(self, exc: Exception, url: str) -> str:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            tries = f"{self.max_retries} retries" if len(self.base_urls) == 1 else \
                f"the last of {len(self.base_urls)} servers tried"
            return f"timeout: no answer from {url} within {self.timeout:g} s ({tries})"
        if isinstance(exc, openai.APIStatusError):
            return f"api_error: HTTP {exc.status_code} from {url}: {_error_message(exc)}"
        if isinstance(exc, openai.APIConnectionError):
            return f"connection_error: cannot reach {url}: {exc.__cause__ or exc}"
        if isinstance(exc, openai.OpenAIError):
            return f"model_error: {type(exc).__name__}: {exc}"
        raise exc

    def _completions(self, response: Any, group: list[ChatRequest], latency: float) -> list[Completion]:
        choices = sorted(response.choices, key=lambda c: c.index)[:len(group)]
        usage = response.usage
        prompt = usage.prompt_tokens if usage else 0
        output = usage.completion_tokens if usage else 0
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
        cost = self.price.cost(prompt, output, cached)
        k = len(choices)
        completions = []
        for position, choice in enumerate(choices):
            # Usage is per call: share it out so per-sample sums equal what was billed.
            message = choice.message
            text = message.content or ""
            error = None
            tool_calls = calls_from_message(message)
            if not text and not tool_calls and getattr(message, "refusal", None):
                error = f"refusal: {message.refusal}"
            completions.append(Completion(
                text=text, prompt_tokens=_share(prompt, k, position),
                completion_tokens=_share(output, k, position),
                finish_reason=choice.finish_reason or "stop", latency_s=latency,
                cost=cost / k if k else 0.0, error=error, tool_calls=tool_calls))
        return completions


def _failed(error: str, count: int) -> list[Completion]:
    return [Completion(text="", error=error, finish_reason="error") for _ in range(count)]


def _share(total: int, k: int, position: int) -> int:
    """Split an integer total over k parts; the first parts take the remainder."""
    return total // k + (1 if position < total % k else 0)


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))
