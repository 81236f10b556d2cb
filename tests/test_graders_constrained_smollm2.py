"""The embedded SmolLM2-135M as a constrained judge on the labelled set in fixtures/judges.

Free-text, this judge rarely answers in the asked format; constrained, it always answers. What is
asserted: no grade is an error, and its labels agree with the reference beyond chance (an exact
one-sided binomial test against the majority-class rate). The figures are printed, not asserted:
see docs/graders.md and benchmarks/judges.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import graders
from flywheel.models import load_model
from flywheel.reviews import cohen_kappa

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "judges"


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(successes, n + 1))


@pytest.fixture(scope="module")
def judged():
    rows = [json.loads(line) for line in (FIXTURES / "sentiment.jsonl").read_text().splitlines()]
    configs = json.loads((FIXTURES / "graders.json").read_text())
    model = load_model("local:smollm2")
    try:
        out = {}
        for cfg in configs:
            grader = graders.build_grader(cfg, judge=model)
            out[cfg["name"]] = grader.grade_batch([r["output"] for r in rows], [dict(r) for r in rows])
        yield rows, out
    finally:
        model.close()


def test_every_grade_is_an_answer(judged):
    _, out = judged
    for name, grades in out.items():
        assert [g.error for g in grades if g.error] == [], name
        assert all(g.details["constrained"] for g in grades)


def test_labels_agree_with_the_reference_beyond_chance(judged):
    rows, out = judged
    reference = [r["label"] for r in rows]
    chosen = [g.details["label"] for g in out["sentiment"]]
    hits = sum(a == b for a, b in zip(chosen, reference))
    majority = max(reference.count(label) for label in set(reference)) / len(reference)
    pp = sum(c == "positive" and r == "positive" for c, r in zip(chosen, reference))
    pf = sum(c == "positive" and r == "negative" for c, r in zip(chosen, reference))
    fp = sum(c == "negative" and r == "positive" for c, r in zip(chosen, reference))
    ff = sum(c == "negative" and r == "negative" for c, r in zip(chosen, reference))
    kappa = cohen_kappa(pp, pf, fp, ff)
    p_value = binomial_tail(hits, len(rows), majority)
    print(f"\nconstrained SmolLM2 label_model: accuracy {hits}/{len(rows)}, kappa {kappa:.3f}, p={p_value:.2g}")
    assert kappa > 0 and p_value < 0.01


def test_scores_stay_in_the_range(judged):
    rows, out = judged
    scores = [g.score for g in out["positivity"]]
    assert all(0 <= s <= 10 for s in scores)
    pos = [s for s, r in zip(scores, rows) if r["label"] == "positive"]
    neg = [s for s, r in zip(scores, rows) if r["label"] == "negative"]
    print(f"\nconstrained SmolLM2 score_model: mean {sum(pos) / len(pos):.2f} on positive vs "
          f"{sum(neg) / len(neg):.2f} on negative messages")
