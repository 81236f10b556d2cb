"""The one `passed` rule (flywheel.store.rows): the Python predicate and its SQL agree, and every
reader (summaries, sample outcomes, the API's result counts and output items, search) applies it."""

from __future__ import annotations

import itertools

import pytest

from flywheel.store import SampleRecord, Store
from flywheel.store.rows import ITERATION_GRADERS, PASSED_SQL, passed_of_rows, sample_passed

GRADERS = ("exact", "judge")


def _grade(grader: str, outcome: str) -> dict:
    """A grade row: outcome 'pass', 'fail' or 'error' (a grader error, passed recorded as 0)."""
    return {"grader": grader, "score": 1.0 if outcome == "pass" else 0.0, "passed": outcome == "pass",
            "error": "judge timeout" if outcome == "error" else None}


# Every combination of: sample error or not, and for each of two graders: no grade, pass, fail, error.
CASES = [(error, outcomes) for error in (None, "model_error: timeout")
         for outcomes in itertools.product(("none", "pass", "fail", "error"), repeat=len(GRADERS))]


@pytest.fixture
def store_with_cases() -> tuple[Store, str, list[tuple[str | None, tuple[str, ...]]]]:
    """One iteration holding every case; a last sample graded by both graders fixes the iteration's graders."""
    store = Store.open(":memory:")
    run_id = store.create_run(kind="eval", config_key="k")
    iteration_id = store.iteration_for(run_id, 0)
    cases = [*CASES, (None, ("pass", "pass"))]
    store.write_samples([SampleRecord(
        iteration_id=iteration_id, item_key=f"item-{n}", repeat=0, input_json="[]", output_text="x", error=error,
        grades=[_grade(g, o) for g, o in zip(GRADERS, outcomes) if o != "none"]) for n, (error, outcomes) in enumerate(cases)])
    return store, iteration_id, cases


def _expected(error: str | None, outcomes: tuple[str, ...]) -> bool:
    return error is None and all(o == "pass" for o in outcomes)


def test_python_and_sql_rules_agree_on_every_case(store_with_cases):
    store, iteration_id, cases = store_with_cases
    in_sql = [bool(p) for (p,) in store.db.execute(
        f"with {ITERATION_GRADERS} select {PASSED_SQL} from samples s join iteration_graders"
        " where s.iteration_id = ? order by s.id", [iteration_id, iteration_id]).fetchall()]
    in_python = [sample_passed(error, [(g, o == "pass", "x" if o == "error" else None)
                                       for g, o in zip(GRADERS, outcomes) if o != "none"], GRADERS)
                 for error, outcomes in cases]
    assert in_sql == in_python == [_expected(*case) for case in cases]
    assert sum(in_sql) == 2  # the all-pass case and the last sample


def test_every_reader_applies_the_rule(store_with_cases):
    store, iteration_id, cases = store_with_cases
    expected = [_expected(*case) for case in cases]
    assert [passed for _, _, passed in store.sample_outcomes(iteration_id)] == expected
    counts = store.result_counts(iteration_id)
    assert counts["passed"] == sum(expected) and counts["total"] == len(cases)
    items, _ = store.output_items(iteration_id, limit=100)
    assert [bool(i["passed"]) for i in items] == expected
    passing, _ = store.output_items(iteration_id, limit=100, status="pass")
    assert len(passing) == sum(expected)
    assert store.eval_summary(iteration_id, "exact", "pass_rate").pass_rate == sum(expected) / len(cases)
    found = {r["item_key"]: r["passed"] for r in store.search_samples("item-")}
    assert [found[f"item-{n}"] for n in range(len(cases))] == expected


def test_an_ungraded_sample_is_not_passed_in_summary_or_result_counts():
    store = Store.open(":memory:")
    iteration_id = store.iteration_for(store.create_run(kind="eval", config_key="k"), 0)
    store.write_samples([
        SampleRecord(iteration_id=iteration_id, item_key="graded", repeat=0, input_json="[]", output_text="a",
                     grades=[_grade("exact", "pass")]),
        SampleRecord(iteration_id=iteration_id, item_key="ungraded", repeat=0, input_json="[]", output_text="b")])
    counts = store.result_counts(iteration_id)
    assert (counts["passed"], counts["failed"], counts["errored"]) == (1, 1, 0)
    assert store.eval_summary(iteration_id, "exact", "pass_rate").pass_rate == 0.5
    assert passed_of_rows(None, [], {"exact"}) is False


def test_an_iteration_nobody_graded_has_no_passed_sample():
    store = Store.open(":memory:")
    iteration_id = store.iteration_for(store.create_run(kind="eval", config_key="k"), 0)
    store.write_samples([SampleRecord(iteration_id=iteration_id, item_key="a", repeat=0, input_json="[]",
                                      output_text="a")])
    assert store.result_counts(iteration_id)["passed"] == 0
    assert sample_passed(None, [], ()) is False
