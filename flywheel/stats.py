"""Confidence intervals for eval scores (seeded, so the same samples print the same numbers), and an
always-valid confidence sequence for paired differences watched as they arrive (the service's shadow
and canary tests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

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


# -- sequential (always-valid) inference on paired differences -------------------------------------
class SequentialBounds(NamedTuple):
    """An always-valid confidence interval for the mean paired difference after `n` pairs: with
    probability at least 1 - alpha, EVERY interval of the sequence holds the true mean, so it may be
    looked at after each pair and a decision taken the first time it excludes a value."""

    n: int
    mean: float
    lower: float
    upper: float


def paired_confidence_sequence(differences: Sequence[float], *, alpha: float = 0.05, low: float = -1.0,
                               high: float = 1.0, grid: int = 801) -> SequentialBounds:
    """A betting confidence sequence (Waudby-Smith & Ramdas 2023, "Estimating means of bounded random
    variables by betting", hedged capital with predictable plug-in bets) for the mean of paired
    differences bounded in [low, high], e.g. candidate − production scores in [-1, 1].

    For each candidate mean m, two gamblers bet that the next difference lies above (below) m; their
    wealth is a nonnegative martingale when m is the true mean, so by Ville's inequality the hedged
    wealth passes 1/alpha with probability at most alpha, ever. The interval is the set of m whose
    wealth has not, intersected over time (valid under optional stopping: a caller may test after
    every new pair). Differences outside [low, high] are clipped.

    >>> b = paired_confidence_sequence([0.0] * 5)
    >>> b.lower < 0 < b.upper
    True
    """
    data = np.clip(np.asarray(differences, dtype=float), low, high)
    n = int(data.size)
    if n == 0:
        return SequentialBounds(0, math.nan, low, high)
    x = (data - low) / (high - low)  # in [0, 1]
    t = np.arange(1, n + 1, dtype=float)
    # Predictable bets: pair t stakes by the variance estimate of pairs < t (WSR's sigma-hat_{t-1}).
    mean_hat = (0.5 + np.cumsum(x)) / (t + 1)
    var_hat = (0.25 + np.cumsum((x - mean_hat) ** 2)) / (t + 1)
    var_before = np.concatenate(([0.25], var_hat[:-1]))
    lam = np.sqrt(2 * math.log(2 / alpha) / (var_before * t * np.log1p(t)))
    m = np.linspace(0.0, 1.0, grid)[1:-1]
    centred = x[:, None] - m[None, :]
    up = np.minimum(lam[:, None], 0.5 / m[None, :])
    down = np.minimum(lam[:, None], 0.5 / (1 - m[None, :]))
    log_up = np.cumsum(np.log1p(up * centred), axis=0)
    log_down = np.cumsum(np.log1p(-down * centred), axis=0)
    hedged = np.logaddexp(log_up, log_down) + math.log(0.5)
    rejected = (hedged >= math.log(1 / alpha)).any(axis=0)  # rejected at some time: running intersection
    kept = m[~rejected]
    if kept.size == 0:  # every grid point rejected: the interval is narrower than the grid step
        centre = float(x.mean())
        kept = np.array([centre])
    step = 1.0 / (grid - 1)
    lower = max(0.0, float(kept.min()) - step) * (high - low) + low
    upper = min(1.0, float(kept.max()) + step) * (high - low) + low
    return SequentialBounds(n, float(data.mean()), lower, upper)
