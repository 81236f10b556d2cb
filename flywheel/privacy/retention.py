"""Retention: captures older than N days are deleted, with their copies (`deletion`).

    result = purge_expired(store, days=30)          # what `flywheel proxy --retention-days 30` runs

The proxy calls `purge_expired` at start and then every `RETENTION_INTERVAL_S`, each time with its
own store connection in a worker thread, so recording is not held up.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from flywheel.privacy.deletion import DeletionResult, delete_captures
from flywheel.privacy.redact import PrivacyError
from flywheel.store import Store, timestamp

RETENTION_INTERVAL_S = 3600.0


def cutoff(days: float) -> str:
    """The store timestamp `days` ago (captures created before it are expired)."""
    if days <= 0:
        raise PrivacyError(f"--retention-days must be positive, got {days:g}")
    return timestamp(datetime.now(timezone.utc) - timedelta(days=days))


def purge_expired(store: Store, days: float) -> DeletionResult:
    """Delete captures older than `days` days and every recorded copy of them."""
    return delete_captures(store, before=cutoff(days), reason=f"retention ({days:g} days)")


def purge_expired_at(db_path: str, days: float) -> DeletionResult:
    """`purge_expired` on its own connection (for a worker thread)."""
    store = Store.open(db_path)
    try:
        return purge_expired(store, days)
    finally:
        store.close()


async def purge_periodically(db_path: str, privacy) -> None:
    """Purge expired captures now and every `privacy.retention_interval_s` until cancelled (the
    proxy's lifespan task). A failed purge is logged and tried again at the next interval."""
    import asyncio
    import logging

    log = logging.getLogger("flywheel.proxy")
    while True:
        try:
            result = await asyncio.to_thread(purge_expired_at, db_path, privacy.retention_days)
            if result.captures:
                log.info("retention: %s", "; ".join(result.summary_lines()))
        except Exception as exc:  # noqa: BLE001 - the proxy keeps serving; the next round retries
            log.error("retention purge failed: %s", exc)
        await asyncio.sleep(privacy.retention_interval_s)
