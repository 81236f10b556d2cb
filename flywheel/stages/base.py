"""The stage protocol: what every stage of the wheel receives and returns.

A stage is a small class built from its spec. `run(wheel, incumbent)` does the stage's work and
returns a `StageOutcome`: either with a `proposal` (a `Candidate`: a model and the prompt it is
measured with) that the wheel measures on `valid` and promotes or rejects by its rule, or with a
final decision (`captured`, `failed`, `no candidate`). Stages never promote anything themselves,
never read `test`, and reach the store, models and budget only through the `WheelContext`.

    class MyStage:
        spec_class = MyStageSpec
        def __init__(self, spec): self.spec = spec
        def run(self, wheel, incumbent) -> StageOutcome: ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel.cost import CostPerItem
from flywheel.prompt import Prompt


class StageSpecBase(BaseModel):
    """Settings every stage has."""

    model_config = ConfigDict(extra="forbid")

    laps: list[int] | None = Field(
        default=None, description="Run this stage only in these laps (1-based); every lap when unset.")

    def runs_in(self, lap: int) -> bool:
        return self.laps is None or lap in self.laps


@dataclass
class Incumbent:
    """The best system so far: a model, the prompt it runs with, its valid iteration, score and cost."""

    model_ref: str
    prompt: Prompt
    iteration_id: str
    score: float
    cost: CostPerItem = field(default_factory=CostPerItem)

    @property
    def tuned(self) -> bool:
        """Whether the model carries a trained adapter (`local:BASE+ADAPTER`) or is a hosted fine-tune."""
        return "+" in self.model_ref or self.model_ref.startswith("openai:ft:")


@dataclass
class Candidate:
    """What a stage proposes: a model, the prompt it is measured with, and what it is."""

    model_ref: str
    prompt: Prompt
    detail: str
    origin: str = "candidate"


@dataclass
class StageOutcome:
    stage: str
    decision: str                 # promoted | rejected | captured | no candidate | failed
    reason: str
    lap: int = 1
    candidate: str | None = None  # "model · prompt id" of what was measured
    valid: float | None = None
    iteration_id: str | None = None
    cost: dict[str, Any] | None = None
    rule: str | None = None       # the promotion rule that decided
    wall_s: float = 0.0
    search_run: str | None = None  # the prompt search's own run (optimize), for its rewrites
    proposal: Candidate | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("proposal")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageOutcome":
        return cls(**{k: v for k, v in data.items() if k != "proposal"})


class WheelContext(Protocol):
    """What a stage may use of the running wheel (implemented by `flywheel.wheel.Wheel`)."""

    spec: Any          # the EvalSpec
    store: Any         # the Store
    dataset: Any       # the eval's Dataset
    grader_set: Any    # the eval's GraderSet
    run_id: str
    lap: int
    base_dir: Path     # the run spec's folder: relative paths in stage settings resolve against it

    def model(self, ref: str) -> Any: ...
    def log(self, message: str) -> None: ...
    def emit(self, kind: str, **fields: Any) -> None: ...
    def training_progress(self) -> dict[str, Any]: ...
    def count(self, model_calls: int, tokens: int = 0, cost: float = 0.0) -> None: ...
    def best_tuned(self, incumbent: Incumbent) -> tuple[str, Prompt] | None: ...
    def sample(self, stage: str, model_ref: str, prompt: Prompt, items: Any, *, repeats: int, temperature: float,
               max_tokens: int | None = None) -> str: ...


class Stage(Protocol):
    spec_class: type[StageSpecBase]

    def run(self, wheel: WheelContext, incumbent: Incumbent) -> StageOutcome: ...
