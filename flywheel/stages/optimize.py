"""The `optimize` stage: prompt search for the incumbent model, starting from its prompt."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flywheel.optimize import optimize_prompt
from flywheel.spec import MessageSpec, OptimizeSpec
from flywheel.stages.base import Candidate, Incumbent, StageOutcome, StageSpecBase, WheelContext


class OptimizeStageSpec(StageSpecBase):
    stage: Literal["optimize"] = Field(description="Prompt search for the incumbent model.")
    optimize: OptimizeSpec | None = Field(default=None, description="Settings; the eval's `optimize:` when unset.")


class OptimizeStage:
    """Variants, few-shot demonstrations and rewrites for the incumbent model (`flywheel.optimize`);
    the search's winner is the candidate. Test is not measured here: the wheel does, at its end."""

    spec_class = OptimizeStageSpec

    def __init__(self, spec: OptimizeStageSpec):
        self.spec = spec

    def run(self, wheel: WheelContext, incumbent: Incumbent) -> StageOutcome:
        # The search's baseline is the incumbent: its model, its prompt (demonstrations included).
        spec = wheel.spec.model_copy(update={
            "model": incumbent.model_ref,
            "input": [MessageSpec(role=m["role"], content=m["content"]) for m in incumbent.prompt.messages]})
        result = optimize_prompt(spec, wheel.store, model=wheel.model(incumbent.model_ref),
                                 config=self.spec.optimize or wheel.spec.optimize_config(), base_prompt=incumbent.prompt,
                                 measure_test=False, log=lambda m: wheel.log(f"  {m}"), dataset=wheel.dataset,
                                 grader_set=wheel.grader_set)
        wheel.count(result.model_calls, result.tokens)
        winner = result.winner
        if winner.prompt.id == incumbent.prompt.id:
            return StageOutcome("optimize", "no candidate", f"search {result.run_id}: {result.reason}", lap=wheel.lap,
                                search_run=result.run_id)
        kept = [c for c in result.candidates if c.origin.startswith("proposer")]
        detail = (f"search {result.run_id} winner {winner.origin} ({len(winner.prompt.demos)} demos"
                  + (f", nearest {winner.prompt.nearest}" if winner.prompt.nearest else "")
                  + f"; {len(kept)} rewrite(s) kept, {len(result.rejected)} rejected or dropped)")
        return StageOutcome("optimize", "proposed", detail, lap=wheel.lap, search_run=result.run_id,
                            proposal=Candidate(incumbent.model_ref, winner.prompt, detail, origin=winner.origin))
