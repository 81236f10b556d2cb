"""Constrained judging (graders.constrained): a judge that scores candidate replies always answers.

The judge is a real local model (the tiny Llama of conftest, fp32): its replies are the model's
own probabilities, so what is checked is exact bookkeeping: probabilities, argmax, the weighted
score, batching. Judges that fail are a small in-process object (a test double for a broken model).
"""

from __future__ import annotations

import math

import pytest

import graders
from graders.constrained import (
    label_choices,
    normalise,
    score_choices_text,
    score_values,
)
from flywheel.models import load_model

LABEL = {
    "type": "label_model", "name": "sentiment", "model": "local:tiny",
    "input": [{"role": "user", "content": "Is this positive or negative? {{sample.output_text}}"}],
    "labels": ["positive", "negative", "mixed"], "passing_labels": ["positive"],
}
SCORE = {
    "type": "score_model", "name": "helpful", "model": "local:tiny", "range": [0, 10], "pass_threshold": 4,
    "input": [{"role": "system", "content": "Rate the reply."}, {"role": "user", "content": "{{sample.output_text}}"}],
}
SAMPLES = ["I loved it", "awful, never again", "fine I guess", "the parcel came on time and the box was intact"]


@pytest.fixture(scope="module")
def judge(chatty_dir):
    model = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    yield model
    model.close()


@pytest.mark.parametrize("low, high, expected", [
    (0, 10, [float(v) for v in range(11)]),
    (1, 5, [1.0, 2.0, 3.0, 4.0, 5.0]),
    (0, 1, [round(v / 10, 10) for v in range(11)]),
    (0, 100, [float(v) for v in range(0, 101, 10)]),
    (-1, 1, [round(-1 + v / 5, 10) for v in range(11)]),
])
def test_score_grids_lie_in_the_range(low, high, expected):
    assert score_values(low, high) == pytest.approx(expected)


def test_candidate_replies_are_json_and_prefix_free():
    for choices in (score_choices_text(score_values(0, 10)), score_choices_text(score_values(0, 1)),
                    label_choices(["yes", "yes please", "no"])):
        for a in choices:
            graders.make_sample(a)["output_json"]["result"]  # parses, has a result
            assert not any(b != a and b.startswith(a) for b in choices)


def test_normalise_is_a_softmax():
    probs = normalise([-1.0, -2.0, -math.inf])
    assert sum(probs) == pytest.approx(1.0) and probs[2] == 0.0
    assert probs[0] / probs[1] == pytest.approx(math.e)
    assert normalise([-math.inf, -math.inf]) == [0.5, 0.5]


def test_label_model_picks_the_likeliest_label_and_stores_probabilities(judge):
    grader = graders.build_grader(LABEL, judge=judge)
    grades = grader.grade_batch(SAMPLES, [{}] * len(SAMPLES))
    for sample, grade in zip(SAMPLES, grades):
        d = grade.details
        assert grade.error is None and d["constrained"] is True
        assert sum(d["probabilities"].values()) == pytest.approx(1.0)
        best = max(d["logprobs"], key=d["logprobs"].get)
        assert d["label"] == best and d["reply"] == f'{{"result": "{best}"}}'
        assert grade.passed == (best == "positive") and grade.score == float(grade.passed)
        assert "Respond with only a JSON object" in d["messages"][0]["content"]
        assert sample in d["messages"][-1]["content"]


def test_score_model_is_the_probability_weighted_grid(judge):
    grader = graders.build_grader(SCORE, judge=judge)
    grades = grader.grade_batch(SAMPLES, [{}] * len(SAMPLES))
    for grade in grades:
        d = grade.details
        assert grade.error is None and d["constrained"] is True
        probs = d["probabilities"]
        assert list(probs) == [str(v) for v in range(11)]
        assert grade.score == pytest.approx(sum(p * float(v) for v, p in probs.items()))
        assert 0 <= grade.score <= 10 and grade.passed == (grade.score >= 4)
        assert d["result"] == float(max(probs, key=probs.get))
        assert d["reply"] == f'{{"result": {int(d["result"])}}}'
        assert '"steps"' not in d["messages"][0]["content"]  # the constrained judge only chooses a result


def test_one_at_a_time_equals_batched(judge):
    grader = graders.build_grader(SCORE, judge=judge)
    batched = grader.grade_batch(SAMPLES, [{}] * len(SAMPLES))
    single = [grader.grade(s, {}) for s in SAMPLES]
    assert [g.score for g in batched] == pytest.approx([g.score for g in single], abs=1e-4)


class BrokenScorer:
    """A judge whose scorer fails or answers the wrong shape (stands in for a broken model)."""

    def __init__(self, result):
        self.result = result

    def chat(self, conversations, **kwargs):
        raise AssertionError("a judge that scores choices is not asked to write")

    def score_choices(self, conversations, choices):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize("result, message", [
    (RuntimeError("out of memory"), "out of memory"),
    ([[0.0, -1.0, -2.0]], "scored 1 conversations of 2"),
    ([[0.0], [0.0]], "for 3 choices"),
    ([[0.0, float("nan"), 0.0]] * 2, "for 3 choices"),
])
def test_a_failing_scorer_is_a_recorded_server_error(result, message):
    grader = graders.build_grader(LABEL, judge=BrokenScorer(result))
    grades = grader.grade_batch(["a", "b"], [{}, {}])
    for grade in grades:
        assert grade.error == "model_grader_server_error" and message in grade.error_details
        assert grade.score == 0.0 and grade.passed is False


def test_a_template_error_still_comes_first():
    cfg = {**LABEL, "input": [{"role": "user", "content": "{{item.missing}}"}]}
    grade = graders.build_grader(cfg, judge=BrokenScorer(RuntimeError("unused"))).grade("a", {})
    assert grade.error == "invalid_variable_error"


def test_a_constrained_judge_is_a_smooth_trl_reward(judge):
    reward = graders.reward_function(SCORE, judge=judge)
    rewards = reward(prompts=["p"] * len(SAMPLES), completions=SAMPLES)
    expected = [g.score for g in graders.build_grader(SCORE, judge=judge).grade_batch(SAMPLES, [{}] * len(SAMPLES))]
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert all(0 < r < 10 for r in rewards)  # probability-weighted: never stuck on a grid value
