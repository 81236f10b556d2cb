"""The database under the store: open (create, migrate, WAL), busy handling, transactions, ids and times.

Every other module of `flywheel.store` is one area of the `Store` facade built on `StoreBase`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Self

import sqlite_utils

import graders
from flywheel.errors import StoreError
from flywheel.settings import env_seconds
from flywheel.store.migrations import SchemaTooNew, apply_migrations, missing_schema, pending_migrations

DEFAULT_DB = "flywheel.db"
DEFAULT_BUSY_TIMEOUT = 30.0


def timestamp(moment: datetime) -> str:
    """A moment as the text every timestamp column (`*_at`) holds: UTC ISO 8601 with milliseconds,
    `2026-12-06T14:03:07.123+00:00` (a naive datetime is taken as UTC). Fixed width, so text order
    is time order. The same text as SQL's `strftime(migrations.TIMESTAMP_SQL_FORMAT, …)`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def now() -> str:
    """The current time as a stored timestamp (`timestamp`)."""
    return timestamp(datetime.now(timezone.utc))


def later(seconds: float) -> str:
    """The moment `seconds` from now as a stored timestamp (a lease's expiry)."""
    return timestamp(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def timestamp_from_unix(seconds: float) -> str:
    """Unix seconds (the platform API's `created_at`, a hosted job's event) as a stored timestamp."""
    return timestamp(datetime.fromtimestamp(seconds, timezone.utc))


def unix_seconds(stamp: str | None) -> int | None:
    """A stored timestamp as whole unix seconds, as the platform API reports times; None for None."""
    return int(datetime.fromisoformat(stamp).timestamp()) if stamp else None


def new_id(prefix: str) -> str:
    """A new, sortable id: `prefix-YYYYmmdd-HHMMSS-xxxxxx`."""
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def default_db_path() -> str:
    """The database a command uses when given none: $FLYWHEEL_DB, else `flywheel.db`."""
    return os.environ.get("FLYWHEEL_DB", DEFAULT_DB)


def busy_timeout() -> float:
    """Seconds a writer waits for a busy database before giving up ($FLYWHEEL_DB_TIMEOUT, default 30)."""
    return env_seconds("FLYWHEEL_DB_TIMEOUT", DEFAULT_BUSY_TIMEOUT, zero_ok=True, error=StoreError)


class StoreBusy(StoreError):
    """Another process held the database's write lock for longer than the busy timeout."""


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("database is locked" in text or "database is busy" in text)


def lock_holders(path: str) -> list[str]:
    """Other processes with the database (or its -wal) open, as `pid N (command)`; Linux /proc only."""
    try:
        targets = {os.path.realpath(path), os.path.realpath(path) + "-wal"}
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & targets:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    command = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                command = "?"
            found.append(f"pid {pid} ({command[:80]})")
    return found


def busy_error(path: str, timeout: float) -> StoreBusy:
    """The one-line error for a database whose lock stayed held past the timeout."""
    holders = lock_holders(path) if path != ":memory:" else []
    who = "held by " + ", ".join(holders[:3]) if holders else "held by another process"
    return StoreBusy(f"{path}: database is busy: its write lock was {who} for more than {timeout:g} s; "
                     "wait for that command to finish, or raise $FLYWHEEL_DB_TIMEOUT")


class _Cursor(sqlite3.Cursor):
    def execute(self, *args: Any) -> "_Cursor":  # type: ignore[override]
        try:
            return super().execute(*args)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise busy_error(self.connection.store_path, self.connection.busy_limit) from None
            raise

    def executemany(self, *args: Any) -> "_Cursor":  # type: ignore[override]
        try:
            return super().executemany(*args)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise busy_error(self.connection.store_path, self.connection.busy_limit) from None
            raise


class _Connection(sqlite3.Connection):
    """A connection whose busy errors (lock held past the timeout) become one-line StoreBusy errors."""

    store_path = ""
    busy_limit = DEFAULT_BUSY_TIMEOUT

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or _Cursor)

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> sqlite3.Cursor:  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)

    def commit(self) -> None:
        try:
            super().commit()
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise busy_error(self.store_path, self.busy_limit) from None
            raise


