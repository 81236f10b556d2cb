"""The wheel's stages, in one table: a stage is named once, beside its spec and its class.

    STAGES["capture"]            # CaptureStage
    build_stage(spec.stages[0])  # the stage object for a parsed stage spec

`RunSpec.stages` accepts exactly the specs of this table (`StageSpec`, a union discriminated by
`stage`); the training stages take every method of `flywheel.train.methods.METHODS`.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from flywheel.stages.base import Candidate, Incumbent, Stage, StageOutcome, StageSpecBase, WheelContext
from flywheel.stages.capture import CaptureStage, CaptureStageSpec
from flywheel.stages.optimize import OptimizeStage, OptimizeStageSpec
from flywheel.stages.training import TrainStage, TrainStageSpec
from flywheel.train.methods import METHODS

STAGES: dict[str, type] = {"optimize": OptimizeStage, "capture": CaptureStage, **{name: TrainStage for name in METHODS}}

StageSpec = Annotated[Union[tuple(dict.fromkeys(cls.spec_class for cls in STAGES.values()))],  # type: ignore[misc]
                      Field(discriminator="stage")]


def build_stage(spec: StageSpecBase) -> Stage:
    """The stage object for a parsed stage spec."""
    return STAGES[spec.stage](spec)  # type: ignore[attr-defined]


__all__ = ["STAGES", "Candidate", "CaptureStageSpec", "Incumbent", "OptimizeStageSpec", "Stage", "StageOutcome",
           "StageSpec", "StageSpecBase", "TrainStageSpec", "WheelContext", "build_stage"]
