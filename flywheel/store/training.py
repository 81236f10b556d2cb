"""Training: teacher captures, training sets, jobs, their events and checkpoints, hyper-parameter
searches (flywheel.train)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flywheel import killpoints
from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, new_id, now
from flywheel.store.rows import Checkpoint, TrainingJob


class TrainingStore(StoreBase):
    """Teacher captures, training sets, jobs, events, checkpoints and searches."""

    def add_teacher_capture(self, row: dict[str, Any]) -> None:
        with self.transaction():
            self.db["teacher_captures"].insert({"created_at": now(), **row})

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

    def add_training_set(self, row: dict[str, Any]) -> None:
        """Record a training set once per id (its id derives from its content hash)."""
        with self.transaction():
            self.db["training_sets"].insert({"created_at": now(), **row}, ignore=True)

    def get_training_set(self, set_id: str) -> dict[str, Any] | None:
        rows = list(self.db["training_sets"].rows_where("id = ?", [set_id]))
        return rows[0] if rows else None

    def list_training_sets(self) -> list[dict[str, Any]]:
        return list(self.db["training_sets"].rows_where(order_by="created_at"))

    def update_training_set(self, set_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["training_sets"].update(set_id, fields)

    def create_training_job(self, **fields: Any) -> str:
        job_id = fields.pop("id", None) or new_id(f"job-{fields.get('method', 'train')}")
        with self.transaction():
            self.db["training_jobs"].insert({"id": job_id, "created_at": now(), "status": "running", **fields})
        return job_id

    def update_training_job(self, job_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["training_jobs"].update(job_id, fields)

    def get_training_job(self, job_id: str) -> TrainingJob:
        """The training job `job_id`; StoreError when there is none."""
        rows = list(self.db["training_jobs"].rows_where("id = ?", [job_id]))
        if not rows:
            raise StoreError(f"{self.path}: no training job {job_id!r}")
        return TrainingJob.from_row(rows[0])

    def find_resumable_job(self, *, method: str, training_set_id: str, base_model: str,
                           config_json: str) -> TrainingJob | None:
        """The newest unfinished local job (running or failed) of this method, set, base and config that
        has an output folder: a training run killed part-way, which the same command resumes."""
        rows = list(self.db["training_jobs"].rows_where(
            "backend = 'local' and method = ? and training_set_id = ? and base_model = ? and config_json = ?"
            " and status in ('running', 'failed') and output_dir is not null",
            [method, training_set_id, base_model, config_json], order_by="created_at desc", limit=1))
        return TrainingJob.from_row(rows[0]) if rows else None

    def finish_training_job(self, job_id: str, *, checkpoint_id: str, stop_reason: str | None) -> None:
        """Mark a job succeeded with its chosen (best) checkpoint and why it stopped."""
        with self.transaction():
            self.db["training_jobs"].update(job_id, {"checkpoint_id": checkpoint_id, "status": "succeeded",
                                                     "finished_at": now(), "stop_reason": stop_reason,
                                                     "error": None})

    def training_job_of(self, model_ref: str) -> str | None:
        """The job that trained the checkpoint registered under `model_ref`, if any."""
        row = self.db.execute("select job_id from checkpoints where model_ref = ? and job_id is not null"
                              " order by created_at desc limit 1", [model_ref]).fetchone()
        return row[0] if row else None

    def newest_training_job(self, since: str) -> str | None:
        """The id of the newest training job created at or after `since` (an ISO timestamp)."""
        row = self.db.execute("select id from training_jobs where created_at >= ? order by created_at desc, "
                              "rowid desc limit 1", [since]).fetchone()
        return row[0] if row else None

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

    def insert_checkpoint(self, row: dict[str, Any], *, finish_job: bool = True) -> None:
        """Insert a checkpoint and (unless `finish_job` is False: an intermediate checkpoint) mark its
        job succeeded, in one transaction (both or neither)."""
        with self.transaction():
            self.db["checkpoints"].insert({"created_at": now(), **row})
            if row.get("job_id") and finish_job:
                self.db["training_jobs"].update(row["job_id"], {"checkpoint_id": row["id"], "status": "succeeded",
                                                                "finished_at": now()})
        killpoints.reached("checkpoint-registered")

    def latest_checkpoint_for(self, model_ref: str) -> str | None:
        """The id of the newest checkpoint registered under `model_ref`, if any."""
        row = self.db.execute("select id from checkpoints where model_ref = ? order by created_at desc limit 1",
                              [model_ref]).fetchone()
        return row[0] if row else None

    def get_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """The checkpoint `checkpoint_id`; StoreError when there is none."""
        checkpoint = self.checkpoint_row(checkpoint_id)
        if checkpoint is None:
            raise StoreError(f"{self.path}: no checkpoint {checkpoint_id!r}")
        return checkpoint

    def checkpoint_row(self, checkpoint_id: str) -> Checkpoint | None:
        """The checkpoint `checkpoint_id`, or None when there is no such checkpoint."""
        rows = list(self.db["checkpoints"].rows_where("id = ?", [checkpoint_id], limit=1))
        return Checkpoint.from_row(rows[0]) if rows else None

    def find_checkpoint(self, *, method: str, training_set_hash: str, config_json: str,
                        base_model: str) -> Checkpoint | None:
        """The newest checkpoint trained by `method` on this set with this config from this base: the
        one its job chose (a job saving every N steps registers several; a job killed part-way chose
        none), or the one checkpoint of a job that saves no steps (no `output_dir`): registered only
        once training ended, it is final even when a kill came before its job was marked succeeded."""
        rows = list(self.db["checkpoints"].rows_where(
            "method = ? and training_set_hash = ? and config_json = ? and base_model = ? and (job_id is null or id in"
            " (select checkpoint_id from training_jobs where status = 'succeeded' and checkpoint_id is not null)"
            " or job_id in (select id from training_jobs where backend = 'local' and output_dir is null))",
            [method, training_set_hash, config_json, base_model], order_by="created_at desc", limit=1))
        return Checkpoint.from_row(rows[0]) if rows else None

    def update_checkpoint(self, checkpoint_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["checkpoints"].update(checkpoint_id, fields)

    def job_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """A training job's checkpoints, pruned ones included, by step (then creation)."""
        return [Checkpoint.from_row(row) for row in self.db.query(
            "select * from checkpoints where job_id = ? order by coalesce(step, 0), created_at", [job_id])]

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
