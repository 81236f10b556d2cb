"""Judge calibrations, human reviews and the sample reads reports make (flywheel.reviews,
flywheel.calibration, flywheel.report)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from flywheel.store.db import StoreBase, now
from flywheel.store.rows import passed_of_rows


class ReviewsStore(StoreBase):
    """Reviews, judge calibrations and the sample reads of reports."""

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

    def list_reviews(self) -> list[dict[str, Any]]:
        """Every review, oldest first."""
        return list(self.db.query("select * from reviews order by id"))

    def count_reviews(self) -> int:
        return self.db.execute("select count(*) from reviews").fetchone()[0]

    def reviews_of_sample(self, sample_id: int) -> list[dict[str, Any]]:
        """Reviews of a sample, or comparing another sample with it, oldest first."""
        return list(self.db.query("select * from reviews where sample_id = ? or other_sample_id = ? order by id",
                                  [sample_id, sample_id]))

    def samples_by_id(self, sample_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(dict.fromkeys(int(i) for i in sample_ids))
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for row in self.db.query(f"select * from samples where id in ({','.join('?' * len(chunk))})", chunk):
                found[row["id"]] = row
        return found

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
        `passed` (`rows.sample_passed`) and its run, seq and stage."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        results = list(self.db.query(
            "select s.id, s.iteration_id, s.item_key, s.repeat, s.output_text, s.error, i.run_id,"
            " i.seq, i.stage, it.fields_json from samples s join iterations i on i.id = s.iteration_id"
            " join runs r on r.id = i.run_id left join items it on it.dataset_id = r.dataset_id and"
            " it.key = s.item_key where s.item_key like :q escape '\\' or s.output_text like :q escape '\\'"
            f" or it.fields_json like :q escape '\\' order by s.id desc limit {int(limit)}", {"q": like}))
        grades: dict[int, list[dict[str, Any]]] = {}
        for grade in self.grades_of_samples(r["id"] for r in results):
            grades.setdefault(grade["sample_id"], []).append(grade)
        graders = self.iteration_graders({r["iteration_id"] for r in results})
        for r in results:
            r["passed"] = passed_of_rows(r["error"], grades.get(r["id"], []), graders.get(r["iteration_id"], set()))
        return results

    def samples_version(self, iteration_ids: Sequence[str]) -> tuple[int, int]:
        """(samples in the iterations, highest grade rowid): changes whenever a sample or grade is added."""
        marks = ",".join("?" * len(iteration_ids))
        return tuple(self.db.execute(
            f"select (select count(*) from samples where iteration_id in ({marks})), (select max(rowid) from grades)",
            list(iteration_ids)).fetchone())
