"""Run specs: the YAML of `flywheel run` — an eval, a target, a cost goal, laps, a budget, stages.

    run_spec = load_run_spec("evals/banking77/run.yaml", overrides=["target=0.95"])

The stages a spec may list are the table in `flywheel.stages`; each stage's settings are its spec
class there. Loading reports every problem as `file: field: message`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flywheel.cost import Minimise
from flywheel.promotion import Goal
from flywheel.spec import ExecutorSpec, load_spec_file
from flywheel.stages import StageSpec


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetLimits(_Spec):
    iterations: int | None = Field(default=None, ge=1, description="Most candidate stages run.")
    model_calls: int | None = Field(default=None, ge=1, description="Most model calls, all stages.")
    tokens: int | None = Field(default=None, ge=1, description="Most prompt+completion tokens.")
    money: float | None = Field(default=None, gt=0, description="Most spend, in the price table's currency.")
    wall_s: float | None = Field(default=None, gt=0, description="Most wall-clock seconds.")


class GoalSpec(_Spec):
    """What the run minimises once the score target is met, and the score it may give up for it."""

    minimise: Minimise = Field(default="prompt_tokens", description="Cost per item to minimise: prompt_tokens, "
                               "tokens (prompt + completion), latency_s (the mean of each request's own time, "
                               "admission to last token; docs/storage.md), or money (per 1,000 items).")
    margin: float = Field(default=0.02, ge=0, lt=1, description="Non-inferiority margin on the objective: a "
                          "cheaper candidate is promoted when the paired 95% CI lower bound of its difference "
                          "is above -margin.")
    at_most: float | None = Field(default=None, gt=0, description="The cost goal is met at or below this cost "
                                  "per item; unset: keep minimising until the laps, the budget or a plateau end.")

    def rule(self) -> Goal:
        return Goal(minimise=self.minimise, margin=self.margin)


class RunSpec(_Spec):
    eval: str = Field(description="The eval spec, relative to this file.")
    target: float | None = Field(default=None, description="Score target: the incumbent's valid objective.")
    goal: GoalSpec | None = Field(
        default=None, description="Cost goal. Without one the run stops at the score target; with one it goes "
        "on to minimise cost per item until `goal.at_most` is met too.")
    laps: int = Field(default=1, ge=1, le=20, description="Times the stage list is run, each lap from the "
                      "incumbent the last one left.")
    budget: BudgetLimits = Field(default_factory=BudgetLimits, description="Limits of the whole run.")
    stages: list[StageSpec] = Field(min_length=1, description="One lap's stages, in order.")
    plateau: int = Field(default=1, ge=1, description="Stop after this many candidate stages in a row bring no "
                         "promotion.")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of promotion tests.")
    report: bool = Field(default=True, description="Write the HTML report at the end.")
    executor: ExecutorSpec | None = Field(
        default=None, description="Where the wheel's evaluations run ({kind: local|ray, address, num_cpus, "
        "chunk_size}); default: the eval spec's executor, else local. Execution only: no fingerprint changes.")

    source: str = Field(default="<run spec>", exclude=True, description="The run spec file, for errors.")
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder of the run spec file.")

    @property
    def eval_path(self) -> Path:
        return (self.base_dir / self.eval).resolve()


def load_run_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Load and validate a run spec (the eval it names is loaded by the wheel)."""
    return load_spec_file(path, RunSpec, overrides)
