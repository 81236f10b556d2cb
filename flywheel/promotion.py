"""The promotion rule: when a candidate replaces the incumbent, and which test said so.

A candidate (a prompt, a checkpoint, a student with a shorter prompt) is measured on `valid` and
paired with the incumbent item by item. It is promoted when

* it is **significantly better**: McNemar's exact test on pass/fail (objective metric `pass_rate`)
  or the paired bootstrap 95% CI of the mean per-item difference excluding 0 (`mean_score`); or
* it is **cheaper and non-inferior**: cheaper per item on the run's cost goal, and the one-sided
  paired bootstrap 95% lower bound of (candidate − incumbent) lies above −margin (the standard
  non-inferiority test at one-sided level 0.05, i.e. the lower end of a two-sided 90% interval).

Every verdict names the test that made it, so a reason never cites one statistic while another
decided.

    verdict = decide(cmp, metric="pass_rate", alpha=0.05, goal=goal, candidate_cost=c, incumbent_cost=i)
    verdict.promoted, verdict.reason
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flywheel.cost import CostPerItem, cheaper


@dataclass(frozen=True)
class Goal:
    """What a run minimises once it is good enough, and how much score it may give up for it."""

    minimise: str = "prompt_tokens"
    margin: float = 0.0


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    rule: str      # "significantly better", "cheaper and non-inferior", or why not
    reason: str    # the statistics, naming the test that decided


def describe_test(cmp: dict[str, Any], metric: str) -> str:
    """The test that decides significance for this objective, with its figures."""
    if metric == "pass_rate":
        return (f"McNemar exact p={cmp['p_mcnemar']:.3g} ({cmp['improvements']} fixed, "
                f"{cmp['regressions']} broken)")
    return f"paired bootstrap 95% CI of the mean difference [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]"


def significantly_better(cmp: dict[str, Any], metric: str, alpha: float = 0.05) -> bool:
    """A positive paired difference that is significant: McNemar's exact test for pass/fail
    objectives, the bootstrap CI of the per-item difference excluding 0 otherwise."""
    if not cmp or cmp.get("n", 0) == 0 or not cmp["diff"] > 0:
        return False
    if metric == "pass_rate":
        return cmp["p_mcnemar"] < alpha
    return cmp["ci_low"] > 0


def non_inferior(cmp: dict[str, Any], margin: float) -> bool:
    """The one-sided paired bootstrap 95% lower bound of (candidate − incumbent) lies above −margin."""
    low = cmp.get("low_one_sided", math.nan) if cmp else math.nan
    return bool(cmp and cmp.get("n", 0) and not math.isnan(low) and low > -margin)


def decide(cmp: dict[str, Any], *, metric: str, alpha: float, goal: Goal | None,
           candidate_cost: CostPerItem, incumbent_cost: CostPerItem) -> Verdict:
    """Promote when significantly better, or cheaper and non-inferior (see the module docstring)."""
    scores = f"valid {cmp['mean_b']:.3f} vs {cmp['mean_a']:.3f}, diff {cmp['diff']:+.3f}" if cmp.get("n") else "no paired items"
    if significantly_better(cmp, metric, alpha):
        return Verdict(True, "significantly better", f"{scores}; significantly better: {describe_test(cmp, metric)}")
    if goal is not None and goal.margin > 0 and cheaper(candidate_cost, incumbent_cost, goal.minimise):
        costs = f"{candidate_cost.describe(goal.minimise)} vs {incumbent_cost.describe(goal.minimise)}"
        if non_inferior(cmp, goal.margin):
            return Verdict(True, "cheaper and non-inferior",
                           f"{scores}; cheaper ({costs}) and non-inferior: one-sided paired bootstrap 95% lower "
                           f"bound {cmp['low_one_sided']:+.3f} > −{goal.margin:g} margin")
        return Verdict(False, "cheaper but possibly worse",
                       f"{scores}; cheaper ({costs}) but not shown non-inferior: one-sided paired bootstrap 95% "
                       f"lower bound {cmp['low_one_sided']:+.3f} ≤ −{goal.margin:g} margin")
    return Verdict(False, "not significantly better", f"{scores}; not significantly better: {describe_test(cmp, metric)}")


@dataclass(frozen=True)
class OnlineVerdict:
    """A shadow or canary decision on live pairs: `action` is promote / reject / rollback / keep /
    wait (not enough evidence yet); `reason` names the test and its figures."""

    action: str
    reason: str


def describe_sequence(bounds: Any, alpha: float) -> str:
    """The always-valid interval that decided, with its figures."""
    return (f"betting confidence sequence ({1 - alpha:.0%}, always valid) of the mean paired difference "
            f"[{bounds.lower:+.3f}, {bounds.upper:+.3f}] after {bounds.n} pairs (mean {bounds.mean:+.3f})")


def decide_shadow(bounds: Any, *, margin: float, cheaper: bool, alpha: float, min_pairs: int = 1) -> OnlineVerdict:
    """Candidate − production on shadow pairs: promote when the sequence's lower end is above 0
    (better), or above −margin for a cheaper candidate (non-inferior and cheaper); reject when its
    upper end is below 0 for one no cheaper, or below −margin; otherwise wait for more pairs."""
    test = describe_sequence(bounds, alpha)
    if bounds.n < min_pairs:
        return OnlineVerdict("wait", f"{bounds.n} of at least {min_pairs} shadow pairs")
    if bounds.lower > 0:
        return OnlineVerdict("promote", f"better: {test} lies above 0")
    if cheaper and margin > 0 and bounds.lower > -margin:
        return OnlineVerdict("promote", f"cheaper and non-inferior: {test} lies above −{margin:g}")
    if bounds.upper < -margin or (not cheaper and bounds.upper < 0):
        bar = f"−{margin:g}" if bounds.upper < -margin else "0"
        return OnlineVerdict("reject", f"worse: {test} lies below {bar}")
    return OnlineVerdict("wait", f"undecided: {test}")


def decide_canary(bounds: Any, *, margin: float, alpha: float, enough: int) -> OnlineVerdict:
    """New production − previous production on canary pairs: roll back when the sequence's upper
    end drops below −margin (quality dropped; an errored answer scores 0, so errors count); keep the
    switch once `enough` pairs have not shown a drop."""
    test = describe_sequence(bounds, alpha)
    if bounds.n and bounds.upper < -margin:
        return OnlineVerdict("rollback", f"quality dropped: {test} lies below −{margin:g}")
    if bounds.n >= enough:
        return OnlineVerdict("keep", f"no drop after {bounds.n} pairs: {test}")
    return OnlineVerdict("wait", f"watching: {test}")
