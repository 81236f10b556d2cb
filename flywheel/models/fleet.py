"""A fleet of OpenAI-compatible servers serving one model: per-server concurrency and health.

    fleet = Fleet([Server(url, client, limit=8) for url, client in ...])
    server = await fleet.acquire()          # the healthy server with the most free slots
    try:
        ... call server.client ...
        fleet.succeeded(server)
    except ConnectionError:
        fleet.failed(server)                # skipped for a cool-down, then tried again
    finally:
        fleet.release(server)

`openai:` models with a list `base_url` use one; a single URL is a fleet of one. A server that fails
(connection refused, timeout, 5xx, 429) is marked down for a cool-down that doubles with each
failure in a row (1 s, 2 s, 4 s, ... capped at `max_cooldown_s`); when it ends, the server is offered
requests again, and one success clears its record. `acquire` waits while every server is busy or
down, so the fleet never sends a request to a server known to be down unless all of them are.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Server:
    """One server in a fleet: its URL, its SDK client and its live counters."""

    url: str
    client: Any
    limit: int
    in_flight: int = 0
    failures: int = 0          # failures in a row; 0 = healthy
    down_until: float = 0.0    # monotonic time before which the server is skipped
    served: int = 0            # successful calls, for reports and tests
    failed: int = 0            # failed calls in all

    def is_up(self, now: float) -> bool:
        return self.down_until <= now


@dataclass
class Fleet:
    """Servers sharing the load of one model. Use from one event loop."""

    servers: list[Server]
    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    _changed: asyncio.Event | None = field(default=None, repr=False)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _pick(self, now: float) -> Server | None:
        free = [s for s in self.servers if s.is_up(now) and s.in_flight < s.limit]
        if not free:
            return None
        # The least loaded (relative to its limit); ties go to the one listed first.
        return min(free, key=lambda s: s.in_flight / s.limit)

    async def acquire(self) -> Server:
        """Take a slot on the healthy server with the most room; wait while there is none."""
        changed = self._event()
        while True:
            now = time.monotonic()
            server = self._pick(now)
            if server is not None:
                server.in_flight += 1
                return server
            # No await between the check and the clear: a release cannot slip in between (one
            # event loop). Wake on a release, or when the first cool-down ends.
            changed.clear()
            downs = [s.down_until - now for s in self.servers if not s.is_up(now)]
            timeout = max(min(downs), 0.01) if downs else None
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def release(self, server: Server) -> None:
        """Give back the slot taken by `acquire`."""
        server.in_flight -= 1
        self._event().set()

    def succeeded(self, server: Server) -> None:
        """A call answered: the server is healthy again."""
        server.failures = 0
        server.down_until = 0.0
        server.served += 1

    def failed(self, server: Server) -> None:
        """A call failed for a reason of the server's: skip it for a growing cool-down."""
        server.failures += 1
        server.failed += 1
        cooldown = min(self.base_cooldown_s * 2 ** (server.failures - 1), self.max_cooldown_s)
        server.down_until = max(server.down_until, time.monotonic() + cooldown)

    def stats(self) -> list[dict[str, Any]]:
        """Per server: url, calls served, calls failed, whether it is up now."""
        now = time.monotonic()
        return [{"url": s.url, "served": s.served, "failed": s.failed, "up": s.is_up(now)}
                for s in self.servers]
