"""A gate for CI: evaluate a spec, compare it with a baseline by the house's paired test, check budgets.

    result = run_gate(spec, store, baseline="main.db", budget=GateBudget(max_tokens=400))
    result.passed            # False on a significant regression of the objective or a blown budget
    result.failures          # one line per reason
    result.markdown()        # a pull-request comment: per-grader Δ with CI, items newly failing, cost

The baseline is a run id in `store` (its iteration on the gate's split), or a path to another
store file, where the newest completed run of the eval with the same name is taken. Candidate and
baseline are paired item by item (`flywheel.stats.paired_by_key`); a regression is significant
when the baseline is `significantly_better` than the candidate (`flywheel.promotion`: McNemar's
exact test for pass/fail objectives, the paired bootstrap CI otherwise), the same rule that
promotes a candidate in the wheel, read the other way round.

Budgets are per item (the mean over the candidate's samples) or in total. A sample that did not
error but reports no token count makes a token budget fail: a count that is not there cannot be
shown to be under the limit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.errors import FlywheelError
from flywheel.harness import run_eval
from flywheel.promotion import describe_test, significantly_better
from flywheel.spec import EvalSpec
from flywheel.stats import paired_by_key
from flywheel.store import Store
from flywheel.store.rows import Iteration


class GateError(FlywheelError):
    """The gate could not compare: no baseline, or nothing in common with it."""


class GateBudget(BaseModel):
    """Limits the candidate must stay within; None: no limit."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: float | None = Field(default=None, ge=0, description="Prompt + completion tokens.")
    max_cost: float | None = Field(default=None, ge=0, description="Money, in the price table's currency.")
    max_seconds: float | None = Field(default=None, ge=0, description="Wall time of the eval.")
    per: Literal["item", "total"] = Field(default="item", description="Limits per item (mean) or for the whole eval.")


class GraderDelta(BaseModel):
    """One grader, candidate against baseline on the paired items (candidate − baseline)."""

    model_config = ConfigDict(extra="forbid")
    grader: str = Field(description="The grader's name.")
    objective: bool = Field(description="True for the spec's objective grader (the one the regression test reads).")
    baseline: float = Field(description="Baseline mean over the paired items (pass rate or mean score).")
    candidate: float = Field(description="Candidate mean over the paired items.")
    delta: float = Field(description="candidate − baseline.")
    ci_low: float = Field(description="Lower end of the paired bootstrap 95% CI of the delta.")
    ci_high: float = Field(description="Upper end of the paired bootstrap 95% CI of the delta.")
    newly_failing: int = Field(description="Items the baseline passed and the candidate fails.")
    newly_passing: int = Field(description="Items the baseline failed and the candidate passes.")


