"""The platform API (flywheel.api): its objects, the job queue, events, keys and output items."""

from __future__ import annotations

import json
from typing import Any

from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, later, now
from flywheel.store.rows import ITERATION_GRADERS, PASSED_SQL, ApiRunName


class ApiStore(StoreBase):
    """The platform API's objects, job queue, events, keys and output items."""

    API_TABLES = ("api_files", "api_evals", "api_eval_runs", "api_fine_tuning_jobs", "api_wheel_runs", "api_jobs",
                  "api_keys")

    def api_run_names(self, run_ids: list[str]) -> dict[str, ApiRunName]:
        """The API's names of harness runs made over HTTP: an eval run's `name` and model (an `ft:` id
        as the caller wrote it), a wheel run's `metadata.name`; runs not made by the API are absent."""
        if not run_ids:
            return {}
        marks = ",".join("?" * len(run_ids))
        out = {run_id: ApiRunName(object_id, name, model) for run_id, object_id, name, model in self.db.execute(
            f"select run_id, id, name, model from api_eval_runs where run_id in ({marks})", run_ids).fetchall()}
        for run_id, object_id, metadata in self.db.execute(
                f"select run_id, id, metadata_json from api_wheel_runs where run_id in ({marks})", run_ids).fetchall():
            try:
                name = (json.loads(metadata or "{}") or {}).get("name")
            except ValueError:
                name = None
            out[run_id] = ApiRunName(object_id, name if isinstance(name, str) else None, None)
        return out

    def fine_tuned_names(self) -> dict[str, str]:
        """`ft:` ids of the API's fine-tuning jobs by the model reference of their final checkpoint."""
        return {model_ref: name for model_ref, name in self.db.execute(
            "select c.model_ref, j.fine_tuned_model from api_fine_tuning_jobs j join checkpoints c"
            " on c.id = j.checkpoint_id where j.fine_tuned_model is not null").fetchall()}

    def _api_table(self, table: str) -> str:
        if table not in self.API_TABLES:
            raise StoreError(f"not an API table: {table}")
        return table

    def api_insert(self, table: str, row: dict[str, Any]) -> None:
        """Store a new API object (its `created_at` a stored timestamp, `now()`)."""
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

    # The queue: a worker claims a job with one UPDATE guarded by status and lease, so two workers
    # (threads, processes or servers on one store) never hold one job. A running job's lease is
    # renewed by its worker (`renew_job_lease`); a job whose lease ran out (its worker died) is
    # claimable again, a job with a live lease is not, whoever starts.
    _CLAIMABLE = "(status = 'queued' or (status = 'running' and (lease_expires_at is null or lease_expires_at < ?)))"

    def enqueue_job(self, job_id: str, kind: str, object_id: str) -> None:
        with self.transaction():
            self.db["api_jobs"].insert({"id": job_id, "kind": kind, "object_id": object_id, "status": "queued",
                                        "cancel_requested": 0, "attempts": 0, "created_at": now()})

    def claim_job(self, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest job that is queued, or running under a lease that ran out (its worker
        died), for `owner` with a lease of `lease_s` seconds (status -> running, attempts + 1).
        The row comes back with `taken_over` True when it was such an orphan; None when no job is free."""
        while True:
            moment = now()
            row = self.db.conn.execute(f"select id, status from api_jobs where {self._CLAIMABLE} order by rowid limit 1",
                                       [moment]).fetchone()
            if row is None:
                return None
            with self.transaction():
                taken = self.db.conn.execute(
                    "update api_jobs set status = 'running', started_at = ?, attempts = attempts + 1,"
                    f" lease_owner = ?, lease_expires_at = ? where id = ? and {self._CLAIMABLE}",
                    [moment, owner, later(lease_s), row[0], moment]).rowcount
            if taken:
                return {**self.api_get("api_jobs", row[0]), "taken_over": row[1] == "running"}

    def renew_job_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease on its running job by `lease_s` seconds from now; False when the job
        is no longer `owner`'s (its lease ran out and another worker took it, or it finished)."""
        with self.transaction():
            return self.db.conn.execute(
                "update api_jobs set lease_expires_at = ? where id = ? and lease_owner = ? and status = 'running'",
                [later(lease_s), job_id, owner]).rowcount > 0

    def finish_job(self, job_id: str, status: str, error: str | None = None, *, owner: str | None = None) -> bool:
        """Record a job's outcome and drop its lease; with `owner`, only while `owner` holds the job
        (False when another worker took it over)."""
        guard, params = ("", []) if owner is None else (" and lease_owner = ? and status = 'running'", [owner])
        with self.transaction():
            return self.db.conn.execute(
                "update api_jobs set status = ?, finished_at = ?, error = ?, lease_owner = null,"
                f" lease_expires_at = null where id = ?{guard}", [status, now(), error, job_id, *params]).rowcount > 0

    def release_job(self, job_id: str, owner: str) -> bool:
        """Put `owner`'s running job back in the queue (its server is stopping), for any worker to take
        now; a fine-tuning job's unfinished training job says `queued` too (one status per fine-tune)."""
        with self.transaction():
            released = self.db.conn.execute(
                "update api_jobs set status = 'queued', lease_owner = null, lease_expires_at = null"
                " where id = ? and lease_owner = ? and status = 'running'", [job_id, owner]).rowcount > 0
            if released:
                self.db.conn.execute(
                    "update training_jobs set status = 'queued' where status != 'succeeded' and id = (select"
                    " f.training_job_id from api_fine_tuning_jobs f join api_jobs j on j.object_id = f.id"
                    " where j.id = ?)", [job_id])
        return released

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

    # -- one status per fine-tune: the training job's (the queue row's while it has none) ----------
    def fine_tuning_status(self, object_id: str) -> str:
        """The status of fine-tuning job `object_id`: its training job's (queued, running, paused,
        succeeded, failed, cancelled), or its queue row's while it has no training job yet or while the
        queue row is running, paused, queued or cancelled: a trainer that finished (the model is being
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
        # The queue row says what only the API knows (running, paused, queued again, cancelled); its
        # trainer's row may lag behind it for a moment (a trainer stopped for a pause is marked failed
        # before the runner settles it paused), so it decides only once the queue has finished the job.
        return queue if queue in ("running", "paused", "queued", "cancelled") else training

    def set_fine_tuning_status(self, object_id: str, status: str, error: str | None = None) -> None:
        """Record what the API did to fine-tuning job `object_id` (queued, paused, cancelled, failed)
        on its training job; without one yet the queue row already says it."""
        fields: dict[str, Any] = {"status": status, **({"error": error} if error else {})}
        with self.transaction():
            row = self.db.conn.execute("select training_job_id from api_fine_tuning_jobs where id = ?",
                                       [object_id]).fetchone()
            if row and row[0]:
                self.db["training_jobs"].update(row[0], fields)

    def request_job_pause(self, object_id: str) -> str | None:
        """Flag the running job of an API object for pausing (unless it is being cancelled) and pause a
        queued one at once; returns the job's status now when it is 'paused' or 'running', else None."""
        with self.transaction():
            self.db.conn.execute("update api_jobs set pause_requested = 1 where object_id = ? and status = 'running'"
                                 " and not cancel_requested", [object_id])
            self.db.conn.execute("update api_jobs set status = 'paused' where object_id = ? and status = 'queued'",
                                 [object_id])
        row = self.db.conn.execute("select status from api_jobs where object_id = ? order by rowid desc limit 1",
                                   [object_id]).fetchone()
        return row[0] if row and row[0] in ("paused", "running") else None

    def resume_paused_job(self, object_id: str) -> bool:
        """Queue an API object's paused job again; False when its job is not paused."""
        with self.transaction():
            return self.db.conn.execute(
                "update api_jobs set status = 'queued', pause_requested = 0, finished_at = null"
                " where object_id = ? and status = 'paused'", [object_id]).rowcount > 0

    def cancel_paused_job(self, object_id: str) -> bool:
        """Cancel an API object's paused job (it runs nothing, so at once); False when it is not paused."""
        with self.transaction():
            return self.db.conn.execute(
                "update api_jobs set status = 'cancelled', cancel_requested = 1, finished_at = ?"
                " where object_id = ? and status = 'paused'", [now(), object_id]).rowcount > 0

    def job_stop_flags(self, job_id: str) -> tuple[bool, bool]:
        """(cancel requested, pause requested) of a queue job; (False, False) when there is no such job."""
        row = self.db.conn.execute("select cancel_requested, pause_requested from api_jobs where id = ?",
                                   [job_id]).fetchone()
        return (bool(row[0]), bool(row[1])) if row else (False, False)

    def count_jobs(self) -> dict[str, int]:
        return dict(self.db.conn.execute("select status, count(*) from api_jobs group by status").fetchall())

    def set_platform_job_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        """Keep an imported job's own metrics (flywheel.importers.jobs.JobMetrics.to_dict()) with it."""
        self.api_update("api_fine_tuning_jobs", job_id, platform_metrics_json=json.dumps(metrics))

    def platform_job_metrics(self, job_id: str) -> dict[str, Any] | None:
        """The platform's metrics of the job a fine-tuning job was imported from (None: none kept)."""
        row = self.db.execute("select platform_metrics_json from api_fine_tuning_jobs where id = ?", [job_id]).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    # events of API objects (eval runs, fine-tuning jobs), paged by id
    def add_api_event(self, object_id: str, message: str, *, level: str = "info", type: str = "message",
                      data: dict[str, Any] | None = None) -> int:
        """Record an event of an API object, stamped now; returns its id."""
        with self.transaction():
            return self.db.conn.execute(
                "insert into api_events (object_id, created_at, level, type, message, data_json)"
                " values (?,?,?,?,?,?)", [object_id, now(), level, type, message,
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

    def run_project(self, run_id: str) -> str:
        """The project a harness run belongs to: that of the API eval or wheel run that made it;
        runs made by the CLI (no API object) belong to 'default'."""
        for table in ("api_eval_runs", "api_wheel_runs"):
            rows = list(self.db.query(f"select project from {table} where run_id = ? limit 1", [run_id]))
            if rows:
                return rows[0]["project"] or "default"
        return "default"

    def list_api_keys(self) -> list[dict[str, Any]]:
        """Every API key without its hash, oldest first."""
        return list(self.db.query("select id, created_at, name, prefix, project, role, rpm, revoked"
                                  " from api_keys order by rowid"))

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke an API key by id; False when there is no such key."""
        with self.transaction():
            return self.db.conn.execute("update api_keys set revoked = 1 where id = ?", [key_id]).rowcount > 0

    def api_key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from api_keys where key_hash = ? and not revoked", [key_hash]))
        return rows[0] if rows else None

    # output items of an eval run: the harness samples of its iteration, with grades and item fields

    _ITEM_ERRORED = ("(s.error is not null or exists (select 1 from grades g where g.sample_id = s.id"
                     " and g.error is not null))")

    def output_items(self, iteration_id: str, *, after: int | None = None, limit: int = 20, order: str = "asc",
                     status: str | None = None, sample_id: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """A page of an iteration's samples (by id) with `passed` (`rows.PASSED_SQL`), `line`,
        `fields_json` and `grades`. `status` 'pass' / 'fail' keeps samples that passed / the others."""
        op, direction = (">", "asc") if order == "asc" else ("<", "desc")
        sql = (f"with {ITERATION_GRADERS} select s.id, s.item_key, s.repeat, s.input_json, s.output_text,"
               " s.finish_reason, s.prompt_tokens, s.completion_tokens, s.error, s.created_at, i.line, i.fields_json,"
               f" {PASSED_SQL} as passed from samples s join iteration_graders join iterations it"
               " on it.id = s.iteration_id join runs r on r.id = it.run_id"
               " left join items i on i.dataset_id = r.dataset_id and i.key = s.item_key where s.iteration_id = ?")
        params: list[Any] = [iteration_id, iteration_id]
        if sample_id is not None:
            sql += " and s.id = ?"
            params.append(sample_id)
        if after is not None:
            sql += f" and s.id {op} ?"
            params.append(after)
        if status in ("pass", "fail"):
            sql += f" and {PASSED_SQL} = {1 if status == 'pass' else 0}"
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
        """Per-sample pass/fail/errored counts, per-grader passed/failed and token sums of an iteration.
        `passed` is `rows.PASSED_SQL` (an ungraded sample did not pass); `errored` counts samples with a
        sample or grade error; `failed` the rest."""
        total, passed, errored, prompt, completion = self.db.conn.execute(
            f"with {ITERATION_GRADERS} select count(*), coalesce(sum({PASSED_SQL}), 0),"
            f" coalesce(sum({self._ITEM_ERRORED}), 0), coalesce(sum(s.prompt_tokens), 0),"
            " coalesce(sum(s.completion_tokens), 0) from samples s join iteration_graders where s.iteration_id = ?",
            [iteration_id, iteration_id]).fetchone()
        graders = {name: (ok, bad) for name, ok, bad in self.db.conn.execute(
            "select g.grader, sum(g.passed = 1 and g.error is null), sum(g.passed = 0 or g.error is not null)"
            " from grades g join samples s on s.id = g.sample_id where s.iteration_id = ? group by g.grader",
            [iteration_id]).fetchall()}
        return {"total": total, "passed": passed, "errored": errored, "failed": total - passed - errored,
                "graders": graders, "prompt_tokens": prompt, "completion_tokens": completion}
