"""Typed summaries of an iteration: what an eval scored, per grader and on the objective.

`EvalSummary` is what `harness.summarise` returns, what `runs.summary_json` holds for an eval run,
and what `EvalSummary.of_run` reads back (`RunSummary.of_run`: what any run's summary says). The rules that turn
sample and grade rows into numbers live here, once: the store runs the queries and calls them.

    >>> rows = [SampleRow(id=1, item_key="a", repeat=0), SampleRow(id=2, item_key="b", repeat=0, error="boom")]
    >>> grades = [GradeRow(sample_id=1, grader="exact", score=1.0, passed=True)]
    >>> s = summarise_rows(rows, grades, objective_grader="exact", metric="pass_rate")
    >>> s.n_samples, s.n_errors, s.objective, s.graders[0].errors
    (2, 1, 0.5, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from flywheel.stats import mean_ci, wilson_ci
from flywheel.store.rows import Run, sample_passed

Metric = Literal["pass_rate", "mean_score"]


class _Summary(BaseModel):
    # NaN (no samples yet) is written as JSON NaN, as `json.dumps` did, and read back as NaN.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class GraderSummary(_Summary):
    """One grader over every sample of an iteration; a sample that errored before grading scores 0."""

    name: str = Field(description="The grader's name as stored in `grades.grader`.")
    n: int = Field(description="Samples of the iteration (errored ones included).")
    mean: float = Field(description="Mean score, errored samples counted as 0.")
    ci_low: float = Field(description="Lower end of the 95% bootstrap CI of the mean.")
    ci_high: float = Field(description="Upper end of the 95% bootstrap CI of the mean.")
    pass_rate: float = Field(description="Share of samples this grader passed.")
    errors: int = Field(description="Samples that errored, or whose grade by this grader errored.")


class EvalSummary(_Summary):
    """Pass rate, objective, per-grader statistics, tokens and cost of one iteration."""

    n_samples: int = Field(description="Samples stored in the iteration.")
    n_errors: int = Field(description="Samples whose generation (or rendering) failed.")
    pass_rate: float = Field(description="Share of samples that passed every grader.")
    pass_ci: list[float] = Field(description="Wilson 95% interval of `pass_rate`.")
    graders: list[GraderSummary] = Field(description="Per grader, by name.")
    objective: float = Field(description="The eval's objective: the objective grader's pass rate or mean.")
    objective_ci: list[float] = Field(description="95% interval of `objective`.")
    prompt_tokens: int = Field(description="Prompt tokens over all samples.")
    completion_tokens: int = Field(description="Completion tokens over all samples.")
    cost: float = Field(description="Money spent on the samples (0 for local models).")
    model_calls: int | None = Field(default=None, description="Model calls this run made (eval runs).")
    cache_hits: int | None = Field(default=None, description="Completions served from the cache (eval runs).")
    wall_s: float | None = Field(default=None, description="Wall time of the eval run, in seconds.")

    @classmethod
    def of_run(cls, run: Run) -> EvalSummary | None:
        """An eval run's stored summary (None while it runs)."""
        return cls.model_validate_json(run.summary_json) if run.summary_json else None


class RunSummary(BaseModel):
    """What reports read from any run's `summary_json` (eval, capture, optimize or wheel run).

    Each kind stores more than this (an eval run an `EvalSummary`, the wheel its state); the rest
    is kept as extra fields.
    """

    model_config = ConfigDict(extra="allow")

    n_samples: int | None = Field(default=None, description="Samples of an eval run.")
    pass_rate: float | None = Field(default=None, description="Pass rate of an eval run.")
    wall_s: float | None = Field(default=None, description="Wall time of an eval run or a wheel's result.")
    elapsed_s: float | None = Field(default=None, description="Wall time of a whole wheel run.")

    @classmethod
    def of_run(cls, run: Run) -> RunSummary:
        """What any run's stored summary says of its size, pass rate and wall time (all optional)."""
        return cls.model_validate_json(run.summary_json or "{}")

    @property
    def tokens_paid(self) -> int | None:
        """Tokens paid for every model call of a search or a wheel run (their results' `tokens`); None for
        other runs, whose iterations are all they measured."""
        extra = self.model_extra or {}
        result = extra.get("result")
        paid = extra.get("tokens", result.get("tokens") if isinstance(result, dict) else None)
        return paid if isinstance(paid, int) else None

    @property
    def wall_time(self) -> float | None:
        """The run's wall time in seconds: the wheel's `elapsed_s`, else `wall_s`."""
        return self.elapsed_s if self.elapsed_s is not None else self.wall_s


