"""The promotion rule and cost per item: significantly better, or cheaper and non-inferior; every
verdict names the test that decided it."""

import math

import pytest

from flywheel.cost import CostPerItem, cheaper
from flywheel.promotion import Goal, decide, non_inferior, significantly_better
from flywheel.stats import paired_stats

CHEAP = CostPerItem(n=100, prompt_tokens=31.0, completion_tokens=4.0, latency_s=0.01, money_per_1k=0.0)
COSTLY = CostPerItem(n=100, prompt_tokens=181.0, completion_tokens=4.0, latency_s=0.03, money_per_1k=0.0)


def paired(a_pass, b_pass):
    return paired_stats([float(x) for x in a_pass], [float(x) for x in b_pass], a_pass, b_pass)


def test_significantly_better_is_mcnemar_for_pass_rate_and_the_ci_for_mean_scores():
    cmp = paired([False] * 20 + [True] * 80, [True] * 20 + [True] * 80)  # 20 fixed, 0 broken
    verdict = decide(cmp, metric="pass_rate", alpha=0.05, goal=None, candidate_cost=COSTLY, incumbent_cost=CHEAP)
    assert verdict.promoted and verdict.rule == "significantly better"
    assert "McNemar exact p=" in verdict.reason and "20 fixed, 0 broken" in verdict.reason
    mean = decide(cmp, metric="mean_score", alpha=0.05, goal=None, candidate_cost=COSTLY, incumbent_cost=CHEAP)
    assert mean.promoted and "paired bootstrap 95% CI of the mean difference" in mean.reason
    # 4 of 4 fixed: the CI excludes 0 but McNemar's exact p is 0.125: a pass-rate objective is not promoted.
    small = paired([False] * 4, [True] * 4)
    assert small["ci_low"] > 0 and not significantly_better(small, "pass_rate")


def test_a_cheaper_non_inferior_candidate_is_promoted_and_says_why():
    # The student matches the prompted system (90 vs 90 passing, 2 swaps each way) at a sixth of the tokens.
    a = [True] * 88 + [True, True] + [False, False] + [False] * 8
    b = [True] * 88 + [False, False] + [True, True] + [False] * 8
    cmp = paired(a, b)
    assert cmp["diff"] == 0 and cmp["low_one_sided"] > -0.05 and cmp["ci_low"] <= cmp["low_one_sided"]
    verdict = decide(cmp, metric="pass_rate", alpha=0.05, goal=Goal("prompt_tokens", 0.05),
                     candidate_cost=CHEAP, incumbent_cost=COSTLY)
    assert verdict.promoted and verdict.rule == "cheaper and non-inferior"
    assert "31 prompt tokens/item vs 181 prompt tokens/item" in verdict.reason and "> −0.05 margin" in verdict.reason
    assert "one-sided paired bootstrap 95% lower bound" in verdict.reason
    # The same scores at a higher cost: nothing to gain, not promoted; without a goal, not promoted either.
    assert not decide(cmp, metric="pass_rate", alpha=0.05, goal=Goal("prompt_tokens", 0.05),
                      candidate_cost=COSTLY, incumbent_cost=CHEAP).promoted
    assert not decide(cmp, metric="pass_rate", alpha=0.05, goal=None, candidate_cost=CHEAP,
                      incumbent_cost=COSTLY).promoted


def test_cheaper_but_possibly_worse_is_rejected():
    a = [True] * 90 + [False] * 10
    b = [True] * 80 + [False] * 20  # 10 broken
    cmp = paired(a, b)
    verdict = decide(cmp, metric="pass_rate", alpha=0.05, goal=Goal("prompt_tokens", 0.05),
                     candidate_cost=CHEAP, incumbent_cost=COSTLY)
    assert not verdict.promoted and verdict.rule == "cheaper but possibly worse"
    assert not non_inferior(cmp, 0.05) and "not shown non-inferior" in verdict.reason


@pytest.mark.parametrize("measure,expected", [("prompt_tokens", 31.0), ("tokens", 35.0), ("latency_s", 0.01),
                                              ("money", 0.0)])
def test_cost_per_item_measures(measure, expected):
    assert CHEAP.value(measure) == pytest.approx(expected)
    assert cheaper(CHEAP, COSTLY, measure) is (measure != "money")  # equal money is not cheaper
    assert not cheaper(CostPerItem(), COSTLY, measure)  # unknown cost is never cheaper
    assert CostPerItem.from_dict(CHEAP.to_dict()) == CHEAP
    assert math.isnan(CostPerItem().value(measure))
