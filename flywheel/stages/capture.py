"""The `capture` stage: distillation data from a teacher, graded, stored with its lineage.

`teacher: incumbent` is the best system so far *with its prompt* (demonstrations included): the
prompted system's answers become the student's training targets. Train items are graded by the
eval's graders; `inputs:` adds unlabelled inputs (a file, or proxy captures), kept by
self-consistency (`flywheel.distill.capture_unlabelled`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flywheel.distill import InputsSpec, capture, capture_unlabelled, load_inputs
from flywheel.errors import FlywheelError
from flywheel.stages.base import Incumbent, StageOutcome, StageSpecBase, WheelContext


class CaptureStageSpec(StageSpecBase):
    stage: Literal["capture"] = Field(description="Teacher outputs on train (and unlabelled inputs), graded.")
    teacher: str = Field(description="Teacher model reference, `incumbent` (the best system so far, with its "
                         "prompt), `tuned` (the tuned model the wheel would polish, with its prompt: on-policy "
                         "best-of-K for DPO), or reference:FIELD for labelled data.")
    n: int = Field(default=1, ge=1, le=64, description="Samples per train item (best-of-K when > 1).")
    temperature: float | None = Field(default=None, ge=0, le=2, description="Teacher temperature on train items.")
    limit: int | None = Field(default=None, ge=1, description="Capture at most this many train items.")
    inputs: InputsSpec | None = Field(default=None, description="Unlabelled inputs, accepted by self-consistency.")


class CaptureStage:
    """Sample the teacher on train items (graded) and on unlabelled inputs (voted); no candidate."""

    spec_class = CaptureStageSpec

    def __init__(self, spec: CaptureStageSpec):
        self.spec = spec

    def run(self, wheel: WheelContext, incumbent: Incumbent) -> StageOutcome:
        spec = self.spec
        wheel.store.save_prompt(incumbent.prompt, origin="incumbent")
        teacher = incumbent.model_ref if spec.teacher == "incumbent" else spec.teacher
        prompt = incumbent.prompt
        if spec.teacher == "tuned":  # the tuned model DPO will polish, with its own prompt: on-policy pairs
            tuned = wheel.best_tuned(incumbent)
            if tuned is None:
                raise FlywheelError("teacher: tuned: this run has no tuned model yet; put an sft stage before it")
            teacher, prompt = tuned
        wheel.store.save_prompt(prompt, origin="teacher")
        result = capture(wheel.spec, wheel.store, teacher, n=spec.n, temperature=spec.temperature,
                         limit=spec.limit, prompt=prompt.id, dataset=wheel.dataset, grader_set=wheel.grader_set)
        wheel.count(result.model_calls)
        reason = (f"capture {result.id}: {result.n_passed}/{result.n_samples} samples pass, "
                  f"{result.items_with_pass}/{result.n_items} train items covered by {teacher}")
        if spec.inputs is not None and not teacher.startswith("reference:"):
            inputs = load_inputs(wheel.spec, spec.inputs, wheel.store, base_dir=wheel.base_dir)
            wheel.log(f"  {len(inputs.items)} unlabelled inputs, {spec.inputs.n} samples each (self-consistency)")
            extra = capture_unlabelled(wheel.spec, wheel.store, teacher, inputs=inputs, prompt=prompt,
                                       n=spec.inputs.n, temperature=spec.inputs.temperature,
                                       min_agreement=spec.inputs.min_agreement, dataset=wheel.dataset)
            wheel.count(extra.model_calls)
            reason += (f"; capture {extra.id}: {extra.items_with_pass}/{extra.n_items} unlabelled inputs accepted "
                       f"by self-consistency (>= {spec.inputs.min_agreement:.0%} of {spec.inputs.n} agree)")
        return StageOutcome("capture", "captured", reason, lap=wheel.lap)
