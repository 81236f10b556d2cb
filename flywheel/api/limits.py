"""Rate limits: requests per minute per API key, as token buckets, answered as the platform does.

Each caller (a key, or the client address on a loopback bind without one) has a bucket of
`burst` requests (default: the whole minute's `rpm`) refilled at rpm/60 per second. A request
takes one token; with none left it is a 429 `rate_limit_exceeded` whose `retry-after` /
`retry-after-ms` say when the next token comes, which the openai SDK's retry honours. Every
answer carries the platform's `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`
and `x-ratelimit-reset-requests` headers.

    limiter = RateLimiter(rpm=600, burst=20)
    decision = limiter.take("key_abc")          # decision.allowed, .remaining, .retry_after_s
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Decision:
    """One request's verdict and the numbers its headers report."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float  # until one token is back (0 when allowed)
    reset_s: float  # until the bucket is full again

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The platform's x-ratelimit-* headers (and retry-after on a refusal)."""
        out = [(b"x-ratelimit-limit-requests", str(self.limit).encode()),
               (b"x-ratelimit-remaining-requests", str(self.remaining).encode()),
               (b"x-ratelimit-reset-requests", duration(self.reset_s).encode())]
        if not self.allowed:
            out += [(b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode()),
                    (b"retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000))).encode())]
        return out


def duration(seconds: float) -> str:
    """The platform's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class RateLimiter:
    """Token buckets by caller; `rpm` requests per minute each, `burst` at once (default `rpm`).
    `rpm` None: only callers with their own limit are limited."""

    def __init__(self, rpm: int | None, burst: int | None = None):
        if rpm is not None and rpm < 1:
            raise ValueError("rpm must be at least 1")
        self.rpm = rpm
        self.burst = burst  # None: a whole minute's requests at once
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at monotonic time)

    def take(self, caller: str, rpm: int | None = None) -> Decision | None:
        """Take one request from `caller`'s bucket (`rpm` overrides the server's for this caller);
        None when neither sets a limit."""
        rpm = rpm or self.rpm
        if rpm is None:
            return None
        burst = min(self.burst or rpm, rpm)
        rate = rpm / 60.0
        now = time.monotonic()
        with self.lock:
            tokens, at = self.buckets.get(caller, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self.buckets[caller] = (tokens, now)
        return Decision(allowed=allowed, limit=rpm, remaining=int(tokens),
                        retry_after_s=0.0 if allowed else (1.0 - tokens) / rate,
                        reset_s=(burst - tokens) / rate)
