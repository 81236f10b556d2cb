"""`openai:NAME` — any OpenAI-compatible chat server through the official openai SDK.

    model = load_model("openai:gpt-4o-mini")                                  # api.openai.com
    model = load_model("openai:smollm2", {"base_url": "http://127.0.0.1:8000/v1"})

The same backend serves OpenAI itself, vLLM, SGLang, TGI, llama.cpp, Ollama and
`flywheel serve-model`. Options (the eval spec's `model_options`):

    base_url      server URL ending in /v1 (default $OPENAI_BASE_URL, else api.openai.com)
    api_key_env   environment variable holding the key (default OPENAI_API_KEY); local servers
                  that need no key get a placeholder
    concurrency   requests in flight at once (default 8)
    max_retries   SDK retries with exponential backoff on 408/409/429/5xx, connection errors
                  and timeouts (default 3)
    timeout       seconds per request attempt (default 120)
    prices        {input, output, cached_input} USD per 1M tokens, overriding flywheel.pricing
    use_n         send repeats of one prompt as one call with `n` (default true)
    max_tokens_param  max_tokens | max_completion_tokens (default: the latter on api.openai.com)
    extra_body    extra JSON fields sent with every request (e.g. vLLM's top_k)

`generate` is synchronous, as the harness wants, and drives an `AsyncOpenAI` client on a private
event loop in a background thread, so the connection pool lives across calls and `generate` also
works when called from inside someone else's event loop. A failing request becomes a
`Completion` with `error` set; only a missing API key raises.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model
from flywheel.pricing import Price, find_price
from flywheel.tools import calls_from_message

OPENAI_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
OPTIONS = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout", "prices", "use_n",
           "max_tokens_param", "extra_body")


def resolve_base_url(base_url: str | None) -> str:
    """The option, else $OPENAI_BASE_URL, else OpenAI's own; without a trailing slash."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")


class OpenAIModel(Model):
    """A chat model behind an OpenAI-compatible HTTP API. Constructing it makes no network call."""

    def __init__(self, ref: str, name: str, *, base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, max_retries: int = 3,
                 timeout: float = 120.0, prices: dict[str, float] | None = None, use_n: bool = True,
                 max_tokens_param: str | None = None, extra_body: dict[str, Any] | None = None,
                 **unknown: Any):
        if unknown:
            raise ModelError(f"{ref}: model_options: unknown option(s) for openai models: "
                             f"{', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
        self.ref = ref
        self.name = name
        if base_url is not None and not isinstance(base_url, str):
            raise ModelError(f"{ref}: model_options.base_url must be a URL string, got {type(base_url).__name__}")
        self.base_url = resolve_base_url(base_url)
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            origin = "model_options.base_url" if base_url else "$OPENAI_BASE_URL"
            raise ModelError(f"{ref}: {origin} {self.base_url!r} is not an http(s) URL "
                             "(e.g. http://127.0.0.1:8000/v1)")
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
        self._start_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return f"openai:{self.base_url}:{self.name}"

    @property
    def preferred_batch_size(self) -> int:
        # The harness hands over `4 x this` requests per chunk: enough to keep every slot busy.
        return max(self.concurrency, 8)

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

                async def make_client():
                    return AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries,
                                       timeout=self.timeout)

                self._client = asyncio.run_coroutine_threadsafe(make_client(), loop).result()
                self._loop, self._thread = loop, thread
        return self._loop

    def close(self) -> None:
        with self._start_lock:
            loop, client = self._loop, self._client
            if loop is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = self._client = None

    # -- generation -------------------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        loop = self._ensure_started()
        return asyncio.run_coroutine_threadsafe(self._generate(requests), loop).result()

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

    async def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        semaphore = asyncio.Semaphore(self.concurrency)
        results: list[Completion | None] = [None] * len(requests)

        async def run(group: list[int]) -> None:
            async with semaphore:
                completions = await self._call([requests[i] for i in group])
            for index, completion in zip(group, completions):
                results[index] = completion
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
        """One API call for a group of repeats; failures become error completions."""
        import openai

        started = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(**self._params(group[0], len(group)))
        except openai.APITimeoutError:
            error = f"timeout: no answer from {self.base_url} within {self.timeout:g} s " \
                    f"({self.max_retries} retries)"
            return _failed(error, len(group))
        except openai.APIStatusError as exc:
            error = f"api_error: HTTP {exc.status_code} from {self.base_url}: {_error_message(exc)}"
            return _failed(error, len(group))
        except openai.APIConnectionError as exc:
            error = f"connection_error: cannot reach {self.base_url}: {exc.__cause__ or exc}"
            return _failed(error, len(group))
        except openai.OpenAIError as exc:
            error = f"model_error: {type(exc).__name__}: {exc}"
            return _failed(error, len(group))
        latency = time.perf_counter() - started
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
