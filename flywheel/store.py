"""The SQLite store: one file, WAL mode, written with sqlite-utils.

The schema lives in `flywheel.migrations`; this module reads and writes rows. A sample and its
grades are written in one transaction, so a killed process leaves either both or neither.

    >>> store = Store.open(":memory:")
    >>> run_id = store.create_run(kind="eval", config_key="k")
    >>> [run["status"] for run in store.list_runs()]
    ['running']
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils
from pydantic import BaseModel

import graders
from flywheel.errors import StoreError
from flywheel.migrations import SchemaTooNew, apply_migrations, missing_schema, pending_migrations
from flywheel.summaries import (EvalSummary, GradeRow, GraderSummary, RunSummary, SampleRow, grader_summaries, objective_value,
                                summarise_rows)

if TYPE_CHECKING:
    from flywheel.cost import CostPerItem

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
    output_tools_json: str | None = None  # the output's tool calls (flywheel.tools), JSON


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

    # -- definitions ----------------------------------------------------------------------------
    def save_eval(self, eval_id: str, name: str, spec_path: str, spec_json: str) -> None:
        with self.transaction():
            self.db["evals"].insert(
                {"id": eval_id, "name": name, "spec_path": spec_path, "spec_json": spec_json,
                 "created_at": now()}, ignore=True)

    def save_dataset(self, dataset_id: str, path: str, items: Sequence[Any]) -> None:
        """Store a dataset's items once per content hash."""
        if self.db["datasets"].count_where("id = ?", [dataset_id]):
            return
        with self.transaction():
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
        with self.transaction():
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

    def prompt_messages(self, prompt_id: str | None) -> list[dict[str, str]]:
        """A stored prompt's messages ([] when there is none)."""
        if not prompt_id:
            return []
        row = self.db.execute("select messages_json from prompts where id = ?", [prompt_id]).fetchone()
        return json.loads(row[0]) if row and row[0] else []

    def get_eval(self, eval_id: str | None) -> dict[str, Any] | None:
        """The `evals` row (name, spec_json, ...) or None."""
        rows = list(self.db["evals"].rows_where("id = ?", [eval_id])) if eval_id else []
        return rows[0] if rows else None

    def item_fields(self, dataset_id: str) -> dict[str, dict[str, Any]]:
        """A stored dataset's item fields by item key."""
        return {key: json.loads(fields_json or "{}") for key, fields_json in self.db.execute(
            "select key, fields_json from items where dataset_id = ?", [dataset_id]).fetchall()}

    # -- runs and iterations --------------------------------------------------------------------
    def find_unfinished_run(self, config_key: str) -> dict[str, Any] | None:
        rows = list(self.db["runs"].rows_where(
            "config_key = ? and status = 'running'", [config_key], order_by="started_at desc", limit=1))
        return rows[0] if rows else None

    def create_run(self, **fields: Any) -> str:
        run_id = fields.pop("id", None) or new_id("run")
        with self.transaction():
            self.db["runs"].insert({"id": run_id, "status": "running", "started_at": now(), **fields})
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any] | BaseModel) -> None:
        """Mark a run finished with its summary (an `EvalSummary` for eval runs)."""
        text = summary.model_dump_json(exclude_none=True) if isinstance(summary, BaseModel) else json.dumps(summary)
        with self.transaction():
            self.db["runs"].update(run_id, {"status": status, "finished_at": now(), "summary_json": text})

    @staticmethod
    def run_summary(run: dict[str, Any]) -> RunSummary:
        """What any run's summary says of its size, pass rate and wall time (all optional)."""
        return RunSummary.model_validate_json(run.get("summary_json") or "{}")

    @staticmethod
    def eval_summary_of(run: dict[str, Any]) -> EvalSummary | None:
        """An eval run's stored `EvalSummary` (None while it runs)."""
        return EvalSummary.model_validate_json(run["summary_json"]) if run.get("summary_json") else None

    def save_run_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Overwrite a running run's summary with its progress (what the wheel resumes from)."""
        with self.transaction():
            self.db["runs"].update(run_id, {"summary_json": json.dumps(state, default=str)})

    def reopen_run(self, run_id: str) -> None:
        """Mark a run running again (it is being resumed)."""
        with self.transaction():
            self.db["runs"].update(run_id, {"status": "running"})

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
        with self.transaction():
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

    def best_valid_prompt(self, eval_name: str, model_ref: str) -> tuple[str, float] | None:
        """(prompt id, score) of the best-scoring `valid` iteration of a completed run of this eval
        and model (capture iterations excepted), or None."""
        row = self.db.execute(
            "select i.prompt_id, i.score from iterations i join runs r on r.id = i.run_id join evals e"
            " on e.id = r.eval_id where e.name = ? and i.split = 'valid' and i.model_ref = ? and i.score is not null"
            " and i.stage != 'capture' and r.status = 'completed' order by i.score desc, i.created_at limit 1",
            [eval_name, model_ref]).fetchone()
        return (row[0], row[1]) if row else None

    def update_iteration(self, iteration_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["iterations"].update(iteration_id, fields)

    def iterations(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.db["iterations"].rows_where("run_id = ?", [run_id], order_by="seq"))

    def count_run_rows(self, run_ids: Sequence[str]) -> tuple[int, int]:
        """(iterations, samples) of the given runs."""
        marks = ",".join("?" * len(run_ids))
        iterations, samples = self.db.execute(
            f"select count(distinct i.id), count(s.id) from iterations i left join samples s on s.iteration_id = i.id"
            f" where i.run_id in ({marks})", list(run_ids)).fetchone()
        return iterations, samples

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
        with self.transaction():
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
                    if rec.output_tools_json:
                        cursor.execute("update samples set output_tools_json = ? where id = ?",
                                       (rec.output_tools_json, sample_id))
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
                    if rec.output_tools_json:
                        cursor.execute("update completion_cache set output_tools_json = ? where key = ?",
                                       (rec.output_tools_json, rec.cache_key))
        return written

    def cache_completions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add completions made outside an eval (e.g. a proposer's) to the completion cache."""
        created = now()
        with self.transaction():
            self.db.conn.executemany(
                "insert or ignore into completion_cache (key, model_fingerprint, output_text, finish_reason,"
                " prompt_tokens, completion_tokens, latency_s, cost, created_at) values (?,?,?,?,?,?,?,?,?)",
                [(r["key"], r["model_fingerprint"], r["output_text"], r.get("finish_reason"),
                  r.get("prompt_tokens", 0), r.get("completion_tokens", 0), r.get("latency_s", 0.0),
                  r.get("cost", 0.0), created) for r in rows])

    def samples_with_grades(self, iteration_id: str, objective: tuple[str, str] | None = None, *,
                            details: bool = True) -> list[dict[str, Any]]:
        """Every sample of an iteration with a `grades` list (rows of `grades`), in item order.

        With `objective=(grader, metric)` each sample also gets its objective `score` and `passed`
        (`flywheel.summaries.objective_value`: an errored or ungraded sample is 0 and fails).
        `details=False` reads only the columns reports show (no grade `details_json`/`error_details`,
        no sample `finish_reason`/`created_at`): large runs render faster.
        """
        columns = "*" if details else ("id, item_key, repeat, input_json, output_text, error, prompt_tokens,"
                                       " completion_tokens, latency_s, cost, cache_hit")
        samples = list(self.db.query(
            f"select {columns} from samples where iteration_id = ? order by id", [iteration_id]))
        by_id = {}
        for sample in samples:
            sample["grades"] = []
            by_id[sample["id"]] = sample
        for grade in self.db.query(
                f"select {'g.*' if details else 'g.sample_id, g.grader, g.score, g.passed, g.feedback, g.error'}"
                " from grades g join samples s on s.id = g.sample_id"
                " where s.iteration_id = ? order by g.sample_id, g.grader", [iteration_id]):
            by_id[grade["sample_id"]]["grades"].append(grade)
        if objective is not None:
            grader, metric = objective
            for sample in by_id.values():
                grade = next((g for g in sample["grades"] if g["grader"] == grader), None)
                sample["score"], sample["passed"] = objective_value(
                    sample["error"], grade["score"] if grade else None, grade["passed"] if grade else None, metric)
        return list(by_id.values())

    def objective_scores(self, iteration_id: str, grader: str,
                         metric: str | None = None) -> dict[tuple[str, int], tuple[float, bool]]:
        """(score, passed) on the objective grader per (item_key, repeat) of an iteration.

        An errored or ungraded sample is (0.0, False); `metric` as `summaries.objective_value` reads it
        (None: the grader's raw score, which the paired promotion test compares).
        """
        rows = self.db.execute(
            "select s.item_key, s.repeat, s.error, g.score, g.passed from samples s left join grades g"
            " on g.sample_id = s.id and g.grader = ? where s.iteration_id = ?", [grader, iteration_id]).fetchall()
        return {(key, repeat): objective_value(error, score, passed, metric)
                for key, repeat, error, score, passed in rows}

    def _summary_rows(self, iteration_id: str) -> tuple[list[SampleRow], list[GradeRow]]:
        samples = [SampleRow(*r) for r in self.db.execute(
            "select id, item_key, repeat, error, prompt_tokens, completion_tokens, cost from samples"
            " where iteration_id = ? order by item_key, repeat", [iteration_id]).fetchall()]
        grades = [GradeRow(r[0], r[1], r[2], bool(r[3]), r[4]) for r in self.db.execute(
            "select g.sample_id, g.grader, g.score, g.passed, g.error from grades g"
            " join samples s on s.id = g.sample_id where s.iteration_id = ? order by g.sample_id, g.grader",
            [iteration_id]).fetchall()]
        return samples, grades

    def grader_stats(self, iteration_id: str, *, ci: bool = True) -> list[GraderSummary]:
        """Per-grader statistics of an iteration (errored samples score 0), graders by name.

        `ci=False` skips the bootstrap CI of each mean (NaN) and adds up in SQL: what reports of
        large runs need, several times faster. Both ways count as `summaries.grader_summaries` does.
        """
        if ci:
            return grader_summaries(*self._summary_rows(iteration_id), ci=True)
        n, errored = self.db.execute("select count(*), count(error) from samples where iteration_id = ?",
                                     [iteration_id]).fetchone()
        rows = self.db.execute(
            "select g.grader, sum(g.score), sum(g.passed), count(g.error) from grades g"
            " join samples s on s.id = g.sample_id where s.iteration_id = ? group by g.grader order by g.grader",
            [iteration_id]).fetchall()
        # Errored samples have no grades, so `errored + count(g.error)` counts each failing sample once.
        return [GraderSummary(name=grader, n=n, mean=(total or 0.0) / n if n else math.nan, ci_low=math.nan,
                              ci_high=math.nan, pass_rate=(passes or 0) / n if n else math.nan,
                              errors=errored + grade_errors) for grader, total, passes, grade_errors in rows]

    def eval_summary(self, iteration_id: str, objective_grader: str, metric: str) -> EvalSummary:
        """The `EvalSummary` of an iteration: pass rate, per grader, objective, tokens and cost."""
        samples, grades = self._summary_rows(iteration_id)
        return summarise_rows(samples, grades, objective_grader=objective_grader, metric=metric)

    def sample_outcomes(self, iteration_id: str) -> list[tuple[str, str | None, bool]]:
        """(item_key, error, passed every grader) per sample of an iteration, in id order."""
        rows = self.db.execute(
            "select s.item_key, s.error, min(coalesce(g.passed, 0)), count(g.grader) from samples s"
            " left join grades g on g.sample_id = s.id where s.iteration_id = ? group by s.id order by s.id",
            [iteration_id]).fetchall()
        return [(key, error, bool(error is None and graded and ok)) for key, error, ok, graded in rows]

    def count_errors(self, iteration_id: str) -> int:
        """Samples of an iteration whose generation failed."""
        return self.db.execute("select count(*) from samples where iteration_id = ? and error is not null",
                               [iteration_id]).fetchone()[0]

    # -- captures (flywheel proxy) ---------------------------------------------------------------
    CAPTURE_COLUMNS = ("created_at", "endpoint", "upstream", "model", "stream", "status", "latency_s",
                       "prompt_tokens", "completion_tokens", "total_tokens", "metadata_json",
                       "request_json", "request_bytes", "response_json", "response_id", "error")

    def insert_captures(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Record proxied calls in one transaction; returns their ids."""
        ids = []
        marks = ",".join("?" * len(self.CAPTURE_COLUMNS))
        with self.transaction():
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

    # -- judge calibrations (flywheel.calibration) ------------------------------------------------
    def save_calibration(self, row: dict[str, Any]) -> int:
        """Store one grader's calibration (a `judge_calibrations` row without id and created_at)."""
        with self.transaction():
            cursor = self.db.conn.execute(
                "insert into judge_calibrations (" + ", ".join(["created_at", *row]) + ") values ("
                + ", ".join("?" * (len(row) + 1)) + ")", [now(), *row.values()])
        return cursor.lastrowid

    def latest_calibrations(self, graders: Sequence[str]) -> list[dict[str, Any]]:
        """The newest calibration of each named grader that has one, in the order given."""
        out = []
        for name in dict.fromkeys(graders):
            row = self.db.execute("select * from judge_calibrations where grader = ? order by created_at desc, id desc"
                                  " limit 1", [name]).fetchone()
            if row is not None:
                columns = [d[0] for d in self.db.execute("select * from judge_calibrations limit 0").description]
                out.append(dict(zip(columns, row)))
        return out

    # -- reviews and report reads (flywheel.reviews, flywheel.report) ----------------------------
    REVIEW_COLUMNS = ("created_at", "reviewer", "sample_id", "other_sample_id", "verdict", "preference",
                      "correction", "note")

    def add_review(self, row: dict[str, Any]) -> int:
        """Append one review row (see `flywheel.reviews.add_review` for the checked entry point)."""
        values = {c: row.get(c) for c in self.REVIEW_COLUMNS}
        values["created_at"] = values["created_at"] or now()
        with self.transaction():
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

    def list_reviews(self) -> list[dict[str, Any]]:
        """Every review, oldest first."""
        return list(self.db.query("select * from reviews order by id"))

    def count_reviews(self) -> int:
        return self.db.execute("select count(*) from reviews").fetchone()[0]

    def reviews_of_sample(self, sample_id: int) -> list[dict[str, Any]]:
        """Reviews of a sample, or comparing another sample with it, oldest first."""
        return list(self.db.query("select * from reviews where sample_id = ? or other_sample_id = ? order by id",
                                  [sample_id, sample_id]))

    def grades_of_samples(self, sample_ids: Iterable[int]) -> list[dict[str, Any]]:
        """The grade rows of the given samples, by sample then grader."""
        ids = list(dict.fromkeys(int(i) for i in sample_ids))
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            out += self.db.query(f"select * from grades where sample_id in ({','.join('?' * len(chunk))})"
                                 " order by sample_id, grader", chunk)
        return out

    def other_outputs(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Other samples of the same item and repeat (in any iteration): id, iteration, output, error."""
        return list(self.db.query(
            "select id, iteration_id, output_text, error from samples where item_key = ? and repeat = ? and id != ?"
            " order by id", [sample["item_key"], sample["repeat"], sample["id"]]))

    def sample_spec(self, sample_id: int) -> dict[str, Any] | None:
        """The eval spec (as stored JSON, parsed) of the run a sample belongs to."""
        row = self.db.execute(
            "select e.spec_json from samples s join iterations i on i.id = s.iteration_id join runs r on r.id = i.run_id"
            " join evals e on e.id = r.eval_id where s.id = ?", [sample_id]).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def samples_in_dataset(self, sample_ids: Iterable[int], dataset_id: str) -> dict[int, dict[str, Any]]:
        """Of the given samples, those of runs over `dataset_id` (id, item_key, output_text, error)."""
        ids = sorted(set(sample_ids))
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for row in self.db.query(
                    "select s.id, s.item_key, s.output_text, s.error, r.dataset_id from samples s join iterations i"
                    " on i.id = s.iteration_id join runs r on r.id = i.run_id"
                    f" where s.id in ({','.join('?' * len(chunk))})", chunk):
                if row["dataset_id"] == dataset_id:
                    found[row["id"]] = row
        return found

    def search_samples(self, text: str, limit: int = 200) -> list[dict[str, Any]]:
        """Samples whose item key, output or item fields contain `text`, newest first, each with
        `passed` (no error and every grade passed) and its run, seq and stage."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        results = list(self.db.query(
            "select s.id, s.iteration_id, s.item_key, s.repeat, s.output_text, s.error, i.run_id,"
            " i.seq, i.stage, it.fields_json from samples s join iterations i on i.id = s.iteration_id"
            " join runs r on r.id = i.run_id left join items it on it.dataset_id = r.dataset_id and"
            " it.key = s.item_key where s.item_key like :q escape '\\' or s.output_text like :q escape '\\'"
            f" or it.fields_json like :q escape '\\' order by s.id desc limit {int(limit)}", {"q": like}))
        passed: dict[int, bool] = {}
        for grade in self.grades_of_samples(r["id"] for r in results):
            passed[grade["sample_id"]] = passed.get(grade["sample_id"], True) and bool(grade["passed"])
        for r in results:
            r["passed"] = passed.get(r["id"], False) and not r["error"]
        return results

    def samples_version(self, iteration_ids: Sequence[str]) -> tuple[int, int]:
        """(samples in the iterations, highest grade rowid): changes whenever a sample or grade is added."""
        marks = ",".join("?" * len(iteration_ids))
        return tuple(self.db.execute(
            f"select (select count(*) from samples where iteration_id in ({marks})), (select max(rowid) from grades)",
            list(iteration_ids)).fetchone())

    # -- training: teacher captures, training sets, jobs, events, checkpoints (flywheel.train) ----
    def add_teacher_capture(self, row: dict[str, Any]) -> None:
        with self.transaction():
            self.db["teacher_captures"].insert({"created_at": now(), **row})

    def add_training_set(self, row: dict[str, Any]) -> None:
        """Record a training set once per id (its id derives from its content hash)."""
        with self.transaction():
            self.db["training_sets"].insert({"created_at": now(), **row}, ignore=True)

    def create_training_job(self, **fields: Any) -> str:
        job_id = fields.pop("id", None) or new_id(f"job-{fields.get('method', 'train')}")
        with self.transaction():
            self.db["training_jobs"].insert({"id": job_id, "created_at": now(), "status": "running", **fields})
        return job_id

    def update_training_job(self, job_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["training_jobs"].update(job_id, fields)

    def add_training_events(self, job_id: str, events: Sequence[dict[str, Any]]) -> int:
        """Append log/metric events of a job; events with a `remote_id` already stored are skipped."""
        added = 0
        with self.transaction():
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

    def teacher_captures(self, ids: Sequence[str] | None = None, *, eval_name: str | None = None,
                         dataset_id: str | None = None) -> list[dict[str, Any]]:
        """Teacher-capture rows, oldest first: those with `ids`, or those of an eval — over its dataset,
        and over the unlabelled inputs captured for it (their own datasets, split `unlabelled`)."""
        if ids:
            marks = ",".join("?" * len(ids))
            return list(self.db.query(f"select * from teacher_captures where id in ({marks}) order by created_at",
                                      list(ids)))
        return list(self.db.query(
            "select * from teacher_captures where eval_name = ? and (dataset_id = ? or split = 'unlabelled')"
            " order by created_at", [eval_name, dataset_id]))

    def get_training_set(self, set_id: str) -> dict[str, Any] | None:
        rows = list(self.db["training_sets"].rows_where("id = ?", [set_id]))
        return rows[0] if rows else None

    def latest_checkpoint_for(self, model_ref: str) -> str | None:
        """The id of the newest checkpoint registered under `model_ref`, if any."""
        row = self.db.execute("select id from checkpoints where model_ref = ? order by created_at desc limit 1",
                              [model_ref]).fetchone()
        return row[0] if row else None

    def get_checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        rows = list(self.db["checkpoints"].rows_where("id = ?", [checkpoint_id]))
        if not rows:
            raise StoreError(f"{self.path}: no checkpoint {checkpoint_id!r}")
        return rows[0]

    def checkpoint_row(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The checkpoint's row, or None when there is no such checkpoint."""
        rows = list(self.db["checkpoints"].rows_where("id = ?", [checkpoint_id], limit=1))
        return rows[0] if rows else None

    def find_checkpoint(self, *, method: str, training_set_hash: str, config_json: str,
                        base_model: str) -> dict[str, Any] | None:
        """The newest checkpoint trained by `method` on this set with this config from this base: the
        one its job chose (a job saving every N steps registers several; a killed job chose none)."""
        rows = list(self.db["checkpoints"].rows_where(
            "method = ? and training_set_hash = ? and config_json = ? and base_model = ? and (job_id is null or id in"
            " (select checkpoint_id from training_jobs where status = 'succeeded' and checkpoint_id is not null))",
            [method, training_set_hash, config_json, base_model], order_by="created_at desc", limit=1))
        return rows[0] if rows else None

    def update_checkpoint(self, checkpoint_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["checkpoints"].update(checkpoint_id, fields)

    @contextlib.contextmanager
    def transaction(self):
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

    def insert_checkpoint(self, row: dict[str, Any], *, finish_job: bool = True) -> None:
        """Insert a checkpoint and (unless `finish_job` is False: an intermediate checkpoint) mark its
        job succeeded, in one transaction (both or neither)."""
        with self.transaction():
            self.db["checkpoints"].insert({"created_at": now(), **row})
            if row.get("job_id") and finish_job:
                self.db["training_jobs"].update(row["job_id"], {"checkpoint_id": row["id"], "status": "succeeded",
                                                                "finished_at": now()})

    def job_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """A training job's checkpoints, pruned ones included, by step (then creation)."""
        return list(self.db.query("select * from checkpoints where job_id = ? order by coalesce(step, 0), created_at",
                                  [job_id]))

    def training_job_of(self, model_ref: str) -> str | None:
        """The job that trained the checkpoint registered under `model_ref`, if any."""
        row = self.db.execute("select job_id from checkpoints where model_ref = ? and job_id is not null"
                              " order by created_at desc limit 1", [model_ref]).fetchone()
        return row[0] if row else None

    def get_training_job(self, job_id: str) -> dict[str, Any]:
        rows = list(self.db["training_jobs"].rows_where("id = ?", [job_id]))
        if not rows:
            raise StoreError(f"{self.path}: no training job {job_id!r}")
        return rows[0]

    def find_resumable_job(self, *, method: str, training_set_id: str, base_model: str,
                           config_json: str) -> dict[str, Any] | None:
        """The newest unfinished local job (running or failed) of this method, set, base and config that
        has an output folder: a training run killed part-way, which the same command resumes."""
        rows = list(self.db["training_jobs"].rows_where(
            "backend = 'local' and method = ? and training_set_id = ? and base_model = ? and config_json = ?"
            " and status in ('running', 'failed') and output_dir is not null",
            [method, training_set_id, base_model, config_json], order_by="created_at desc", limit=1))
        return rows[0] if rows else None

    def finish_training_job(self, job_id: str, *, checkpoint_id: str, stop_reason: str | None) -> None:
        """Mark a job succeeded with its chosen (best) checkpoint and why it stopped."""
        with self.transaction():
            self.db["training_jobs"].update(job_id, {"checkpoint_id": checkpoint_id, "status": "succeeded",
                                                     "finished_at": now(), "stop_reason": stop_reason,
                                                     "error": None})

    # -- hyper-parameter searches (flywheel.train.search) -----------------------------------------------
    def create_training_search(self, **fields: Any) -> str:
        search_id = fields.pop("id", None) or new_id(f"search-{fields.get('method', 'train')}")
        with self.transaction():
            self.db["training_searches"].insert({"id": search_id, "created_at": now(), "status": "running", **fields})
        return search_id

    def update_training_search(self, search_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["training_searches"].update(search_id, fields)

    def get_training_search(self, search_id: str) -> dict[str, Any]:
        rows = list(self.db["training_searches"].rows_where("id = ?", [search_id]))
        if not rows:
            raise StoreError(f"{self.path}: no training search {search_id!r}")
        return rows[0]

    def training_searches(self, run_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Searches, oldest first: all of them, or those a wheel run (one of `run_ids`) started."""
        if not run_ids:
            return list(self.db["training_searches"].rows_where(order_by="created_at"))
        marks = ", ".join("?" for _ in run_ids)
        return list(self.db["training_searches"].rows_where(f"run_id in ({marks})", list(run_ids),
                                                            order_by="created_at"))

    def save_search_trial(self, search_id: str, number: int, **fields: Any) -> None:
        """Insert or update one trial of a search (its row is keyed by search and trial number)."""
        with self.transaction():
            self.db["training_search_trials"].upsert({"search_id": search_id, "number": number, **fields},
                                                     pk=("search_id", "number"))

    def search_trials(self, search_id: str) -> list[dict[str, Any]]:
        return list(self.db["training_search_trials"].rows_where("search_id = ?", [search_id], order_by="number"))

    def newest_training_job(self, since: str) -> str | None:
        """The id of the newest training job created at or after `since` (an ISO timestamp)."""
        row = self.db.execute("select id from training_jobs where created_at >= ? order by created_at desc, "
                              "rowid desc limit 1", [since]).fetchone()
        return row[0] if row else None

    # -- cost per item and extra grades (flywheel.cost, flywheel.distill) -------------------------------
    def iteration_cost(self, iteration_id: str) -> "CostPerItem":
        """Mean tokens, latency and money of an iteration's samples (errored samples included)."""
        from flywheel.cost import CostPerItem

        n, prompt, completion, latency, money = self.db.execute(
            "select count(*), avg(coalesce(prompt_tokens, 0)), avg(coalesce(completion_tokens, 0)),"
            " avg(coalesce(latency_s, 0)), avg(coalesce(cost, 0)) from samples where iteration_id = ?",
            [iteration_id]).fetchone()
        if not n:
            return CostPerItem()
        return CostPerItem(n=n, prompt_tokens=prompt, completion_tokens=completion, latency_s=latency,
                           money_per_1k=1000 * money)

    def record_iteration_latency(self, iteration_id: str) -> None:
        """Store the summed sample latency on the iteration row (tokens and cost are summed already)."""
        with self.transaction():
            self.db.conn.execute(
                "update iterations set latency_s = (select sum(coalesce(latency_s, 0)) from samples"
                " where iteration_id = ?) where id = ?", [iteration_id, iteration_id])

    def add_grades(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add grade rows to stored samples (e.g. self-consistency of unlabelled captures); a grade
        already stored for (sample, grader) is kept."""
        with self.transaction():
            self.db.conn.executemany(
                "insert or ignore into grades (sample_id, grader, score, passed, feedback, details_json, error,"
                " error_details) values (?,?,?,?,?,?,?,?)",
                [(r["sample_id"], r["grader"], r["score"], int(r["passed"]), r.get("feedback"),
                  json.dumps(r.get("details") or {}, ensure_ascii=False, default=str), r.get("error"),
                  r.get("error_details")) for r in rows])

    def dataset_items(self, dataset_id: str) -> list[dict[str, Any]]:
        """A stored dataset's items: key, split, line and fields, in stored order."""
        return [{"key": key, "split": split, "line": line, "fields": json.loads(fields or "{}")}
                for key, split, line, fields in self.db.execute(
                    "select key, split, line, fields_json from items where dataset_id = ? order by rowid",
                    [dataset_id]).fetchall()]

    def prompt_row(self, prompt_id: str) -> dict[str, Any] | None:
        """A stored prompt's row: id, origin, parent_id, rationale (and its JSON columns)."""
        rows = list(self.db["prompts"].rows_where("id = ?", [prompt_id]))
        return rows[0] if rows else None

    # -- privacy: exports, capture lineage, deletions (flywheel.privacy) --------------------------
    def record_export(self, row: dict[str, Any]) -> str:
        """Record a file Flywheel wrote (so a deletion can find the copies in it); returns its id."""
        export_id = row.get("id") or new_id("export")
        with self.transaction():
            self.db["exports"].insert({"created_at": now(), **row, "id": export_id}, replace=True)
        return export_id

    def list_exports(self) -> list[dict[str, Any]]:
        return list(self.db["exports"].rows_where(order_by="created_at"))

    def update_export(self, export_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["exports"].update(export_id, fields)

    def add_capture_copies(self, artefact: str, artefact_id: str, copies: Iterable[tuple[int, str]]) -> None:
        """Lineage: capture `capture_id` became the row hashing to `row_hash` in this artefact."""
        with self.transaction():
            self.db.conn.executemany(
                "insert or ignore into capture_copies (capture_id, artefact, artefact_id, row_hash) values (?,?,?,?)",
                [(int(c), artefact, artefact_id, h) for c, h in copies])

    def capture_copy_hashes(self, capture_ids: Sequence[int]) -> set[str]:
        """Row hashes of every recorded copy of these captures."""
        found: set[str] = set()
        ids = list(capture_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(r[0] for r in self.db.execute(
                f"select row_hash from capture_copies where capture_id in ({','.join('?' * len(chunk))})", chunk))
        return found

    def match_capture_ids(self, *, ids: Sequence[int] = (), metadata: dict[str, str] | None = None,
                          before: str | None = None) -> list[int]:
        """Ids of captures matching every given filter (ids, metadata values, created before)."""
        where, params = [], []
        if ids:
            where.append(f"id in ({','.join('?' * len(ids))})")
            params += [int(i) for i in ids]
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if before:
            where.append("created_at < ?")
            params.append(before)
        if not where:
            raise StoreError("refusing to match every capture: give ids, metadata or a date")
        return [r[0] for r in self.db.execute(f"select id from captures where {' and '.join(where)} order by id",
                                              params)]

    def list_training_sets(self) -> list[dict[str, Any]]:
        return list(self.db["training_sets"].rows_where(order_by="created_at"))

    def update_training_set(self, set_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["training_sets"].update(set_id, fields)

    def checkpoints_trained_on(self, set_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Checkpoints trained on any of these sets, and every checkpoint trained on top of them."""
        found: dict[str, dict[str, Any]] = {}
        frontier = list(self.db["checkpoints"].rows_where(
            f"training_set_id in ({','.join('?' * len(set_ids))})", list(set_ids))) if set_ids else []
        while frontier:
            for row in frontier:
                found[row["id"]] = row
            ids = [r["id"] for r in frontier]
            frontier = [r for r in self.db["checkpoints"].rows_where(
                f"parent_id in ({','.join('?' * len(ids))})", ids) if r["id"] not in found]
        return sorted(found.values(), key=lambda r: r["created_at"] or "")

    def delete_captures(self, capture_ids: Sequence[int], deletion: dict[str, Any],
                        checkpoint_ids: Sequence[str]) -> None:
        """Delete captures and their lineage rows, mark checkpoints and record the deletion, in one
        transaction; freed pages are zeroed (secure_delete) and the WAL is checkpointed and
        truncated, so the deleted text is no longer in the database files."""
        ids = [int(i) for i in capture_ids]
        self.db.execute("pragma secure_delete=on")
        with self.transaction():
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                self.db.conn.execute(f"delete from capture_copies where capture_id in ({marks})", chunk)
                self.db.conn.execute(f"delete from captures where id in ({marks})", chunk)
            for checkpoint_id in checkpoint_ids:
                self.db.conn.execute(
                    "update checkpoints set trained_on_deleted = ? where id = ? and trained_on_deleted is null",
                    [deletion["id"], checkpoint_id])
            self.db["deletions"].insert({"created_at": now(), **deletion})
        self.db.execute("pragma wal_checkpoint(TRUNCATE)")

    def list_deletions(self) -> list[dict[str, Any]]:
        return list(self.db["deletions"].rows_where(order_by="created_at"))


    # -- the platform API (flywheel.api): its objects, the job queue, events, keys ------------------
    API_TABLES = ("api_files", "api_evals", "api_eval_runs", "api_fine_tuning_jobs", "api_wheel_runs", "api_jobs",
                  "api_keys")

    def _api_table(self, table: str) -> str:
        if table not in self.API_TABLES:
            raise StoreError(f"not an API table: {table}")
        return table

    def api_insert(self, table: str, row: dict[str, Any]) -> None:
        with self.transaction():
            self.db[self._api_table(table)].insert(row)

    def api_get(self, table: str, object_id: str) -> dict[str, Any] | None:
        """One API object's row, or None."""
        cursor = self.db.conn.execute(f"select * from {self._api_table(table)} where id = ?", [object_id])
        row = cursor.fetchone()
        return dict(zip([c[0] for c in cursor.description], row)) if row else None

    def api_update(self, table: str, object_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db[self._api_table(table)].update(object_id, fields)

    def api_delete(self, table: str, object_id: str) -> bool:
        with self.transaction():
            return self.db.conn.execute(f"delete from {self._api_table(table)} where id = ?",
                                        [object_id]).rowcount > 0

    def api_list(self, table: str, *, after: str | None = None, limit: int = 20, order: str = "desc",
                 where: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """A page of API objects in creation order (`order` asc/desc) after the object `after`;
        returns the rows and whether more follow."""
        table = self._api_table(table)
        clauses, params = [], []
        for column, value in (where or {}).items():
            clauses.append(f"{column} = ?")
            params.append(value)
        direction, op = ("asc", ">") if order == "asc" else ("desc", "<")
        if after:
            missing = "-1" if op == ">" else "1e18"  # an unknown `after` id pages from the start
            clauses.append(f"rowid {op} coalesce((select rowid from {table} where id = ?), {missing})")
            params.append(after)
        sql = (f"select * from {table}" + (" where " + " and ".join(clauses) if clauses else "")
               + f" order by rowid {direction} limit ?")
        rows = list(self.db.query(sql, [*params, limit + 1]))
        return rows[:limit], len(rows) > limit

    # the queue: `claim_job` is one UPDATE guarded by status, so two workers never take one job
    def enqueue_job(self, job_id: str, kind: str, object_id: str, created_at: int) -> None:
        with self.transaction():
            self.db["api_jobs"].insert({"id": job_id, "kind": kind, "object_id": object_id, "status": "queued",
                                        "cancel_requested": 0, "attempts": 0, "created_at": created_at})

    def claim_job(self, started_at: int) -> dict[str, Any] | None:
        """Take the oldest queued job (status -> running, attempts + 1); None when none is queued."""
        while True:
            row = self.db.conn.execute(
                "select id from api_jobs where status = 'queued' order by rowid limit 1").fetchone()
            if row is None:
                return None
            with self.transaction():
                taken = self.db.conn.execute(
                    "update api_jobs set status = 'running', started_at = ?, attempts = attempts + 1"
                    " where id = ? and status = 'queued'", [started_at, row[0]]).rowcount
            if taken:
                return self.api_get("api_jobs", row[0])

    def finish_job(self, job_id: str, status: str, finished_at: int, error: str | None = None) -> None:
        with self.transaction():
            self.db.conn.execute("update api_jobs set status = ?, finished_at = ?, error = ? where id = ?",
                                 [status, finished_at, error, job_id])

    def request_job_cancel(self, object_id: str) -> dict[str, Any] | None:
        """Flag the job of an API object for cancelling; a queued job is cancelled at once.
        Returns the job row as it is now (None when the object has no job)."""
        with self.transaction():
            self.db.conn.execute("update api_jobs set cancel_requested = 1 where object_id = ?"
                                 " and status in ('queued', 'running')", [object_id])
            self.db.conn.execute("update api_jobs set status = 'cancelled' where object_id = ? and status = 'queued'",
                                 [object_id])
        rows = list(self.db.query("select * from api_jobs where object_id = ? order by rowid desc limit 1",
                                  [object_id]))
        return rows[0] if rows else None

    def job_cancel_requested(self, job_id: str) -> bool:
        row = self.db.conn.execute("select cancel_requested from api_jobs where id = ?", [job_id]).fetchone()
        return bool(row and row[0])

    def requeue_running_jobs(self, job_id: str | None = None) -> list[str]:
        """Jobs left `running` by a server that died (or `job_id` alone) go back to the queue (a
        fine-tuning job's unfinished training job says `queued` too: one status per fine-tune)."""
        where, params = ("status = 'running'", []) if job_id is None else ("status = 'running' and id = ?", [job_id])
        ids = [r[0] for r in self.db.conn.execute(f"select id from api_jobs where {where}", params).fetchall()]
        with self.transaction():
            self.db.conn.execute(f"update api_jobs set status = 'queued' where {where}", params)
            for queued in ids:
                self.db.conn.execute(
                    "update training_jobs set status = 'queued' where status != 'succeeded' and id = (select"
                    " f.training_job_id from api_fine_tuning_jobs f join api_jobs j on j.object_id = f.id"
                    " where j.id = ?)", [queued])
        return ids

    # -- one status per fine-tune: the training job's (the queue row's while it has none) ----------
    def fine_tuning_status(self, object_id: str) -> str:
        """The status of fine-tuning job `object_id`: its training job's (queued, running, paused,
        succeeded, failed, cancelled), or its queue row's while it has no training job yet. While the
        queue still runs the API job it reads `running`: a trainer that finished (the model is being
        named) or stopped for a pause or cancel is settled by the runner a moment later."""
        row = self.db.conn.execute(
            "select t.status, (select j.status from api_jobs j where j.object_id = f.id order by j.rowid desc"
            " limit 1) from api_fine_tuning_jobs f left join training_jobs t on t.id = f.training_job_id"
            " where f.id = ?", [object_id]).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no fine-tuning job {object_id!r}")
        training, queue = row
        if training is None:
            return queue or "queued"
        return "running" if queue == "running" else training

    def set_fine_tuning_status(self, object_id: str, status: str, error: str | None = None) -> None:
        """Record what the API did to fine-tuning job `object_id` (queued, paused, cancelled, failed)
        on its training job; without one yet the queue row already says it."""
        fields: dict[str, Any] = {"status": status, **({"error": error} if error else {})}
        with self.transaction():
            row = self.db.conn.execute("select training_job_id from api_fine_tuning_jobs where id = ?",
                                       [object_id]).fetchone()
            if row and row[0]:
                self.db["training_jobs"].update(row[0], fields)

    def count_jobs(self) -> dict[str, int]:
        return dict(self.db.conn.execute("select status, count(*) from api_jobs group by status").fetchall())

    # events of API objects (eval runs, fine-tuning jobs), paged by id
    def add_api_event(self, object_id: str, message: str, *, created_at: int, level: str = "info",
                      type: str = "message", data: dict[str, Any] | None = None) -> int:
        with self.transaction():
            return self.db.conn.execute(
                "insert into api_events (object_id, created_at, level, type, message, data_json)"
                " values (?,?,?,?,?,?)", [object_id, created_at, level, type, message,
                                          json.dumps(data) if data is not None else None]).lastrowid

    def api_events(self, object_id: str, *, after: int | None = None, limit: int = 20,
                   newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        op, direction = ("<", "desc") if newest_first else (">", "asc")
        sql = "select * from api_events where object_id = ?"
        params: list[Any] = [object_id]
        if after is not None:
            sql += f" and id {op} ?"
            params.append(after)
        rows = list(self.db.query(sql + f" order by id {direction} limit ?", [*params, limit + 1]))
        return rows[:limit], len(rows) > limit

    def api_key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from api_keys where key_hash = ? and not revoked", [key_hash]))
        return rows[0] if rows else None

    # output items of an eval run: the harness samples of its iteration, with grades and item fields
    _ITEM_OK = ("(s.error is null and not exists (select 1 from grades g where g.sample_id = s.id"
                " and (g.passed = 0 or g.error is not null)))")
    _ITEM_ERRORED = ("(s.error is not null or exists (select 1 from grades g where g.sample_id = s.id"
                     " and g.error is not null))")

    def output_items(self, iteration_id: str, *, after: int | None = None, limit: int = 20, order: str = "asc",
                     status: str | None = None, sample_id: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """A page of an iteration's samples (by id) with `passed`, `line`, `fields_json` and `grades`.
        `status` 'pass' / 'fail' keeps samples whose every grade passed / the others."""
        op, direction = (">", "asc") if order == "asc" else ("<", "desc")
        sql = (f"select s.id, s.item_key, s.repeat, s.input_json, s.output_text, s.finish_reason, s.prompt_tokens,"
               f" s.completion_tokens, s.error, s.created_at, i.line, i.fields_json, {self._ITEM_OK} as passed"
               " from samples s join iterations it on it.id = s.iteration_id join runs r on r.id = it.run_id"
               " left join items i on i.dataset_id = r.dataset_id and i.key = s.item_key where s.iteration_id = ?")
        params: list[Any] = [iteration_id]
        if sample_id is not None:
            sql += " and s.id = ?"
            params.append(sample_id)
        if after is not None:
            sql += f" and s.id {op} ?"
            params.append(after)
        if status in ("pass", "fail"):
            sql += f" and {self._ITEM_OK} = {1 if status == 'pass' else 0}"
        rows = list(self.db.query(sql + f" order by s.id {direction} limit ?", [*params, limit + 1]))
        more = len(rows) > limit
        rows = rows[:limit]
        by_id = {row["id"]: {**row, "grades": []} for row in rows}
        if by_id:
            marks = ",".join("?" * len(by_id))
            for grade in self.db.query(f"select sample_id, grader, score, passed, error from grades"
                                       f" where sample_id in ({marks}) order by grader", list(by_id)):
                by_id[grade["sample_id"]]["grades"].append(grade)
        return list(by_id.values()), more

    def result_counts(self, iteration_id: str) -> dict[str, Any]:
        """Per-sample pass/fail/errored counts, per-grader passed/failed and token sums of an iteration."""
        total, passed, errored, prompt, completion = self.db.conn.execute(
            f"select count(*), coalesce(sum({self._ITEM_OK}), 0), coalesce(sum({self._ITEM_ERRORED}), 0),"
            " coalesce(sum(s.prompt_tokens), 0), coalesce(sum(s.completion_tokens), 0)"
            " from samples s where s.iteration_id = ?", [iteration_id]).fetchone()
        graders = {name: (ok, bad) for name, ok, bad in self.db.conn.execute(
            "select g.grader, sum(g.passed = 1 and g.error is null), sum(g.passed = 0 or g.error is not null)"
            " from grades g join samples s on s.id = g.sample_id where s.iteration_id = ? group by g.grader",
            [iteration_id]).fetchall()}
        return {"total": total, "passed": passed, "errored": errored, "failed": total - passed - errored,
                "graders": graders, "prompt_tokens": prompt, "completion_tokens": completion}

    def harness_run_of(self, command: str) -> tuple[str, str] | None:
        """(run id, iteration id) of the latest harness run started with `command` (an API run's link)."""
        row = self.db.conn.execute(
            "select r.id, it.id from runs r join iterations it on it.run_id = r.id where r.command = ?"
            " order by r.rowid desc, it.seq limit 1", [command]).fetchone()
        return (row[0], row[1]) if row else None

    def run_with_command(self, command: str) -> str | None:
        """The latest run started with `command` (an API wheel run's link), or None."""
        row = self.db.conn.execute("select id from runs where command = ? order by rowid desc limit 1",
                                   [command]).fetchone()
        return row[0] if row else None
