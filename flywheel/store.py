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
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

from flywheel.errors import StoreError
from flywheel.migrations import apply_migrations

if TYPE_CHECKING:
    from flywheel.cost import CostPerItem

DEFAULT_DB = "flywheel.db"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def default_db_path() -> str:
    return os.environ.get("FLYWHEEL_DB", DEFAULT_DB)


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
        """Open (creating if needed) and migrate a store; StoreError names the path on failure."""
        path = str(path or default_db_path())
        if path != ":memory:":
            parent = Path(path).resolve().parent
            if not parent.is_dir():
                raise StoreError(f"{path}: cannot create database: folder {parent} does not exist")
        try:
            conn = sqlite3.connect(path, timeout=30)
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=normal")
            conn.execute("pragma foreign_keys=on")
            db = sqlite_utils.Database(conn)
            apply_migrations(db)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open database: {exc}") from None
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
        with self.db.conn:
            self.db["evals"].insert(
                {"id": eval_id, "name": name, "spec_path": spec_path, "spec_json": spec_json,
                 "created_at": now()}, ignore=True)

    def save_dataset(self, dataset_id: str, path: str, items: Sequence[Any]) -> None:
        """Store a dataset's items once per content hash."""
        if self.db["datasets"].count_where("id = ?", [dataset_id]):
            return
        with self.db.conn:
            self.db["datasets"].insert(
                {"id": dataset_id, "path": path, "n_items": len(items), "created_at": now()})
            self.db["items"].insert_all(
                ({"dataset_id": dataset_id, "key": item.key, "split": item.split, "line": item.line,
                  "fields_json": json.dumps(item.fields, ensure_ascii=False)} for item in items),
                batch_size=1000)

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
            self.db["iterations"].insert({"id": iteration_id, "run_id": run_id, "seq": seq,
                                          "created_at": now(), **fields})
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

    def write_samples(self, records: Sequence[SampleRecord]) -> None:
        """Write samples, their grades and new cache rows in one transaction."""
        if not records:
            return
        created = now()
        with self.db.conn:
            cursor = self.db.conn.cursor()
            for rec in records:
                cursor.execute(
                    "insert into samples (iteration_id, item_key, repeat, input_json, output_text,"
                    " finish_reason, prompt_tokens, completion_tokens, latency_s, cost, cache_hit,"
                    " error, created_at) values (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.iteration_id, rec.item_key, rec.repeat, rec.input_json, rec.output_text,
                     rec.finish_reason, rec.prompt_tokens, rec.completion_tokens, rec.latency_s,
                     rec.cost, int(rec.cache_hit), rec.error, created))
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
        with self.db.conn:
            self.db.conn.execute(
                "update iterations set latency_s = (select sum(coalesce(latency_s, 0)) from samples"
                " where iteration_id = ?) where id = ?", [iteration_id, iteration_id])

    def add_grades(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add grade rows to stored samples (e.g. self-consistency of unlabelled captures); a grade
        already stored for (sample, grader) is kept."""
        with self.db.conn:
            self.db.conn.executemany(
                "insert or ignore into grades (sample_id, grader, score, passed, feedback, details_json, error,"
                " error_details) values (?,?,?,?,?,?,?,?)",
                [(r["sample_id"], r["grader"], r["score"], int(r["passed"]), r.get("feedback"),
                  json.dumps(r.get("details") or {}, ensure_ascii=False, default=str), r.get("error"),
                  r.get("error_details")) for r in rows])

    def find_checkpoint(self, *, method: str, training_set_hash: str, config_json: str,
                        base_model: str) -> dict[str, Any] | None:
        """The newest checkpoint trained by `method` on this set and config from this base (resume)."""
        rows = list(self.db.query(
            "select * from checkpoints where method = ? and training_set_hash = ? and config_json = ?"
            " and base_model = ? order by created_at desc limit 1",
            [method, training_set_hash, config_json, base_model]))
        return rows[0] if rows else None

    def update_run_summary(self, run_id: str, summary: dict[str, Any], status: str | None = None) -> None:
        """Replace a run's summary (the wheel keeps its progress there: what resume reads)."""
        fields: dict[str, Any] = {"summary_json": json.dumps(summary, default=str)}
        if status:
            fields["status"] = status
        with self.db.conn:
            self.db["runs"].update(run_id, fields)

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
        with self.db.conn:
            self.db["exports"].insert({"created_at": now(), **row, "id": export_id}, replace=True)
        return export_id

    def list_exports(self) -> list[dict[str, Any]]:
        return list(self.db["exports"].rows_where(order_by="created_at"))

    def update_export(self, export_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db["exports"].update(export_id, fields)

    def add_capture_copies(self, artefact: str, artefact_id: str, copies: Iterable[tuple[int, str]]) -> None:
        """Lineage: capture `capture_id` became the row hashing to `row_hash` in this artefact."""
        with self.db.conn:
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
        with self.db.conn:
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
        with self.db.conn:
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
