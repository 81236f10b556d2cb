"""The SQLite store: one file, WAL mode, written with sqlite-utils. ALL of Flywheel's SQL lives in
this package; other modules ask `Store`, they do not write SQL.

`Store` is a facade: one mixin per area (`runs`, `captures`, `reviews`, `training`, `privacy`,
`api`, `service`) over `db.StoreBase` (open, WAL, busy handling, transactions). The schema lives in
`flywheel.store.migrations`, typed rows and the one `passed` rule in `flywheel.store.rows`. A
sample and its grades are written in one transaction, so a killed process leaves both or neither.

    >>> store = Store.open(":memory:")
    >>> run_id = store.create_run(kind="eval", config_key="k")
    >>> [run["status"] for run in store.list_runs()]
    ['running']
"""

from __future__ import annotations

from flywheel.errors import StoreError
from flywheel.store.api import ApiStore
from flywheel.store.captures import CapturesStore, CompletionFilter
from flywheel.store.db import (DEFAULT_BUSY_TIMEOUT, DEFAULT_DB, StoreBase, StoreBusy, busy_error, busy_timeout,
                               default_db_path, lock_holders, new_id, now, timestamp,
                               timestamp_from_unix, unix_seconds)
from flywheel.store.privacy import PrivacyStore
from flywheel.store.reviews import ReviewsStore
from flywheel.store.rows import SampleRecord
from flywheel.store.runs import RunsStore
from flywheel.store.service import ServiceStore
from flywheel.store.training import TrainingStore


class Store(RunsStore, CapturesStore, ReviewsStore, TrainingStore, PrivacyStore, ApiStore, ServiceStore, StoreBase):
    """The one door to the database: every area's reads and writes (see the module docstring)."""


__all__ = ["DEFAULT_BUSY_TIMEOUT", "DEFAULT_DB", "CompletionFilter", "SampleRecord", "Store", "StoreBase", "StoreBusy", "StoreError",
           "busy_error", "busy_timeout", "default_db_path", "lock_holders", "new_id", "now", "timestamp",
           "timestamp_from_unix", "unix_seconds"]
