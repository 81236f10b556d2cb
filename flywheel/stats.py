"""Confidence intervals for eval scores (seeded, so the same samples print the same numbers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap CI; (nan, nan, nan) for no values.

    >>> mean_ci([1, 0, 1, 1])[0]
    0.75
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (mean, float(low), float(high))


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a pass rate; well-behaved at 0 and n."""
    if n == 0:
        return (math.nan, math.nan)
    z = {0.95: 1.959963984540054, 0.99: 2.5758293035489004, 0.9: 1.6448536269514722}[confidence]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(regressions: int, improvements: int) -> float:
    """Two-sided exact McNemar p-value (binomial test on the discordant pairs)."""
    n = regressions + improvements
    if n == 0:
        return 1.0
    k = min(regressions, improvements)
    # P(X <= k) for X ~ Bin(n, 1/2), in log space so n in the tens of thousands stays exact enough.
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2 * tail)


def paired_stats(a_scores: Sequence[float], b_scores: Sequence[float], a_pass: Sequence[bool],
                 b_pass: Sequence[bool], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of each side, mean difference (b - a) with a 95% paired-bootstrap CI, McNemar p."""
    a = np.asarray(a_scores, dtype=float)
    b = np.asarray(b_scores, dtype=float)
    n = int(a.size)
    regressions = sum(1 for x, y in zip(a_pass, b_pass) if x and not y)
    improvements = sum(1 for x, y in zip(a_pass, b_pass) if y and not x)
    out = {"n": n, "mean_a": math.nan, "mean_b": math.nan, "diff": math.nan, "low_one_sided": math.nan,
           "ci_low": math.nan,
           "ci_high": math.nan, "regressions": regressions, "improvements": improvements,
           "p_mcnemar": mcnemar_exact(regressions, improvements)}
    if n == 0:
        return out
    d = b - a
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), diff=float(d.mean()))
    if n == 1 or np.all(d == d[0]):
        out.update(ci_low=float(d[0]), ci_high=float(d[0]), low_one_sided=float(d[0]))
    else:
        rng = np.random.default_rng(seed)
        means = np.empty(resamples)
        step = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
        for start in range(0, resamples, step):
            stop = min(resamples, start + step)
            means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        low, high, one_sided = np.quantile(means, [0.025, 0.975, 0.05])
        out.update(ci_low=float(low), ci_high=float(high), low_one_sided=float(one_sided))
    return out


def paired_by_key(a: dict[Any, tuple[float, bool]], b: dict[Any, tuple[float, bool]]) -> dict[str, Any]:
    """`paired_stats` of b against a over the keys both have ((item_key, repeat) -> (score, passed),
    as `Store.objective_scores` returns them); a key only one side has is left out."""
    keys = sorted(set(a) & set(b))
    return paired_stats([a[k][0] for k in keys], [b[k][0] for k in keys],
                        [a[k][1] for k in keys], [b[k][1] for k in keys])
