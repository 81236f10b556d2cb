"""The SQLite store: one file, WAL mode, written with sqlite-utils.

The schema lives in `flywheel.migrations`; this module reads and writes rows. A sample and its
grades are written in one transaction, so a killed process leaves either both or neither.

    store = Store.open("flywheel.db")
    for run in store.list_runs(): ...
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from flywheel.errors import StoreError
from flywheel.migrations import SchemaTooNew, apply_migrations, missing_schema, pending_migrations

DEFAULT_DB = "flywheel.db"
DEFAULT_BUSY_TIMEOUT = 30.0


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def default_db_path() -> str:
    return os.environ.get("FLYWHEEL_DB", DEFAULT_DB)


def busy_timeout() -> float:
    """Seconds a writer waits for a busy database before giving up ($FLYWHEEL_DB_TIMEOUT, default 30)."""
    raw = os.environ.get("FLYWHEEL_DB_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_BUSY_TIMEOUT
    except ValueError:
        raise StoreError(f"$FLYWHEEL_DB_TIMEOUT={raw!r}: expected a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise StoreError(f"$FLYWHEEL_DB_TIMEOUT={raw!r}: expected a finite number of seconds >= 0")
    return value


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


@dataclass
class SampleRecord:
    """A sample and its grades, ready to be written together."""

    iteration_id: str
    item_key: str
    repeat: int
    input_json: str
    output_text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost: float = 0.0
    cache_hit: bool = False
    error: str | None = None
    grades: list[dict[str, Any]] = field(default_factory=list)
    cache_key: str | None = None
    model_fingerprint: str | None = None


class Store:
    def __init__(self, db: sqlite_utils.Database, path: str):
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Store":
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
        return cls(db, path)

    def close(self) -> None:
        self.db.conn.close()

    # -- definitions ----------------------------------------------------------------------------
    def save_eval(self, eval_id: str, name: str, spec_path: str, spec_json: str) -> None:
        with self.db.conn:
            self.db["evals"].insert(
                {"id": eval_id, "name": name, "spec_path": spec_path, "spec_json": spec_json,
                 "created_at": now()}, ignore=True)

    def save_dataset(self, dataset_id: str, path: str, items: Sequence[Any]) -> None:
        """Store a dataset's items once per content hash."""
        if self.db["datasets"].count_where("id = ?", [dataset_id]):
            return
        with self.db.conn:
            # `ignore`: a second process saving the same dataset at the same moment is no error.
            self.db["datasets"].insert(
                {"id": dataset_id, "path": path, "n_items": len(items), "created_at": now()}, ignore=True)
            self.db["items"].insert_all(
                ({"dataset_id": dataset_id, "key": item.key, "split": item.split, "line": item.line,
                  "fields_json": json.dumps(item.fields, ensure_ascii=False)} for item in items),
                batch_size=1000, ignore=True)

    def save_prompt(self, prompt: Any, origin: str, parent_id: str | None = None,
                    rationale: str | None = None) -> None:
        """Store a `flywheel.prompt.Prompt` once per content id (the first origin is kept)."""
        with self.db.conn:
            self.db["prompts"].insert(
                {"id": prompt.id, "messages_json": json.dumps(prompt.messages, ensure_ascii=False),
                 "demos_json": json.dumps([d.__dict__ for d in prompt.demos], ensure_ascii=False)
                 if prompt.demos else None,
                 "nearest": prompt.nearest or None, "origin": origin, "parent_id": parent_id,
                 "rationale": rationale, "created_at": now()}, ignore=True)

    def get_prompt(self, prompt_id: str) -> dict[str, Any]:
        """The stored prompt as `Prompt.from_json` reads it."""
        row = self.db["prompts"].get(prompt_id)
        data: dict[str, Any] = {"messages": json.loads(row["messages_json"])}
        if row.get("demos_json"):
            data["demos"] = json.loads(row["demos_json"])
        if row.get("nearest"):
            data["nearest"] = row["nearest"]
        return data

    # -- runs and iterations --------------------------------------------------------------------
    def find_unfinished_run(self, config_key: str) -> dict[str, Any] | None:
        rows = list(self.db["runs"].rows_where(
            "config_key = ? and status = 'running'", [config_key], order_by="started_at desc", limit=1))
        return rows[0] if rows else None

    def create_run(self, **fields: Any) -> str:
        run_id = fields.pop("id", None) or new_id("run")
        with self.db.conn:
            self.db["runs"].insert({"id": run_id, "status": "running", "started_at": now(), **fields})
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        with self.db.conn:
            self.db["runs"].update(run_id, {"status": status, "finished_at": now(),
                                            "summary_json": json.dumps(summary)})

    def get_run(self, run_id: str) -> dict[str, Any]:
        matches = list(self.db["runs"].rows_where("id = ? or id like ?", [run_id, f"%{run_id}"], limit=2))
        if len(matches) != 1:
            raise StoreError(f"{self.path}: {'no' if not matches else 'more than one'} run matches {run_id!r}")
        return matches[0]

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.db["runs"].rows_where(order_by="started_at desc", limit=limit))

    def iteration_for(self, run_id: str, seq: int, **fields: Any) -> str:
        """The iteration `seq` of a run, created on first use (so resuming finds the same one)."""
        existing = list(self.db["iterations"].rows_where("run_id = ? and seq = ?", [run_id, seq]))
        if existing:
            return existing[0]["id"]
        iteration_id = f"{run_id}/{seq}"
        with self.db.conn:
            # `ignore`: another process resuming the same run may have just created it.
            self.db["iterations"].insert({"id": iteration_id, "run_id": run_id, "seq": seq,
                                          "created_at": now(), **fields}, ignore=True)
        return iteration_id

    def find_iteration(self, run_id: str, **match: Any) -> dict[str, Any] | None:
        """The first iteration of a run whose columns equal `match` (how a resumed search finds its work)."""
        where = " and ".join(f"[{key}] is ?" for key in match)
        rows = list(self.db["iterations"].rows_where(
            f"run_id = ? and {where}", [run_id, *match.values()], order_by="seq", limit=1))
        return rows[0] if rows else None

    def next_seq(self, run_id: str) -> int:
        value = self.db.execute("select max(seq) from iterations where run_id = ?", [run_id]).fetchone()[0]
        return 0 if value is None else value + 1

    def update_iteration(self, iteration_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db["iterations"].update(iteration_id, fields)

    def iterations(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.db["iterations"].rows_where("run_id = ?", [run_id], order_by="seq"))

    # -- samples, grades, cache -----------------------------------------------------------------
    def done_keys(self, iteration_id: str) -> set[tuple[str, int]]:
        rows = self.db.execute(
            "select item_key, repeat from samples where iteration_id = ?", [iteration_id]).fetchall()
        return {(key, repeat) for key, repeat in rows}

    def cached(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Completion-cache rows for the given keys (looked up in chunks)."""
        keys = list(keys)
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.query(f"select * from completion_cache where key in ({marks})", chunk):
                found[row["key"]] = row
        return found

    def write_samples(self, records: Sequence[SampleRecord]) -> int:
        """Write samples, their grades and new cache rows in one transaction; return how many were new.

        A sample whose (iteration, item, repeat) is already stored (another process running the same
        eval wrote it first) is skipped with its grades: the store keeps one copy of each sample.
        """
        if not records:
            return 0
        created = now()
        written = 0
        with self.db.conn:
            cursor = self.db.conn.cursor()
            for rec in records:
                cursor.execute(
                    "insert or ignore into samples (iteration_id, item_key, repeat, input_json, output_text,"
                    " finish_reason, prompt_tokens, completion_tokens, latency_s, cost, cache_hit,"
                    " error, created_at) values (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.iteration_id, rec.item_key, rec.repeat, rec.input_json, rec.output_text,
                     rec.finish_reason, rec.prompt_tokens, rec.completion_tokens, rec.latency_s,
                     rec.cost, int(rec.cache_hit), rec.error, created))
                if cursor.rowcount == 1:
                    written += 1
                    sample_id = cursor.lastrowid
                    cursor.executemany(
                        "insert into grades (sample_id, grader, score, passed, feedback, details_json,"
                        " error, error_details) values (?,?,?,?,?,?,?,?)",
                        [(sample_id, g["grader"], g["score"], int(g["passed"]), g.get("feedback"),
                          json.dumps(g.get("details") or {}, ensure_ascii=False, default=str),
                          g.get("error"), g.get("error_details")) for g in rec.grades])
                if rec.cache_key and not rec.cache_hit and rec.error is None:
                    cursor.execute(
                        "insert or ignore into completion_cache (key, model_fingerprint, output_text,"
                        " finish_reason, prompt_tokens, completion_tokens, latency_s, cost, created_at)"
                        " values (?,?,?,?,?,?,?,?,?)",
                        (rec.cache_key, rec.model_fingerprint, rec.output_text, rec.finish_reason,
                         rec.prompt_tokens, rec.completion_tokens, rec.latency_s, rec.cost, created))
        return written

    def cache_completions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add completions made outside an eval (e.g. a proposer's) to the completion cache."""
        created = now()
        with self.db.conn:
            self.db.conn.executemany(
                "insert or ignore into completion_cache (key, model_fingerprint, output_text, finish_reason,"
                " prompt_tokens, completion_tokens, latency_s, cost, created_at) values (?,?,?,?,?,?,?,?,?)",
                [(r["key"], r["model_fingerprint"], r["output_text"], r.get("finish_reason"),
                  r.get("prompt_tokens", 0), r.get("completion_tokens", 0), r.get("latency_s", 0.0),
                  r.get("cost", 0.0), created) for r in rows])

    def samples_with_grades(self, iteration_id: str) -> list[dict[str, Any]]:
        """Every sample of an iteration with a `grades` list, in item order."""
        samples = list(self.db.query(
            "select * from samples where iteration_id = ? order by id", [iteration_id]))
        by_id = {s["id"]: {**s, "grades": []} for s in samples}
        for grade in self.db.query(
                "select g.* from grades g join samples s on s.id = g.sample_id"
                " where s.iteration_id = ? order by g.sample_id, g.grader", [iteration_id]):
            by_id[grade["sample_id"]]["grades"].append(grade)
        return list(by_id.values())

    # -- captures (flywheel proxy) ---------------------------------------------------------------
    CAPTURE_COLUMNS = ("created_at", "endpoint", "upstream", "model", "stream", "status", "latency_s",
                       "prompt_tokens", "completion_tokens", "total_tokens", "metadata_json",
                       "request_json", "request_bytes", "response_json", "response_id", "error")

    def insert_captures(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Record proxied calls in one transaction; returns their ids."""
        ids = []
        marks = ",".join("?" * len(self.CAPTURE_COLUMNS))
        with self.db.conn:
            cursor = self.db.conn.cursor()
            for row in rows:
                values = [row.get(c) for c in self.CAPTURE_COLUMNS]
                values[0] = values[0] or now()
                cursor.execute(f"insert into captures ({', '.join(self.CAPTURE_COLUMNS)}) values ({marks})", values)
                ids.append(cursor.lastrowid)
        return ids

    def query_captures(self, *, metadata: dict[str, str] | None = None, since: str | None = None,
                       until: str | None = None, model: str | None = None, outcome: str | None = None,
                       limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        """Captures filtered by metadata values (all must match), time [since, until), model and
        outcome (`ok`: status 200 without error, `failed`: the others)."""
        where, params = [], []
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if since:
            where.append("created_at >= ?")
            params.append(since)
        if until:
            where.append("created_at < ?")
            params.append(until)
        if model:
            where.append("model = ?")
            params.append(model)
        if outcome == "ok":
            where.append("error is null and status = 200")
        elif outcome == "failed":
            where.append("(error is not null or status is not 200)")
        sql = "select * from captures" + (" where " + " and ".join(where) if where else "")
        sql += " order by created_at desc, id desc" if newest_first else " order by created_at, id"
        if limit:
            sql += f" limit {int(limit)}"
        return list(self.db.query(sql, params))

    # -- reviews and report reads (flywheel.reviews, flywheel.report) ----------------------------
    REVIEW_COLUMNS = ("created_at", "reviewer", "sample_id", "other_sample_id", "verdict", "preference",
                      "correction", "note")

    def add_review(self, row: dict[str, Any]) -> int:
        """Append one review row (see `flywheel.reviews.add_review` for the checked entry point)."""
        values = {c: row.get(c) for c in self.REVIEW_COLUMNS}
        values["created_at"] = values["created_at"] or now()
        with self.db.conn:
            return self.db["reviews"].insert(values).last_pk

    def reviews_for_iterations(self, iteration_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Reviews whose sample (or compared sample) belongs to one of the iterations, oldest first."""
        if not iteration_ids:
            return []
        marks = ",".join("?" * len(iteration_ids))
        return list(self.db.query(
            "select * from reviews where sample_id in (select id from samples where iteration_id in"
            f" ({marks})) or other_sample_id in (select id from samples where iteration_id in ({marks}))"
            " order by id", [*iteration_ids, *iteration_ids]))

    def get_iteration(self, iteration_id: str) -> dict[str, Any]:
        rows = list(self.db["iterations"].rows_where("id = ?", [iteration_id]))
        if not rows:
            raise StoreError(f"{self.path}: no iteration {iteration_id!r}")
        return rows[0]

    def samples_by_id(self, sample_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(dict.fromkeys(int(i) for i in sample_ids))
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for row in self.db.query(f"select * from samples where id in ({','.join('?' * len(chunk))})", chunk):
                found[row["id"]] = row
        return found

    # -- training: teacher captures, training sets, jobs, events, checkpoints (flywheel.train) ----
    def add_teacher_capture(self, row: dict[str, Any]) -> None:
        with self.db.conn:
            self.db["teacher_captures"].insert({"created_at": now(), **row})

    def add_training_set(self, row: dict[str, Any]) -> None:
        """Record a training set once per id (its id derives from its content hash)."""
        with self.db.conn:
            self.db["training_sets"].insert({"created_at": now(), **row}, ignore=True)

    def create_training_job(self, **fields: Any) -> str:
        job_id = fields.pop("id", None) or new_id(f"job-{fields.get('method', 'train')}")
        with self.db.conn:
            self.db["training_jobs"].insert({"id": job_id, "created_at": now(), "status": "running", **fields})
        return job_id

    def update_training_job(self, job_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db["training_jobs"].update(job_id, fields)

    def add_training_events(self, job_id: str, events: Sequence[dict[str, Any]]) -> int:
        """Append log/metric events of a job; events with a `remote_id` already stored are skipped."""
        added = 0
        with self.db.conn:
            for event in events:
                cursor = self.db.conn.execute(
                    "insert or ignore into training_events (job_id, created_at, level, type, message, data_json,"
                    " remote_id) values (?,?,?,?,?,?,?)",
                    (job_id, event.get("created_at") or now(), event.get("level", "info"), event.get("type", "message"),
                     event.get("message"), json.dumps(event.get("data")) if event.get("data") is not None else None,
                     event.get("remote_id")))
                added += cursor.rowcount
        return added

    def training_events(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.db["training_events"].rows_where("job_id = ?", [job_id], order_by="id"))

    def get_checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        rows = list(self.db["checkpoints"].rows_where("id = ?", [checkpoint_id]))
        if not rows:
            raise StoreError(f"{self.path}: no checkpoint {checkpoint_id!r}")
        return rows[0]

    def list_checkpoints(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.db["checkpoints"].rows_where(order_by="created_at desc", limit=limit))

    def update_checkpoint(self, checkpoint_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db["checkpoints"].update(checkpoint_id, fields)

    def insert_checkpoint(self, row: dict[str, Any]) -> None:
        """Insert a checkpoint and mark its job succeeded, in one transaction (both or neither)."""
        with self.db.conn:
            self.db["checkpoints"].insert({"created_at": now(), **row})
            if row.get("job_id"):
                self.db["training_jobs"].update(row["job_id"], {"checkpoint_id": row["id"], "status": "succeeded",
                                                                "finished_at": now()})
