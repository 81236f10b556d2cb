import json
import math

import pytest

from flywheel.migrations import MIGRATIONS
from flywheel.reviews import (ReviewError, add_review, cohen_kappa, judge_agreement, preferences, review_dpo_pairs,
                              review_sft_rows, sample_reviews)

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
    assert store.db["reviews"].count == 0


def test_latest_value_of_each_field_wins(store, run):
    sid = sample_id(store, run["iterations"][1], "item-00002")
    add_review(store, sid, verdict="fail", note="wrong intent", reviewer="ana")
    add_review(store, sid, correction="exchange_rate", reviewer="bo")
    add_review(store, sid, verdict="pass", reviewer="ana")
    review = sample_reviews(store, run_ids=[run["run_id"]])[sid]
    assert (review.verdict, review.correction, review.notes) == ("pass", "exchange_rate", ["wrong intent"])
    assert review.reviewers == ["ana", "bo"]


def test_corrections_become_sft_rows_in_chat_format(store, run):
    b = run["iterations"][1]
    corrected = sample_id(store, b, "item-00002")  # wrong in iteration 1
    approved = sample_id(store, b, "item-00006")
    add_review(store, corrected, verdict="fail", correction="exchange_rate")
    add_review(store, approved, verdict="pass")
    rows = review_sft_rows(store, run_ids=[run["run_id"]])
    assert len(rows) == 1
    messages = rows[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[-1] == {"role": "assistant", "content": "exchange_rate"}
    assert messages[1]["content"] == "Where is my card? question 2"
    assert set(rows[0]) == {"messages"}  # nothing the platform would reject
    with_approved = review_sft_rows(store, run_ids=[run["run_id"]], include_approved=True)
    approved_output = store.samples_by_id([approved])[approved]["output_text"]
    assert len(with_approved) == 2 and with_approved[1]["messages"][-1]["content"] == approved_output


def test_preferences_become_dpo_pairs_in_preference_format(store, run):
    a, b = run["iterations"][0], run["iterations"][1]
    # item 1: A (baseline) wrong, B right; item 2: A right, B wrong (see report_helpers.default_outcome)
    a1, b1 = sample_id(store, a, "item-00001"), sample_id(store, b, "item-00001")
    a2, b2 = sample_id(store, a, "item-00002"), sample_id(store, b, "item-00002")
    a3, b3 = sample_id(store, a, "item-00003"), sample_id(store, b, "item-00003")
    add_review(store, b1, other_sample_id=a1, preference="sample")   # B preferred
    add_review(store, b2, other_sample_id=a2, preference="other")    # A preferred
    add_review(store, b3, other_sample_id=a3, preference="tie")      # no pair
    outputs = store.samples_by_id([a1, b1, a2, b2])
    pairs = review_dpo_pairs(store, run_ids=[run["run_id"]])
    assert len(pairs) == 2
    for pair in pairs:
        assert set(pair) == {"input", "preferred_output", "non_preferred_output"}
        assert set(pair["input"]) == {"messages"}
        assert pair["preferred_output"][0]["role"] == pair["non_preferred_output"][0]["role"] == "assistant"
    assert pairs[0]["preferred_output"][0]["content"] == outputs[b1]["output_text"]
    assert pairs[0]["non_preferred_output"][0]["content"] == outputs[a1]["output_text"]
    assert pairs[0]["input"]["messages"] == json.loads(outputs[b1]["input_json"])
    assert pairs[1]["preferred_output"][0]["content"] == outputs[a2]["output_text"]
    assert pairs[1]["input"]["messages"] == json.loads(outputs[a2]["input_json"])  # the preferred side's prompt
    # Changing one's mind replaces the pair, it does not add one.
    add_review(store, a1, other_sample_id=b1, preference="sample")
    flipped = review_dpo_pairs(store, run_ids=[run["run_id"]])
    assert len(flipped) == 2
    assert flipped[-1]["preferred_output"][0]["content"] == outputs[a1]["output_text"]
    assert len(preferences(store, run_ids=[run["run_id"]])) == 3


def test_a_correction_is_also_a_dpo_pair(store, run):
    sid = sample_id(store, run["iterations"][1], "item-00007")  # wrong in iteration 1
    add_review(store, sid, correction="lost_card")
    output = store.samples_by_id([sid])[sid]["output_text"]
    pairs = review_dpo_pairs(store)
    assert pairs == [{"input": {"messages": json.loads(store.samples_by_id([sid])[sid]["input_json"])},
                      "preferred_output": [{"role": "assistant", "content": "lost_card"}],
                      "non_preferred_output": [{"role": "assistant", "content": output}]}]
    assert review_dpo_pairs(store, include_corrections=False) == []


def test_reviews_are_scoped_to_runs_and_iterations(store, run):
    other = build_run(store, n_items=4, run_id="run-test-000002", stages=[("eval", "measured")])
    add_review(store, sample_id(store, other["iterations"][0], "item-00000"), correction="x")
    add_review(store, sample_id(store, run["iterations"][2], "item-00000"), correction="y")
    assert [r["messages"][-1]["content"] for r in review_sft_rows(store, run_ids=[run["run_id"]])] == ["y"]
    assert [r["messages"][-1]["content"] for r in review_sft_rows(store, iteration_ids=other["iterations"])] == ["x"]
    assert len(review_sft_rows(store)) == 2


def test_judge_agreement_counts_and_kappa(store, run):
    b = run["iterations"][1]
    # default_outcome: the judge agrees with the label grader except when index % 3 == 0.
    for i in range(10):
        sid = sample_id(store, b, f"item-{i:05d}")
        label_passed = store.db.execute("select passed from grades where sample_id = ? and grader = 'label'",
                                        [sid]).fetchone()[0]
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
