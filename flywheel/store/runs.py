"""Definitions (evals, datasets, prompts), runs, iterations, samples, grades, the completion cache
and the summary reads of an iteration."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

# A module import: flywheel.summaries imports the passed rule from flywheel.store.rows, so either may load first.
import flywheel.summaries as summaries
from flywheel.cost import CostPerItem
from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, later, new_id, now
from flywheel.store.rows import (ITERATION_GRADERS, PASSED_SQL, Grade, Iteration, IterationUsage, Run, SampleRecord,
                                 SampleWithGrades)

StateT = TypeVar("StateT", bound=BaseModel)

if TYPE_CHECKING:
    from flywheel.summaries import EvalSummary, GradeRow, GraderSummary, SampleRow


class RunsStore(StoreBase):
    """Runs and everything under them: definitions, iterations, samples, grades, cache, summaries."""

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
            # lineage: an item made from a proxy capture (`Item.capture_id`), for deletion to follow
            self.db.conn.executemany(
                "insert or ignore into capture_items (capture_id, dataset_id, item_key) values (?,?,?)",
                [(int(item.capture_id), dataset_id, item.key) for item in items
                 if getattr(item, "capture_id", None) is not None])

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

    # prompt objects imported from the hosted platform (flywheel.importers.prompts)
    def imported_prompt_keys(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (platform id, version) pairs are already imported."""
        return {(p, v) for p, v in keys if self.db.execute(
            "select 1 from platform_prompt_versions where platform_id = ? and version = ?", [p, v]).fetchone()}

    def save_platform_prompts(self, versions: Sequence[tuple[Any, dict[str, Any]]], origin: str) -> None:
        """Store imported prompt versions in one transaction: each a (`flywheel.prompt.Prompt`, row of
        platform_id, version, name, variables_json, model, created_at, source) pair."""
        with self.transaction():
            for prompt, row in versions:
                self.save_prompt(prompt, origin)
                self.db["platform_prompt_versions"].insert({**row, "prompt_id": prompt.id, "imported_at": now()})

    def platform_prompt_version(self, platform_id: str, version: str | None = None) -> dict[str, Any] | None:
        """An imported prompt version's row with its `messages` (None when not imported); without
        `version`, the newest (by the platform's date, then version number)."""
        rows = list(self.db.query(
            "select v.*, p.messages_json from platform_prompt_versions v join prompts p on p.id = v.prompt_id"
            " where v.platform_id = ?" + (" and v.version = ?" if version is not None else ""),
            [platform_id] + ([version] if version is not None else [])))
        if not rows:
            return None
        row = max(rows, key=lambda r: (r["created_at"] or "", int(r["version"]) if r["version"].isdigit() else -1))
        return {**row, "messages": json.loads(row.pop("messages_json"))}

    def platform_prompt_versions(self, platform_id: str | None = None) -> list[dict[str, Any]]:
        """Imported prompt versions (platform_id, version, prompt_id, name, ...), oldest first."""
        where, params = ("where platform_id = ?", [platform_id]) if platform_id else ("", [])
        return list(self.db.query(f"select * from platform_prompt_versions {where} order by platform_id, created_at",
                                  params))

    def find_unfinished_run(self, config_key: str) -> Run | None:
        """The newest run of this config still `running` (killed part-way: resumable), or None."""
        rows = list(self.db["runs"].rows_where(
            "config_key = ? and status = 'running'", [config_key], order_by="started_at desc", limit=1))
        return Run.from_row(rows[0]) if rows else None

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

    def save_run_state(self, run_id: str, state: BaseModel) -> None:
        """Overwrite a running run's summary with its progress (the wheel's `WheelState`)."""
        with self.transaction():
            self.db["runs"].update(run_id, {"summary_json": state.model_dump_json()})

    def run_live(self, run_id: str) -> tuple[dict[str, Any], str] | None:
        """A running run's latest event and when it was written (`WheelState.live`, `live_at`), else None."""
        row = self.db.execute(
            "select status, case when json_valid(summary_json) then json_extract(summary_json, '$.live') end, "
            "case when json_valid(summary_json) then json_extract(summary_json, '$.live_at') end "
            "from runs where id = ?", [run_id]).fetchone()
        if row is None or row[0] != "running" or not row[1]:
            return None
        try:
            return json.loads(row[1]), row[2] or ""
        except ValueError:
            return None

    def run_state(self, run_id: str, model: type[StateT]) -> StateT:
        """A run's summary read back as `model` (e.g. `WheelState`); an empty summary is `model()`."""
        row = self.db.execute("select summary_json from runs where id = ?", [run_id]).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no run {run_id!r}")
        try:
            return model.model_validate_json(row[0] or "{}")
        except ValidationError as exc:
            raise StoreError(f"{self.path}: run {run_id}: summary_json is not a {model.__name__}: "
                             f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def find_run(self, run_id: str) -> Run | None:
        """The run with exactly this id, or None (a caller-given id not used yet)."""
        rows = list(self.db["runs"].rows_where("id = ?", [run_id], limit=1))
        return Run.from_row(rows[0]) if rows else None

    def get_run(self, run_id: str) -> Run:
        """The one run whose id is `run_id` or ends with it; StoreError for none or several."""
        matches = list(self.db["runs"].rows_where("id = ? or id like ?", [run_id, f"%{run_id}"], limit=2))
        if len(matches) != 1:
            raise StoreError(f"{self.path}: {'no' if not matches else 'more than one'} run matches {run_id!r}")
        return Run.from_row(matches[0])

    def list_runs(self, limit: int = 50) -> list[Run]:
        """The newest `limit` runs, newest first."""
        return [Run.from_row(row) for row in self.db["runs"].rows_where(order_by="started_at desc", limit=limit)]

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

    def find_iteration(self, run_id: str, **match: Any) -> Iteration | None:
        """The first iteration of a run whose columns equal `match` (how a resumed search finds its work)."""
        where = " and ".join(f"[{key}] is ?" for key in match)
        rows = list(self.db["iterations"].rows_where(
            f"run_id = ? and {where}", [run_id, *match.values()], order_by="seq", limit=1))
        return Iteration.from_row(rows[0]) if rows else None

    def get_iteration(self, iteration_id: str) -> Iteration:
        """The iteration `iteration_id` (StoreError when there is none)."""
        rows = list(self.db["iterations"].rows_where("id = ?", [iteration_id]))
        if not rows:
            raise StoreError(f"{self.path}: no iteration {iteration_id!r}")
        return Iteration.from_row(rows[0])

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

    def iterations(self, run_id: str) -> list[Iteration]:
        """The iterations of a run, in order."""
        return [Iteration.from_row(row) for row in self.db["iterations"].rows_where("run_id = ?", [run_id], order_by="seq")]

    def measured_tokens(self, run_id: str) -> int:
        """Prompt + completion tokens of a run's iterations (its measurements), as reports show them; a
        wheel or a search pays for more (proposals, captures, training probes): their `tokens`."""
        row = self.db.execute("select coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)"
                              " from iterations where run_id = ?", [run_id]).fetchone()
        return int(row[0])

    def count_run_rows(self, run_ids: Sequence[str]) -> tuple[int, int]:
        """(iterations, samples) of the given runs."""
        marks = ",".join("?" * len(run_ids))
        iterations, samples = self.db.execute(
            f"select count(distinct i.id), count(s.id) from iterations i left join samples s on s.iteration_id = i.id"
            f" where i.run_id in ({marks})", list(run_ids)).fetchone()
        return iterations, samples

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
        """Write samples and their grades in one transaction; return how many were new. (Their
        completions went to the cache as they came back: `cache_completions`.)

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
                    " error, created_at, cache_key) values (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.iteration_id, rec.item_key, rec.repeat, rec.input_json, rec.output_text,
                     rec.finish_reason, rec.prompt_tokens, rec.completion_tokens, rec.latency_s,
                     rec.cost, int(rec.cache_hit), rec.error, created, rec.cache_key))
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
        return written

    def cache_completions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add completions to the completion cache (the one writer of `completion_cache`: the harness
        calls it the moment a model call returns, before grading and commit). A row with an `error`
        is not cached; a key already cached keeps its first answer."""
        created = now()
        with self.transaction():
            self.db.conn.executemany(
                "insert or ignore into completion_cache (key, model_fingerprint, output_text, finish_reason,"
                " prompt_tokens, completion_tokens, latency_s, cost, output_tools_json, created_at)"
                " values (?,?,?,?,?,?,?,?,?,?)",
                [(r["key"], r["model_fingerprint"], r["output_text"], r.get("finish_reason"),
                  r.get("prompt_tokens", 0), r.get("completion_tokens", 0), r.get("latency_s", 0.0),
                  r.get("cost", 0.0), r.get("output_tools_json"), created) for r in rows if not r.get("error")])

    # Requests being generated right now: a second run of the same eval waits for their answers
    # (`completion_claims`; a claim whose lease ran out, or whose owner `release`d it, is free).
    def claim_completions(self, keys: Sequence[str], owner: str, lease_s: float) -> tuple[set[str], dict[str, str]]:
        """Claim the cache keys not cached and not claimed by another live owner, for `lease_s` seconds.
        Returns the keys now `owner`'s and, for the others not cached, the owner holding each."""
        mine: set[str] = set()
        theirs: dict[str, str] = {}
        moment, until = now(), later(lease_s)
        with self.transaction():
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                self.db.conn.execute(f"delete from completion_claims where key in ({marks}) and expires_at < ?",
                                     [*chunk, moment])
                cached = {k for (k,) in self.db.conn.execute(
                    f"select key from completion_cache where key in ({marks})", chunk)}
                self.db.conn.executemany(
                    "insert or ignore into completion_claims (key, owner, expires_at) values (?,?,?)",
                    [(k, owner, until) for k in chunk if k not in cached])
                for key, holder in self.db.conn.execute(
                        f"select key, owner from completion_claims where key in ({marks})", chunk):
                    if key in cached:
                        continue
                    if holder == owner:
                        mine.add(key)
                    else:
                        theirs[key] = holder
        return mine, theirs

    def renew_completion_claims(self, owner: str, lease_s: float) -> None:
        """Extend every claim `owner` holds by `lease_s` seconds from now."""
        with self.transaction():
            self.db.conn.execute("update completion_claims set expires_at = ? where owner = ?", [later(lease_s), owner])

    def release_completion_claims(self, owner: str, keys: Sequence[str] | None = None) -> None:
        """Drop `owner`'s claims (those on `keys`, or all): their answers are cached, or will not come."""
        with self.transaction():
            if keys is None:
                self.db.conn.execute("delete from completion_claims where owner = ?", [owner])
            else:
                self.db.conn.executemany("delete from completion_claims where owner = ? and key = ?",
                                         [(owner, k) for k in keys])

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

    def samples_with_grades(self, iteration_id: str, objective: tuple[str, str] | None = None, *,
                            details: bool = True) -> list[SampleWithGrades]:
        """Every sample of an iteration with its grades, in item order.

        With `objective=(grader, metric)` each sample also gets its objective `score` and `passed`
        (`flywheel.summaries.objective_value`: an errored or ungraded sample is 0 and fails).
        `details=False` reads only the columns reports show (no grade `details_json`/`error_details`,
        no sample `finish_reason`/`created_at`): large runs render faster.
        """
        columns = "*" if details else ("id, item_key, repeat, input_json, output_text, error, prompt_tokens,"
                                       " completion_tokens, latency_s, cost, cache_hit")
        samples = list(self.db.query(
            f"select {columns} from samples where iteration_id = ? order by id", [iteration_id]))
        grades: dict[int, list[Grade]] = {sample["id"]: [] for sample in samples}
        for grade in self.db.query(
                f"select {'g.*' if details else 'g.sample_id, g.grader, g.score, g.passed, g.feedback, g.error'}"
                " from grades g join samples s on s.id = g.sample_id"
                " where s.iteration_id = ? order by g.sample_id, g.grader", [iteration_id]):
            grades[grade["sample_id"]].append(Grade.from_row(grade))
        out = []
        for sample in samples:
            value = None
            if objective is not None:
                grader, metric = objective
                grade = next((g for g in grades[sample["id"]] if g.grader == grader), None)
                value = summaries.objective_value(sample["error"], grade.score if grade else None,
                                                  grade.passed if grade else None, metric)
            out.append(SampleWithGrades.from_row(sample, grades[sample["id"]], value))
        return out

    def objective_scores(self, iteration_id: str, grader: str,
                         metric: str | None = None) -> dict[tuple[str, int], tuple[float, bool]]:
        """(score, passed) on the objective grader per (item_key, repeat) of an iteration.

        An errored or ungraded sample is (0.0, False); `metric` as `summaries.objective_value` reads it
        (None: the grader's raw score, which the paired promotion test compares).
        """
        rows = self.db.execute(
            "select s.item_key, s.repeat, s.error, g.score, g.passed from samples s left join grades g"
            " on g.sample_id = s.id and g.grader = ? where s.iteration_id = ?", [grader, iteration_id]).fetchall()
        return {(key, repeat): summaries.objective_value(error, score, passed, metric)
                for key, repeat, error, score, passed in rows}

    def _summary_rows(self, iteration_id: str) -> tuple[list[SampleRow], list[GradeRow]]:
        samples = [summaries.SampleRow(*r) for r in self.db.execute(
            "select id, item_key, repeat, error, prompt_tokens, completion_tokens, cost from samples"
            " where iteration_id = ? order by item_key, repeat", [iteration_id]).fetchall()]
        grades = [summaries.GradeRow(r[0], r[1], r[2], bool(r[3]), r[4]) for r in self.db.execute(
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
            return summaries.grader_summaries(*self._summary_rows(iteration_id), ci=True)
        n, errored = self.db.execute("select count(*), count(error) from samples where iteration_id = ?",
                                     [iteration_id]).fetchone()
        rows = self.db.execute(
            "select g.grader, sum(g.score), sum(g.passed), count(g.error) from grades g"
            " join samples s on s.id = g.sample_id where s.iteration_id = ? group by g.grader order by g.grader",
            [iteration_id]).fetchall()
        # Errored samples have no grades, so `errored + count(g.error)` counts each failing sample once.
        return [summaries.GraderSummary(name=grader, n=n, mean=(total or 0.0) / n if n else math.nan, ci_low=math.nan,
                              ci_high=math.nan, pass_rate=(passes or 0) / n if n else math.nan,
                              errors=errored + grade_errors) for grader, total, passes, grade_errors in rows]

    def eval_summary(self, iteration_id: str, objective_grader: str, metric: str) -> EvalSummary:
        """The `EvalSummary` of an iteration: pass rate, per grader, objective, tokens and cost."""
        samples, grades = self._summary_rows(iteration_id)
        return summaries.summarise_rows(samples, grades, objective_grader=objective_grader, metric=metric)

    def sample_outcomes(self, iteration_id: str) -> list[tuple[str, str | None, bool]]:
        """(item_key, error, passed: `rows.sample_passed`) per sample of an iteration, in id order."""
        rows = self.db.execute(
            f"with {ITERATION_GRADERS} select s.item_key, s.error, {PASSED_SQL} from samples s join iteration_graders"
            " where s.iteration_id = ? order by s.id", [iteration_id, iteration_id]).fetchall()
        return [(key, error, bool(passed)) for key, error, passed in rows]

    def count_errors(self, iteration_id: str) -> int:
        """Samples of an iteration whose generation failed."""
        return self.db.execute("select count(*) from samples where iteration_id = ? and error is not null",
                               [iteration_id]).fetchone()[0]

    def iteration_cost(self, iteration_id: str) -> "CostPerItem":
        """Mean tokens, latency and money of an iteration's samples (errored samples included)."""
        n, prompt, completion, latency, money = self.db.execute(
            "select count(*), avg(coalesce(prompt_tokens, 0)), avg(coalesce(completion_tokens, 0)),"
            " avg(coalesce(latency_s, 0)), avg(coalesce(cost, 0)) from samples where iteration_id = ?",
            [iteration_id]).fetchone()
        if not n:
            return CostPerItem()
        return CostPerItem(n=n, prompt_tokens=prompt, completion_tokens=completion, latency_s=latency,
                           money_per_1k=1000 * money)

    def iteration_usage(self, iteration_id: str) -> IterationUsage:
        """Tokens and money of an iteration's samples, summed, and how many lack a token count."""
        n, errors, prompt, completion, money, missing = self.db.execute(
            "select count(*), count(error), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
            " coalesce(sum(cost), 0), coalesce(sum(error is null and (prompt_tokens is null or completion_tokens is null"
            " or prompt_tokens + completion_tokens = 0)), 0) from samples where iteration_id = ?",
            [iteration_id]).fetchone()
        return IterationUsage(n=n, errors=errors, prompt_tokens=prompt, completion_tokens=completion,
                              cost=float(money), missing_tokens=missing)

    def latest_eval_iteration(self, eval_name: str, split: str) -> Iteration | None:
        """The last iteration on `split` of the newest completed run of the eval named `eval_name`."""
        rows = self.db.execute(
            "select i.id from iterations i join runs r on r.id = i.run_id join evals e on e.id = r.eval_id"
            " where e.name = ? and i.split = ? and r.status = 'completed' and i.n > 0"
            " order by r.started_at desc, i.seq desc limit 1", [eval_name, split]).fetchall()
        return self.get_iteration(rows[0][0]) if rows else None

    def model_measurements(self, model_ref: str) -> list[dict[str, Any]]:
        """Measured iterations of `model_ref` (n > 0, a score), newest run first, each with its
        eval's name and spec (`eval_name`, `eval_spec_json`)."""
        rows = self.db.execute(
            "select i.id, i.run_id, i.split, i.prompt_id, i.n, i.score, i.ci_low, i.ci_high, e.name, e.spec_json"
            " from iterations i join runs r on r.id = i.run_id left join evals e on e.id = r.eval_id"
            " where i.model_ref = ? and i.n > 0 and i.score is not null order by r.started_at desc, i.seq desc",
            [model_ref]).fetchall()
        keys = ("id", "run_id", "split", "prompt_id", "n", "score", "ci_low", "ci_high", "eval_name", "eval_spec_json")
        return [dict(zip(keys, row)) for row in rows]

    def record_iteration_latency(self, iteration_id: str) -> None:
        """Store the summed sample latency on the iteration row (tokens and cost are summed already)."""
        with self.transaction():
            self.db.conn.execute(
                "update iterations set latency_s = (select sum(coalesce(latency_s, 0)) from samples"
                " where iteration_id = ?) where id = ?", [iteration_id, iteration_id])
