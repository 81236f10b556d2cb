"""What every endpoint shares (`ApiState`): the store (one connection per thread), the upload limit,
the report links, and the job queue to wake when a route queues work."""

from __future__ import annotations

import contextlib
import threading

from flywheel.api.jobs import JobQueue
from flywheel.api.model_access import ServerModels
from flywheel.store import Store


class ApiState:
    """What every endpoint shares: one store connection per thread, limits, the queue to wake."""

    def __init__(self, db_path: str, *, max_upload_bytes: int, report_base: str | None,
                 models: ServerModels | None = None):
        self.db_path = db_path
        self.models = models or ServerModels()  # what API callers may name (flywheel.api.model_access)
        self.max_upload_bytes = max_upload_bytes
        self.report_base = report_base
        self.queue: JobQueue | None = None
        self._local = threading.local()
        self._opened: list[Store] = []

    def store(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store.open(self.db_path)
            self._opened.append(store)
        return store

    def notify(self) -> None:
        if self.queue is not None:
            self.queue.notify()

    def close(self) -> None:
        for store in self._opened:
            with contextlib.suppress(Exception):
                store.close()
        self._opened.clear()
        self._local = threading.local()
