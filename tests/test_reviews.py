import json
import math

import pytest

from flywheel.store.migrations import MIGRATIONS
from flywheel.reviews import ReviewError, add_review, cohen_kappa, judge_agreement, preferences, sample_reviews

from report_helpers import build_run, sample_id


@pytest.fixture
def run(store):
    return build_run(store, n_items=10)


def test_reviews_table_is_a_later_migration(store):
    names = [name for name, _ in MIGRATIONS]
    assert "m003_reviews" in names and names.index("m003_reviews") > names.index("m001_initial")
    assert {"sample_id", "other_sample_id", "verdict", "preference", "correction", "note", "reviewer"} <= set(
        store.db["reviews"].columns_dict)


def test_add_review_checks_its_values(store, run):
    a0, b0 = run["iterations"][0], run["iterations"][1]
    sid = sample_id(store, b0, "item-00001")
    with pytest.raises(ReviewError, match="verdict 'maybe'"):
        add_review(store, sid, verdict="maybe")
    with pytest.raises(ReviewError, match="needs other_sample_id"):
        add_review(store, sid, preference="sample")
    with pytest.raises(ReviewError, match="not two outputs of the same item"):
        add_review(store, sid, other_sample_id=sample_id(store, a0, "item-00002"), preference="sample")
    with pytest.raises(ReviewError, match="no sample with id 99999"):
        add_review(store, 99999, verdict="pass")
    with pytest.raises(ReviewError, match="empty review"):
        add_review(store, sid, note="   ")
    output = store.samples_by_id([sid])[sid]["output_text"]
    with pytest.raises(ReviewError, match="empty review"):  # an unchanged output is not a correction
        add_review(store, sid, correction=output)
    assert store.count_reviews() == 0


def test_latest_value_of_each_field_wins(store, run):
    sid = sample_id(store, run["iterations"][1], "item-00002")
    add_review(store, sid, verdict="fail", note="wrong intent", reviewer="ana")
    add_review(store, sid, correction="exchange_rate", reviewer="bo")
    add_review(store, sid, verdict="pass", reviewer="ana")
    review = sample_reviews(store, run_ids=[run["run_id"]])[sid]
    assert (review.verdict, review.correction, review.notes) == ("pass", "exchange_rate", ["wrong intent"])
    assert review.reviewers == ["ana", "bo"]


def test_reviews_are_scoped_to_runs_and_iterations(store, run):
    other = build_run(store, n_items=4, run_id="run-test-000002", stages=[("eval", "measured")])
    add_review(store, sample_id(store, other["iterations"][0], "item-00000"), correction="x")
    add_review(store, sample_id(store, run["iterations"][2], "item-00000"), correction="y")
    def corrections(**scope):
        return [r.correction for r in sample_reviews(store, **scope).values()]

    assert corrections(run_ids=[run["run_id"]]) == ["y"]
    assert corrections(iteration_ids=other["iterations"]) == ["x"]
    assert len(corrections()) == 2


def test_judge_agreement_counts_and_kappa(store, run):
    b = run["iterations"][1]
    # default_outcome: the judge agrees with the label grader except when index % 3 == 0.
    for i in range(10):
        sid = sample_id(store, b, f"item-{i:05d}")
        (label_passed,) = [g["passed"] for g in store.grades_of_samples([sid]) if g["grader"] == "label"]
        add_review(store, sid, verdict="pass" if label_passed else "fail")
    table = judge_agreement(store, run_ids=[run["run_id"]])
    assert [a.grader for a in table] == ["judge", "label"]  # model graders first
    judge, label = table
    assert judge.is_model and judge.type == "score_model" and not label.is_model
    assert label.n == 10 and label.agree == 10 and label.rate == 1.0 and label.kappa == pytest.approx(1.0)
    assert judge.n == 10 and judge.agree == 6  # items 0, 3, 6, 9 disagree
    assert judge.judge_pass_human_fail + judge.judge_fail_human_pass == 4
    expected = cohen_kappa(judge.judge_pass_human_pass, judge.judge_pass_human_fail,
                           judge.judge_fail_human_pass, judge.judge_fail_human_fail)
    assert judge.kappa == pytest.approx(expected)


def test_cohen_kappa_reference_values():
    # 20 pass/pass, 5 pass/fail, 10 fail/pass, 15 fail/fail: p_o = .7, p_e = .5 -> kappa .4
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert math.isnan(cohen_kappa(0, 0, 0, 0))
    assert cohen_kappa(5, 0, 0, 5) == pytest.approx(1.0)