class GateUsage(BaseModel):
    """What the candidate's eval used."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(description="Samples of the candidate.")
    tokens: int = Field(description="Prompt + completion tokens, summed.")
    cost: float = Field(description="Money, summed.")
    seconds: float = Field(description="Wall time of the eval.")
    missing_tokens: int = Field(description="Samples without error that report no token count.")

    def per_item(self, total: float) -> float:
        return total / self.n if self.n else math.nan


class GateResult(BaseModel):
    """The gate's verdict and everything its summary shows."""

    model_config = ConfigDict(extra="forbid")
    passed: bool = Field(description="No significant regression of the objective and no budget blown.")
    failures: list[str] = Field(description="One line per reason the gate failed.")
    eval_name: str = Field(description="The eval's name.")
    split: str = Field(description="The split both sides were measured on.")
    metric: str = Field(description="The objective's metric (pass_rate or mean_score).")
    run_id: str = Field(description="The candidate's run.")
    iteration_id: str = Field(description="The candidate's iteration.")
    baseline_source: str = Field(description="The baseline as given: a run id or a store file.")
    baseline_iteration_id: str = Field(description="The baseline's iteration.")
    paired: int = Field(description="Items measured on both sides.")
    test: str = Field(description="The paired test on the objective, with its figures.")
    graders: list[GraderDelta] = Field(description="Per grader, candidate against baseline.")
    newly_failing: list[str] = Field(description="Item keys the baseline passed and the candidate fails (objective).")
    usage: GateUsage = Field(description="What the candidate used.")
    budget: GateBudget = Field(description="The limits checked.")

    def markdown(self, max_items: int = 20) -> str:
        """The summary for a pull-request comment (user text escaped for Markdown)."""
        fmt = _fmt_pct if self.metric == "pass_rate" else _fmt_num
        dfmt = _fmt_pts if self.metric == "pass_rate" else _fmt_signed
        lines = [f"## Flywheel gate: {'✅ passed' if self.passed else '❌ failed'} · {_md(self.eval_name)}", ""]
        lines += [f"- {_md(f)}" for f in self.failures] + ([""] if self.failures else [])
        lines += [f"Candidate run `{_code(self.run_id)}` against baseline `{_code(self.baseline_source)}` "
                  f"on {self.paired} paired `{_code(self.split)}` items; {_md(self.test)}.", "",
                  f"| grader | baseline | candidate | Δ | 95% CI | newly failing | newly passing |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for g in self.graders:
            name = _md(g.grader) + (" (objective)" if g.objective else "")
            lines.append(f"| {name} | {fmt(g.baseline)} | {fmt(g.candidate)} | {dfmt(g.delta)} | "
                         f"{dfmt(g.ci_low)} … {dfmt(g.ci_high)} | {g.newly_failing} | {g.newly_passing} |")
        u = self.usage
        lines += ["", "| cost | per item | total | limit |", "|---|---:|---:|---:|",
                  f"| tokens | {u.per_item(u.tokens):.1f} | {u.tokens:,} | {_limit(self.budget, self.budget.max_tokens)} |",
                  f"| money | {u.per_item(u.cost):.6f} | {u.cost:.4f} | {_limit(self.budget, self.budget.max_cost)} |",
                  f"| seconds | {u.per_item(u.seconds):.3f} | {u.seconds:.1f} | {_limit(self.budget, self.budget.max_seconds)} |"]
        if u.missing_tokens:
            lines.append(f"\n{u.missing_tokens} of {u.n} samples report no token count.")
        if self.newly_failing:
            shown = ", ".join(f"`{_code(k)}`" for k in self.newly_failing[:max_items])
            more = f" and {len(self.newly_failing) - max_items} more" if len(self.newly_failing) > max_items else ""
            lines += ["", f"**Items newly failing ({len(self.newly_failing)}):** {shown}{more}"]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Markdown-inert text: no table breaks, links, HTML or emphasis from user-given names."""
    out = str(text).replace("\r", " ").replace("\n", " ")
    for ch in "\\`*_{}[]<>#|~":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(text: str) -> str:
    """Text inside a single-backtick code span: backticks and newlines cannot close or break it."""
    return str(text).replace("`", "'").replace("\r", " ").replace("\n", " ").replace("|", "/")


def _fmt_pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.1f}%"


def _fmt_num(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def _fmt_pts(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:+.1f} pts"


def _fmt_signed(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:+.3f}"


def _limit(budget: GateBudget, value: float | None) -> str:
    return "–" if value is None else f"{value:g} per {budget.per}"


def resolve_baseline(store: Store, baseline: str, eval_name: str, split: str) -> tuple[Store, Iteration]:
    """The store holding the baseline and its iteration: a store file (the newest completed run of
    `eval_name` on `split`) or a run id in `store` (its last iteration on `split`)."""
    path = Path(baseline)
    if path.suffix == ".db" or path.is_file():
        if not path.is_file():
            raise GateError(f"--baseline {baseline}: no store file there")
        other = Store.open(path)
        iteration = other.latest_eval_iteration(eval_name, split)
        if iteration is None:
            other.close()
            raise GateError(f"--baseline {baseline}: no completed run of eval {eval_name!r} on split {split!r} in it")
        return other, iteration
    run = store.get_run(baseline)  # StoreError names the store and the id
    on_split = [it for it in store.iterations(run.id) if it.split == split and it.n]
    if not on_split:
        raise GateError(f"--baseline {baseline}: run {run.id} has no measured iteration on split {split!r}")
    return store, on_split[-1]


def _budget_failures(budget: GateBudget, usage: GateUsage) -> list[str]:
    out = []
    if budget.max_tokens is not None and usage.missing_tokens:
        out.append(f"token budget: {usage.missing_tokens} of {usage.n} samples report no token count "
                   "(failing closed: a missing count cannot be shown to be under the limit)")
    for name, limit, total in (("tokens", budget.max_tokens, float(usage.tokens)),
                               ("cost", budget.max_cost, usage.cost), ("seconds", budget.max_seconds, usage.seconds)):
        if limit is None:
            continue
        value = usage.per_item(total) if budget.per == "item" else total
        if math.isnan(value) or value > limit:
            out.append(f"{name} budget blown: {value:.6g} {name} per {budget.per} > limit {limit:g}")
    return out


def run_gate(spec: EvalSpec, store: Store, baseline: str, *, split: str = "test", limit: int | None = None,
             budget: GateBudget | None = None, alpha: float = 0.05, command: str | None = None) -> GateResult:
    """Evaluate `spec` on `split` into `store`, compare it with `baseline` and check `budget`.

    `baseline`: a run id in `store`, or a path to a store file whose newest completed run of the
    same eval (by name) is taken. Fails (passed=False) on a significant regression of the
    objective (`flywheel.promotion.significantly_better`, baseline over candidate, at `alpha`) or
    on a blown budget; raises GateError when there is nothing to compare with."""
    budget = budget or GateBudget()
    base_store, base_it = resolve_baseline(store, baseline, spec.name, split)
    try:
        result = run_eval(spec, store, split=split, limit=limit, stage="gate", command=command)
        metric = spec.objective.metric
        objective = spec.objective_grader
        graders, newly_failing, test, paired, regressed = [], [], "", 0, False
        for name in [g["name"] for g in spec.graders]:
            base = base_store.objective_scores(base_it.id, name, metric)
            cand = store.objective_scores(result.iteration_id, name, metric)
            cmp = paired_by_key(base, cand)
            keys = sorted(set(base) & set(cand))
            failing = [k for k in keys if base[k][1] and not cand[k][1]]
            graders.append(GraderDelta(grader=name, objective=name == objective, baseline=cmp["mean_a"],
                                       candidate=cmp["mean_b"], delta=cmp["diff"], ci_low=cmp["ci_low"],
                                       ci_high=cmp["ci_high"], newly_failing=len(failing),
                                       newly_passing=cmp["improvements"]))
            if name == objective:
                paired = cmp["n"]
                newly_failing = [key if not repeat else f"{key}#{repeat}" for key, repeat in failing]
                # The house rule read the other way round: is the baseline significantly better?
                reverse = paired_by_key(cand, base)
                regressed = significantly_better(reverse, metric, alpha)
                test = describe_test(cmp, metric)
        if not paired:
            raise GateError(f"{spec.source}: no items in common with the baseline iteration {base_it.id} "
                            f"({'another store' if base_store is not store else 'run ' + base_it.run_id})")
        usage_row = store.iteration_usage(result.iteration_id)
        usage = GateUsage(n=usage_row.n, tokens=usage_row.prompt_tokens + usage_row.completion_tokens,
                          cost=usage_row.cost, seconds=result.wall_s, missing_tokens=usage_row.missing_tokens)
    finally:
        if base_store is not store:
            base_store.close()
    failures = []
    if regressed:
        failures.append(f"significant regression of {objective}: {test}")
    if result.status != "completed":
        failures.append(f"the candidate's eval {result.status}: {result.error or 'no result'}")
    failures += _budget_failures(budget, usage)
    return GateResult(passed=not failures, failures=failures, eval_name=spec.name, split=split, metric=metric,
                      run_id=result.run_id, iteration_id=result.iteration_id, baseline_source=baseline,
                      baseline_iteration_id=base_it.id, paired=paired, test=test, graders=graders,
                      newly_failing=newly_failing, usage=usage, budget=budget)