def _set_wal(conn: sqlite3.Connection, path: str, timeout: float) -> None:
    """Switch to WAL, retrying while a process racing us on a fresh file holds its lock."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            if conn.execute("pragma journal_mode").fetchone()[0] != "wal":
                conn.execute("pragma journal_mode=wal")
            return
        except StoreBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


class StoreBase:
    """The open database and its transactions; the `Store` facade adds one mixin per area on top."""

    def __init__(self, db: sqlite_utils.Database, path: str):
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Self:
        """Open (creating if needed) and migrate a store; StoreError names the path on failure.

        A busy database is waited for ($FLYWHEEL_DB_TIMEOUT seconds, default 30), then refused in
        one line naming the process that holds it when it can be found. A database from a newer
        flywheel, or one missing a table, is refused before anything is written.
        """
        path = str(path or default_db_path())
        if path != ":memory:":
            parent = Path(path).resolve().parent
            if not parent.is_dir():
                raise StoreError(f"{path}: cannot create database: folder {parent} does not exist")
        timeout = busy_timeout()
        try:
            conn = sqlite3.connect(path, timeout=timeout, factory=_Connection)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open database: {exc}") from None
        try:
            conn.store_path, conn.busy_limit = path, timeout
            db = sqlite_utils.Database(conn)
            pending_migrations(db)  # refuse a newer or foreign database before writing to it (WAL included)
            _set_wal(conn, path, timeout)
            conn.execute("pragma synchronous=normal")
            conn.execute("pragma secure_delete=on")  # freed space is zeroed: deleted text leaves the file
            conn.execute("pragma foreign_keys=on")
            apply_migrations(db)
            missing = missing_schema(db)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, SchemaTooNew):
                raise StoreError(f"{path}: {exc}") from None
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{path}: cannot open database: {exc}") from None
            raise
        if missing:
            conn.close()
            what = "table" if "." not in missing[0] else "column"
            raise StoreError(f"{path}: damaged store: {what} {', '.join(missing[:5])} missing although its migration "
                             "is recorded; restore the file from a backup or use another --db")
        if path != ":memory:":
            graders.hide_from_sandbox(path)  # python graders never see the store, wherever it lives
        return cls(db, path)

    def close(self) -> None:
        self.db.conn.close()

    @property
    def artefact_dir(self) -> Path:
        """`.flywheel/` beside the database file (the working directory for an in-memory store):
        adapters (`ckpt/`), training sets (`sets/`) and reports live there, rows point at them."""
        base = Path.cwd() if self.path == ":memory:" else Path(self.path).resolve().parent
        return base / ".flywheel"

    # reads more than one area needs (the `passed` rule's grader set): here, so each mixin stands alone
    def iteration_graders(self, iteration_ids: Iterable[str]) -> dict[str, set[str]]:
        """The graders of each iteration: those that graded any of its samples (what `passed` requires)."""
        ids = sorted(set(iteration_ids))
        found: dict[str, set[str]] = {i: set() for i in ids}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for iteration_id, grader in self.db.execute(
                    "select distinct s.iteration_id, g.grader from grades g join samples s on s.id = g.sample_id"
                    f" where s.iteration_id in ({','.join('?' * len(chunk))})", chunk).fetchall():
                found[iteration_id].add(grader)
        return found

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction around the writes in the block: all of them or none.

        sqlite-utils commits each write on its own unless a transaction is already open, so `with
        conn:` alone does not group its `insert`/`update` calls; this opens one (BEGIN IMMEDIATE: the
        write lock up front, waiting up to the busy timeout) and commits or rolls back at the end.
        Inside an open transaction it adds nothing.
        """
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