class SampleRow(NamedTuple):
    """The columns of a sample the summaries need (a plain tuple: reports read many thousands)."""

    id: int
    item_key: str = ""
    repeat: int = 0
    error: str | None = None
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    cost: float | None = 0.0


class GradeRow(NamedTuple):
    """The columns of a grade the summaries need."""

    sample_id: int
    grader: str
    score: float | None = 0.0
    passed: bool = False
    error: str | None = None


def objective_value(error: str | None, score: float | None, passed: bool | None,
                    metric: str | None) -> tuple[float, bool]:
    """(score, passed) of one sample on the objective grader.

    A sample that errored, or has no grade by the objective grader (`score is None`), is (0.0, False).
    `metric='pass_rate'` scores a sample 1.0 or 0.0 by its pass; `'mean_score'` (or None: the raw
    score, as the paired promotion test reads it) gives the grader's score.

    >>> objective_value(None, 0.7, True, "pass_rate"), objective_value(None, 0.7, True, "mean_score")
    ((1.0, True), (0.7, True))
    >>> objective_value("model_error: timeout", None, None, "mean_score")
    (0.0, False)
    """
    if error or score is None and passed is None:
        return 0.0, False
    ok = bool(passed)
    if metric == "pass_rate":
        return float(ok), ok
    return float(score or 0.0), ok


def grader_summaries(samples: Sequence[SampleRow], grades: Sequence[GradeRow], *,
                     ci: bool = True) -> list[GraderSummary]:
    """Per-grader statistics over every sample (errored or ungraded samples score 0 and fail).

    `ci=False` skips the bootstrap (ci_low, ci_high are NaN): reports over large runs need only means.
    """
    by_grader: dict[str, dict[int, GradeRow]] = {}
    for grade in grades:
        by_grader.setdefault(grade.grader, {})[grade.sample_id] = grade
    errored = {s.id for s in samples if s.error}
    out = []
    for name, by_sample in by_grader.items():
        found = [by_sample.get(s.id) for s in samples]
        scores = [g.score or 0.0 if g else 0.0 for g in found]
        passes = [bool(g and g.passed) for g in found]
        mean, low, high = mean_ci(scores) if ci else (sum(scores) / len(scores) if scores else math.nan,
                                                      math.nan, math.nan)
        out.append(GraderSummary(
            name=name, n=len(scores), mean=mean, ci_low=low, ci_high=high,
            pass_rate=sum(passes) / len(passes) if passes else math.nan,
            errors=sum(1 for s, g in zip(samples, found) if s.id in errored or (g is not None and g.error))))
    return out


def summarise_rows(samples: Sequence[SampleRow], grades: Sequence[GradeRow], *, objective_grader: str,
                   metric: str) -> EvalSummary:
    """The `EvalSummary` of an iteration's sample and grade rows (samples in item order: the
    bootstrap CI is seeded, so the order fixes its value)."""
    per_grader = grader_summaries(samples, grades)
    by_sample: dict[int, list[tuple[str, bool, str | None]]] = {}
    for grade in grades:
        by_sample.setdefault(grade.sample_id, []).append((grade.grader, grade.passed, grade.error))
    names = {g.name for g in per_grader}
    successes = sum(1 for s in samples if sample_passed(s.error, by_sample.get(s.id, []), names))
    n = len(samples)
    objective, objective_ci = successes / n if n else math.nan, list(wilson_ci(successes, n))
    for g in per_grader:
        if g.name == objective_grader:
            if metric == "pass_rate":
                objective, objective_ci = g.pass_rate, list(wilson_ci(round(g.pass_rate * g.n), g.n))
            else:
                objective, objective_ci = g.mean, [g.ci_low, g.ci_high]
    return EvalSummary(
        n_samples=n, n_errors=sum(1 for s in samples if s.error), pass_rate=successes / n if n else math.nan,
        pass_ci=list(wilson_ci(successes, n)), graders=per_grader, objective=objective,
        objective_ci=objective_ci, prompt_tokens=sum(s.prompt_tokens or 0 for s in samples),
        completion_tokens=sum(s.completion_tokens or 0 for s in samples),
        cost=sum(s.cost or 0.0 for s in samples))
