"""The wheel's one event stream: a typed `WheelEvent` for every step a run takes.

The wheel (`flywheel.wheel`) emits them from its stages, from the harness's progress callback
(items generated and graded) and from `flywheel.train.run`'s trainer callbacks (training steps with
their loss, checkpoints saved). Consumers read the same events:

* the console view (`flywheel.report.live.wheel_view`): a rich panel on a terminal, one line per
  stage otherwise;
* the API (`/v1/flywheel/runs/{id}/events`): stored as the run object's events, throttled;
* the review app's run page: the latest event is kept on the run row (`WheelState.live`) while the
  run is in progress.

    def show(event: WheelEvent) -> None:
        print(event.line())
    run_wheel(run_spec, store, on_event=show)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EventKind = Literal["log", "stage", "stage_done", "evaluate", "train", "checkpoint", "finished"]
# Events that mark a boundary (never dropped by a throttle) vs the steps inside a stage.
BOUNDARY_KINDS = frozenset({"log", "stage", "stage_done", "finished"})


class WheelEvent(BaseModel):
    """Where a wheel run is now: lap and stage, the step of the stage, time spent and left, the incumbent."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    kind: EventKind = Field(description="log: a line the wheel logs; stage / stage_done: a stage starts or ends "
                            "(`baseline` and `test` count as stages); evaluate: items generated and graded; "
                            "train: a training step; checkpoint: a checkpoint saved; finished: the run stopped.")
    message: str = Field(default="", description="The event as one line of text.")
    lap: int = Field(default=0, description="The lap (1-based; 0 before the first lap: the baseline).")
    laps: int = Field(default=0, description="Laps the run spec allows.")
    stage: str = Field(default="", description="The stage's name (optimize, capture, sft, ..., baseline, test).")
    position: int = Field(default=0, description="Stages finished so far in the run's plan.")
    positions: int = Field(default=0, description="Stages the run's plan holds over all laps.")
    step: str = Field(default="", description="What the stage is doing: `evaluate valid`, `train`, ...")
    done: int | None = Field(default=None, description="Units of the step done (items, training steps).")
    total: int | None = Field(default=None, description="Units the step has in all.")
    unit: str = Field(default="", description="What `done` and `total` count: items or steps.")
    loss: float | None = Field(default=None, description="The latest training loss (train events).")
    elapsed_s: float = Field(default=0.0, description="Wall time of the run so far, over every resume.")
    eta_s: float | None = Field(default=None, description="Estimated seconds left in the run (the current stage "
                                "by its own pace, each stage still to run by the mean of the finished ones).")
    incumbent_score: float | None = Field(default=None, description="The incumbent's valid objective score.")
    incumbent_cost: str = Field(default="", description="The incumbent's cost per item, described.")

    def line(self) -> str:
        """The event as one line of text (what a log, a terminal without a view or the API shows)."""
        if self.kind in ("log", "stage", "stage_done", "finished"):
            return self.message
        where = f"lap {self.lap} {self.stage}" if self.lap else self.stage
        count = f" {self.done}/{self.total} {self.unit}" if self.done is not None and self.total else ""
        loss = f" loss {self.loss:.4g}" if self.loss is not None else ""
        return f"{where}: {self.step}{count}{loss}{' ' + self.message if self.message else ''}"


EventFn = Callable[[WheelEvent], None]


class Throttle:
    """Lets boundary events through and a step event at most once per `every_s` seconds per kind
    (the last step of a step, `done == total`, always passes)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def passes(self, event: WheelEvent) -> bool:
        if event.kind in BOUNDARY_KINDS or (event.total and event.done == event.total):
            return True
        clock = time.monotonic()
        if clock - self._last.get(event.kind, float("-inf")) < self.every_s:
            return False
        self._last[event.kind] = clock
        return True


def format_seconds(seconds: float | None) -> str:
    """`1:05:03`, `4:10` or `–` for an unknown time."""
    if seconds is None:
        return "–"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
