"""The always-valid paired confidence sequence (flywheel.stats) and the online promotion rule
(flywheel.promotion.decide_shadow / decide_canary): error rates measured by simulation."""

from __future__ import annotations

import numpy as np

from flywheel.promotion import decide_canary, decide_shadow
from flywheel.stats import paired_confidence_sequence

ALPHA = 0.05


def _pairs(rng: np.random.Generator, effect: float, n: int) -> np.ndarray:
    """Paired pass/fail differences in {-1, 0, 1} with mean `effect` (40% of pairs discordant)."""
    return rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.2 - effect / 2, 0.6, 0.2 + effect / 2])


def _ever_crosses(d: np.ndarray, bar: float, side: str) -> bool:
    """Peeking after EVERY pair: did any interval lie entirely above (below) bar? The sequence is
    intersected over time, so its last interval answers for all the looks before it."""
    bounds = paired_confidence_sequence(d, alpha=ALPHA)
    return bool(bounds.lower > bar) if side == "above" else bool(bounds.upper < bar)


def test_no_difference_is_rarely_called_better_even_when_peeking():
    rng = np.random.default_rng(7)
    sims = 200
    false_wins = sum(_ever_crosses(_pairs(rng, 0.0, 300), 0.0, "above") for _ in range(sims))
    # alpha is a bound on ever crossing under continuous monitoring; allow binomial noise over 200 runs.
    assert false_wins / sims <= ALPHA + 0.03


def test_a_candidate_exactly_at_the_margin_is_rarely_called_non_inferior():
    rng = np.random.default_rng(11)
    sims, margin = 200, 0.1
    false = sum(_ever_crosses(_pairs(rng, -margin, 300), -margin, "above") for _ in range(sims))
    assert false / sims <= ALPHA + 0.03


def test_a_real_difference_is_found_both_ways():
    rng = np.random.default_rng(3)
    found_better = sum(_ever_crosses(_pairs(rng, 0.3, 300), 0.0, "above") for _ in range(40))
    found_worse = sum(_ever_crosses(_pairs(rng, -0.3, 300), 0.0, "below") for _ in range(40))
    assert found_better >= 36 and found_worse >= 36


def test_the_interval_holds_the_mean_and_narrows():
    rng = np.random.default_rng(5)
    d = _pairs(rng, 0.1, 800)
    small, large = paired_confidence_sequence(d[:50]), paired_confidence_sequence(d)
    assert small.lower <= 0.1 <= small.upper and large.lower <= 0.1 <= large.upper
    assert large.upper - large.lower < small.upper - small.lower
    assert large.lower >= small.lower and large.upper <= small.upper  # intersected over time
    empty = paired_confidence_sequence([])
    assert (empty.n, empty.lower, empty.upper) == (0, -1.0, 1.0)


def test_decide_shadow_promotes_rejects_and_waits():
    rng = np.random.default_rng(1)
    better = paired_confidence_sequence(_pairs(rng, 0.35, 200))
    worse = paired_confidence_sequence(_pairs(rng, -0.35, 200))
    same = paired_confidence_sequence(np.zeros(200))
    assert decide_shadow(better, margin=0.0, cheaper=False, alpha=ALPHA).action == "promote"
    assert decide_shadow(worse, margin=0.05, cheaper=True, alpha=ALPHA).action == "reject"
    # identical answers: non-inferior, so a cheaper candidate is promoted, a dearer one is not
    assert decide_shadow(same, margin=0.05, cheaper=True, alpha=ALPHA).action == "promote"
    assert decide_shadow(same, margin=0.05, cheaper=False, alpha=ALPHA).action == "wait"
    assert decide_shadow(better, margin=0.0, cheaper=False, alpha=ALPHA, min_pairs=500).action == "wait"
    assert "confidence sequence" in decide_shadow(better, margin=0.0, cheaper=False, alpha=ALPHA).reason


def test_decide_canary_rolls_back_a_drop_and_keeps_a_hold():
    rng = np.random.default_rng(2)
    dropped = paired_confidence_sequence(_pairs(rng, -0.35, 100))
    held = paired_confidence_sequence(_pairs(rng, 0.0, 100))
    assert decide_canary(dropped, margin=0.05, alpha=ALPHA, enough=100).action == "rollback"
    assert decide_canary(held, margin=0.05, alpha=ALPHA, enough=100).action == "keep"
    assert decide_canary(held, margin=0.05, alpha=ALPHA, enough=1000).action == "wait"
