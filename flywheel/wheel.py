"""The wheel: `flywheel run` turns laps of stages toward a score target and a cost goal.

    result = run_wheel(load_run_spec("evals/banking77/run.yaml"), store)
    result.milestones, result.test, result.report_path

The incumbent is a (model, prompt) pair, first the eval's own. A lap runs the run spec's stages in
order (`flywheel.stages`: optimize, capture, sft, dpo, rft); each stage gets the incumbent and
returns an outcome, perhaps with a candidate. The wheel itself is only three things:

* **the loop**: laps of stages, each stage resumable (its outcome is saved on the run row);
* **the promotion rule** (`flywheel.promotion`): a candidate measured on `valid` replaces the
  incumbent when it is significantly better, or cheaper per item and non-inferior;
* **the stop**: the score target and the cost goal met, a budget spent, `plateau` candidate stages
  in a row without a promotion, or the laps done.

`test` is measured only after the wheel stops, for the baseline and the promoted iterations; the
summary names three milestones — the baseline, the best prompt, the final model — with score and
cost per item.

Resume: `flywheel run --resume RUN` re-enters the same run; finished stages are read back (nothing
is retrained), evaluations skip stored samples, and the completion cache answers every model call
already paid for.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.cost import CostPerItem
from flywheel.data import Dataset, Item, load_dataset
from flywheel.errors import FlywheelError
from flywheel.events import EventFn, Throttle, WheelEvent
from flywheel.executors import build_executor
from flywheel.grading import GraderSet
from flywheel.harness import evaluate, paired_comparison, register_eval
from flywheel.models import cached_model
from flywheel.models.memory import release_memory
from flywheel.promotion import decide
from flywheel.prompt import Prompt
from flywheel.run_spec import RunSpec, load_run_spec
from flywheel.spec import EvalSpec, load_eval_spec
from flywheel.stages import Incumbent, StageOutcome, build_stage
from flywheel.store import Store, now
from flywheel.train.local import step_reporter

LIVE_EVERY_S = 2.0  # the run row's `live` event is rewritten at most this often (the review app reads it)


@dataclass
class Milestone:
    """A system the summary names: score on valid and test, and cost per item."""

    label: str  # baseline | best prompt | final model
    model_ref: str
    prompt_id: str
    iteration_id: str
    valid: float
    test: float | None
    cost: dict[str, Any]


@dataclass
class WheelResult:
    run_id: str
    baseline_valid: float
    winner_valid: float
    winner_model: str
    winner_prompt_id: str
    test: dict[str, Any]
    stages: list[StageOutcome]
    stopped: str
    model_calls: int
    tokens: int  # paid: prompt + completion tokens of every model call of the run (all stages, searches, captures)
    cost: float
    wall_s: float
    tokens_measured: int = 0  # of the wheel run's own iterations: what its report shows
    milestones: list[Milestone] = field(default_factory=list)
    minimise: str = "prompt_tokens"
    lap_wall_s: dict[int, float] = field(default_factory=dict)
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [o.to_dict() for o in self.stages]
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))


@dataclass
class _Spent:
    model_calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    candidates: int = 0
    started: float = field(default_factory=time.perf_counter)


class KeptIncumbent(BaseModel):
    """The incumbent after a stage, as the resume state keeps it (its prompt by id)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), ser_json_inf_nan="constants")

    model_ref: str = Field(description="The incumbent's model reference.")
    prompt_id: str = Field(description="Its prompt (a `prompts` row).")
    iteration_id: str = Field(description="Its valid iteration.")
    score: float = Field(description="Its valid objective score.")
    cost: dict[str, Any] | None = Field(default=None, description="Its cost per item (`CostPerItem.to_dict`).")

    @classmethod
    def of(cls, incumbent: Incumbent) -> "KeptIncumbent":
        return cls(model_ref=incumbent.model_ref, prompt_id=incumbent.prompt.id, iteration_id=incumbent.iteration_id,
                   score=incumbent.score, cost=incumbent.cost.to_dict())

    def restore(self, store: Store) -> Incumbent:
        """The `Incumbent` again, its prompt read back from the store."""
        return Incumbent(self.model_ref, Prompt.from_json(store.get_prompt(self.prompt_id)), self.iteration_id,
                         self.score, CostPerItem.from_dict(self.cost))


class StageRecord(BaseModel):
    """One finished stage of a wheel run: its outcome and the incumbent after it."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    outcome: StageOutcome = Field(description="What the stage decided.")
    incumbent: KeptIncumbent = Field(description="The incumbent once the stage was done.")


class WheelState(BaseModel):
    """A wheel run's summary (`runs.summary_json`): what `flywheel run --resume` continues from
    and, once the run finished, its result.

        state = store.run_state(run_id, WheelState)
        state.stages[0].outcome.decision, state.finished
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    run_spec: str | None = Field(default=None, description="The run spec's path (`--resume` reloads it).")
    stages: list[StageRecord] = Field(default_factory=list, description="Finished stages, in the order they ran.")
    elapsed_s: float = Field(default=0.0, description="Wall time spent so far, over every resume.")
    result: dict[str, Any] | None = Field(
        default=None, description="The finished run's `WheelResult.to_dict()` (what `flywheel run --json` prints).")
    live: WheelEvent | None = Field(
        default=None, description="The latest event of a run in progress (the review app's in-progress panel); "
        "None once the run finished.")
    live_at: str | None = Field(default=None, description="When `live` was written (ISO time).")

    @model_validator(mode="before")
    @classmethod
    def _finished_the_old_way(cls, data: Any) -> Any:
        # Before WheelState, a finished run's result was merged into the state, its outcomes
        # replacing the stage records under `stages`: read it as a result (the records are gone).
        if isinstance(data, dict) and "result" not in data and "baseline_valid" in data:
            return {"run_spec": data.get("run_spec"), "elapsed_s": data.get("elapsed_s") or 0.0, "stages": [],
                    "result": {k: v for k, v in data.items() if k not in ("run_spec", "elapsed_s")}}
        return data

    @property
    def finished(self) -> bool:
        return self.result is not None


class Wheel:
    """One `flywheel run`: what stages may use (the `WheelContext`), the budget and the promotion rule."""

    def __init__(self, run_spec: RunSpec, spec: EvalSpec, dataset: Dataset, store: Store, run_id: str,
                 state: WheelState, on_event: EventFn | None = None):
        self.run_spec, self.spec, self.store, self.run_id, self.state = run_spec, spec, store, run_id, state
        self._on_event = on_event or (lambda event: None)
        self._live = Throttle(LIVE_EVERY_S)
        self.dataset = dataset  # parsed once per run; every stage reads this one
        self.grader_set = GraderSet(spec.graders)
        self.base_dir = run_spec.base_dir
        self.goal = run_spec.goal.rule() if run_spec.goal else None
        self.minimise = run_spec.goal.minimise if run_spec.goal else "prompt_tokens"
        self.lap = 1
        self.spent = _Spent()
        self.spent.started -= state.elapsed_s
        # Where the run is, for its events: the stage running, its place in the plan, the stage walls so far.
        self.stage, self.position, self.positions = "baseline", 0, len(_plan(run_spec))
        self.stage_started = time.perf_counter()
        self.stage_walls: list[float] = [r.outcome.wall_s for r in state.stages if r.outcome.wall_s]
        self.incumbent: Incumbent | None = None
        # Execution only (not in any fingerprint): the run spec's executor, else the eval spec's.
        self.executor = build_executor(run_spec.executor or spec.executor)

    # -- what stages use ----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def emit(self, kind: str, **fields: Any) -> None:
        """Tell the run's consumers where it is: a `WheelEvent` of `kind` with the run's lap, stage,
        elapsed and estimated time left, and the incumbent; the latest is kept on the run row."""
        incumbent = self.incumbent
        elapsed = time.perf_counter() - self.spent.started
        event = WheelEvent(kind=kind, lap=self.lap if self.stage not in ("baseline", "test") else 0,
                           laps=self.run_spec.laps, stage=self.stage, position=self.position,
                           positions=self.positions, elapsed_s=elapsed, eta_s=self._eta(fields),
                           incumbent_score=incumbent.score if incumbent else None,
                           incumbent_cost=incumbent.cost.describe(self.minimise) if incumbent else "", **fields)
        self._on_event(event)
        if self._live.passes(event):
            self.state.live, self.state.live_at = event, now()
            self.store.save_run_state(self.run_id, self.state)

    def _eta(self, fields: dict[str, Any]) -> float | None:
        """Seconds left: the current stage by its own pace (its step's done/total) or the mean
        finished stage, plus each stage still to run at the mean finished stage (or this one's pace)."""
        in_stage = time.perf_counter() - self.stage_started
        mean = sum(self.stage_walls) / len(self.stage_walls) if self.stage_walls else None
        done, total = fields.get("done"), fields.get("total")
        if done and total:
            stage_left = in_stage * (total - done) / done
        elif mean is not None:
            stage_left = max(0.0, mean - in_stage)
        else:
            return None
        per_stage = mean if mean is not None else in_stage + stage_left
        after = max(0, self.positions - self.position - (0 if self.stage == "baseline" else 1))
        eta = stage_left + after * per_stage
        if self.run_spec.budget.wall_s is not None:
            eta = min(eta, max(0.0, self.run_spec.budget.wall_s - (time.perf_counter() - self.spent.started)))
        return eta

    def enter(self, stage: str, message: str) -> None:
        """A stage (or the baseline, or test) starts: a `stage` event."""
        self.stage, self.stage_started = stage, time.perf_counter()
        self.emit("stage", message=message)

    def training_progress(self) -> dict[str, Any]:
        """`flywheel.train.run` request options reporting each training step (with its loss) and each
        checkpoint evaluation to the run's events."""
        def on_step(step: int, total: int, loss: float | None) -> None:
            self.emit("train", step="train", done=step, total=total or None, unit="steps", loss=loss)

        def on_point(point) -> None:  # a monitor that never stops the job: it only reports
            self.emit("checkpoint", step="checkpoint", message=f"step {point.step}: {point.metric} {point.value:.4g}")
            return None

        return {"callbacks": [step_reporter(on_step)], "monitor": on_point}

    def model(self, ref: str):
        """The process's model for `ref` (flywheel.models.cached_model), with the spec's options
        when it is the same kind of model (local or remote) as the spec's."""
        same_kind = ref.startswith("local:") == self.spec.model.startswith("local:")
        return cached_model(ref, dict(self.spec.model_options) if same_kind else {})

    def count(self, model_calls: int, tokens: int = 0, cost: float = 0.0) -> None:
        self.spent.model_calls += model_calls
        self.spent.tokens += tokens
        self.spent.cost += cost

    def _evaluate(self, spec: EvalSpec, stage: str, model_ref: str, prompt: Prompt, split: str,
                  items: Sequence[Item], parent: str | None) -> tuple[str, float]:
        model = self.model(model_ref)
        self.store.save_prompt(prompt, origin=stage)
        match = dict(stage=stage, split=split, prompt_id=prompt.id, model_fingerprint=model.fingerprint)
        found = self.store.find_iteration(self.run_id, **match)
        iteration_id = found.id if found else self.store.iteration_for(
            self.run_id, self.store.next_seq(self.run_id), model_ref=model_ref, parent_id=parent, lap=self.lap,
            **match)
        def progress(done: int, total: int) -> None:
            self.emit("evaluate", step=f"evaluate {split}", done=done, total=total, unit="items")

        outcome = evaluate(spec, self.store, iteration_id, items, model, prompt, self.grader_set,
                           executor=self.executor, progress=progress)
        release_memory()  # the running batch's caches are freed: hand the pages back between phases
        if outcome.model_calls:
            summary = outcome.summary
            self.count(outcome.model_calls, summary.prompt_tokens + summary.completion_tokens, summary.cost or 0.0)
        return iteration_id, outcome.objective

    def measure(self, stage: str, model_ref: str, prompt: Prompt, split: str, parent: str | None) -> tuple[str, float]:
        """Evaluate (model, prompt) on a split as an iteration of the wheel run; (iteration id, score)."""
        return self._evaluate(self.spec, stage, model_ref, prompt, split, self.dataset.split(split), parent)

    def sample(self, stage: str, model_ref: str, prompt: Prompt, items: Sequence[Item], *, repeats: int,
               temperature: float, max_tokens: int | None = None) -> str:
        """Sample `repeats` graded outputs per item at a temperature (e.g. RFT's reward probe); the iteration id."""
        sampling = self.spec.sampling.model_copy(update={
            "repeats": repeats, "temperature": temperature, "max_tokens": max_tokens or self.spec.sampling.max_tokens})
        spec = self.spec.model_copy(update={"sampling": sampling})
        return self._evaluate(spec, stage, model_ref, prompt, "train", items, None)[0]

    def best_tuned(self, incumbent: Incumbent) -> tuple[str, Prompt] | None:
        """The tuned model to polish and the prompt it was measured with: the incumbent when tuned,
        else this run's best tuned candidate on valid (None when the run has none)."""
        if incumbent.tuned:
            return incumbent.model_ref, incumbent.prompt
        tuned = [it for it in self.store.iterations(self.run_id)
                 if it.split == "valid" and it.model_ref and "+" in it.model_ref and it.score is not None]
        if not tuned:
            return None
        best = max(tuned, key=lambda it: (it.score, it.seq))
        return best.model_ref, Prompt.from_json(self.store.get_prompt(best.prompt_id))

    # -- the budget, the goal, the promotion rule ---------------------------------------------------
    def budget_exhausted(self) -> str | None:
        b, s = self.run_spec.budget, self.spent
        if b.iterations is not None and s.candidates >= b.iterations:
            return f"budget: {b.iterations} candidate stages"
        if b.model_calls is not None and s.model_calls >= b.model_calls:
            return f"budget: {b.model_calls} model calls"
        if b.tokens is not None and s.tokens >= b.tokens:
            return f"budget: {b.tokens} tokens"
        if b.money is not None and s.cost >= b.money:
            return f"budget: {b.money} spent"
        if b.wall_s is not None and time.perf_counter() - s.started >= b.wall_s:
            return f"budget: {b.wall_s:.0f} s wall time"
        return None

    def goal_met(self, incumbent: Incumbent) -> str | None:
        """Why the run may stop now: the score target met and, with a cost goal, its `at_most` too."""
        target, goal = self.run_spec.target, self.run_spec.goal
        score_ok = target is None or incumbent.score >= target
        if goal is None:
            return f"target {target} reached on valid ({incumbent.score:.3f})" if target is not None and score_ok else None
        if goal.at_most is None:  # a cost to minimise with no bound: the score target alone stops the run
            return f"target {target} reached on valid ({incumbent.score:.3f})" if target is not None and score_ok else None
        cost = incumbent.cost.value(goal.minimise)
        if not score_ok or math.isnan(cost) or cost > goal.at_most:
            return None
        score = f"target {target} reached on valid ({incumbent.score:.3f}) and " if target is not None else ""
        return f"{score}cost goal met ({incumbent.cost.describe(goal.minimise)} <= {goal.at_most:g})"

    def promote_or_reject(self, outcome: StageOutcome, incumbent: Incumbent) -> tuple[Incumbent, StageOutcome]:
        """Measure the outcome's candidate on valid, pair it with the incumbent, apply the rule."""
        candidate = outcome.proposal
        assert candidate is not None
        iteration_id, score = self.measure(outcome.stage, candidate.model_ref, candidate.prompt, "valid",
                                           incumbent.iteration_id)
        cost = self.store.iteration_cost(iteration_id)
        cmp = paired_comparison(self.store, self.spec, incumbent.iteration_id, iteration_id)
        verdict = decide(cmp, metric=self.spec.objective.metric, alpha=self.run_spec.alpha, goal=self.goal,
                         candidate_cost=cost, incumbent_cost=incumbent.cost)
        decision = "promoted" if verdict.promoted else "rejected"
        reason = f"{candidate.detail}; {verdict.reason}"
        self.store.update_iteration(iteration_id, decision=decision, reason=reason)
        done = StageOutcome(outcome.stage, decision, reason, lap=outcome.lap,
                            candidate=f"{candidate.model_ref} · {candidate.prompt.id}", valid=score,
                            iteration_id=iteration_id, cost=cost.to_dict(), rule=verdict.rule,
                            search_run=outcome.search_run)
        if verdict.promoted:
            return Incumbent(candidate.model_ref, candidate.prompt, iteration_id, score, cost), done
        return incumbent, done

    def close(self) -> None:
        self.grader_set.close()
        if self.executor is not None:
            self.executor.close()


def _plan(run_spec: RunSpec) -> list[tuple[int, int]]:
    """(lap, stage index) in the order they run."""
    return [(lap, index) for lap in range(1, run_spec.laps + 1)
            for index, stage in enumerate(run_spec.stages) if stage.runs_in(lap)]


def run_wheel(run_spec: RunSpec, store: Store, *, run_id: str | None = None, resume: str | None = None,
              report_dir: str | None = None, command: str | None = None,
              on_event: EventFn | None = None) -> WheelResult:
    """Turn the wheel (see the module docstring); returns the milestones, the test comparison and the report.

    `on_event` sees every `flywheel.events.WheelEvent` of the run: the lines it logs, each stage's
    start and end, items evaluated, training steps with their loss, checkpoint evaluations.

    `run_id`: the run's id, chosen by the caller (the API stores it on its object first); a run
    with that id that is still `running` is resumed. `resume`: an unfinished run named by the user
    (its id or a unique suffix). A finished run is never re-entered."""
    def log(message: str) -> None:
        if on_event is not None:
            on_event(WheelEvent(kind="log", message=message))

    spec = load_eval_spec(run_spec.eval_path)
    if any(s.stage == "optimize" and s.optimize is None for s in run_spec.stages):
        spec.optimize_config()  # the eval's `optimize:` block is used: a mistake in it fails now, not at its lap
    dataset = load_dataset(spec)
    if not dataset.split("valid"):
        raise FlywheelError(f"{spec.source}: the wheel selects on `valid`; {dataset.path} has no valid items")
    if resume:
        run_id = store.get_run(resume).id
    run = store.find_run(run_id) if run_id else None
    if run is not None:
        if run.kind != "wheel":
            raise FlywheelError(f"{run.id} is a {run.kind} run, not a `flywheel run`")
        if run.status != "running":
            raise FlywheelError(f"{run.id} already finished ({run.status}): there is nothing to resume; "
                                "start a new run with `flywheel run SPEC`")
        state = store.run_state(run.id, WheelState)
        log(f"resuming {run.id}")
    elif resume:
        raise FlywheelError(f"{resume}: no such wheel run")
    eval_id = register_eval(store, spec, dataset)
    if run is None:
        run_id = store.create_run(id=run_id, kind="wheel", config_key=json.dumps(run_spec.model_dump(mode="json")),
                                  eval_id=eval_id, dataset_id=dataset.content_hash, model_ref=spec.model,
                                  split="valid", command=command or f"flywheel run {run_spec.source}")
        state = WheelState(run_spec=run_spec.source)
        store.save_run_state(run_id, state)
    assert run_id is not None
    wheel = Wheel(run_spec, spec, dataset, store, run_id, state, on_event)
    outcomes: list[StageOutcome] = []
    try:
        wheel.enter("baseline", f"baseline: {spec.model} on valid")
        base_prompt = Prompt(messages=spec.messages())
        base_iteration, base_score = wheel.measure("baseline", spec.model, base_prompt, "valid", None)
        store.update_iteration(base_iteration, decision="incumbent", reason="the eval's own model and prompt")
        incumbent = Incumbent(spec.model, base_prompt, base_iteration, base_score, store.iteration_cost(base_iteration))
        wheel.incumbent = incumbent
        wheel.emit("stage_done", message=f"baseline valid {base_score:.3f}, {incumbent.cost.describe(wheel.minimise)}")
        stopped, without_gain = f"{run_spec.laps} lap(s) ran", 0
        for position, (lap, index) in enumerate(_plan(run_spec)):
            wheel.lap, wheel.position, wheel.incumbent = lap, position, incumbent
            stage_spec = run_spec.stages[index]
            if (why := wheel.goal_met(incumbent)) or (why := wheel.budget_exhausted()):
                stopped = why
                break
            done = state.stages[position] if position < len(state.stages) else None
            if done:
                outcome, incumbent = done.outcome, done.incumbent.restore(store)
                wheel.stage = stage_spec.stage
                wheel.emit("stage_done", message=f"lap {lap} stage {index + 1} {stage_spec.stage}: done before "
                           f"({outcome.decision})")
            else:
                wheel.enter(stage_spec.stage, f"lap {lap} stage {index + 1}/{len(run_spec.stages)} {stage_spec.stage} "
                            f"(incumbent valid {incumbent.score:.3f}, {incumbent.cost.describe(wheel.minimise)})")
                started = time.perf_counter()
                try:
                    outcome = build_stage(stage_spec).run(wheel, incumbent)
                    if outcome.proposal is not None:
                        incumbent, outcome = wheel.promote_or_reject(outcome, incumbent)
                except FlywheelError as exc:  # e.g. no DPO pairs: the stage brings nothing, the wheel goes on
                    outcome = StageOutcome(stage_spec.stage, "failed", str(exc).splitlines()[0], lap=lap)
                outcome.wall_s = time.perf_counter() - started
                release_memory()
                state.stages.append(StageRecord(outcome=replace(outcome, proposal=None),
                                                incumbent=KeptIncumbent.of(incumbent)))
                state.elapsed_s = time.perf_counter() - wheel.spent.started
                store.save_run_state(run_id, state)
                wheel.stage_walls.append(outcome.wall_s)
                wheel.position, wheel.incumbent = position + 1, incumbent
                wheel.emit("stage_done", message=f"lap {lap} stage {index + 1}/{len(run_spec.stages)} "
                           f"{stage_spec.stage} -> {outcome.decision} in {outcome.wall_s:.0f} s: {outcome.reason}")
            outcomes.append(outcome)
            if outcome.stage != "capture":
                wheel.spent.candidates += 1
                without_gain = 0 if outcome.decision == "promoted" else without_gain + 1
                if without_gain >= run_spec.plateau:
                    stopped = f"plateau: {without_gain} stage(s) in a row without a promotion"
                    break
        else:
            if (why := wheel.goal_met(incumbent)):
                stopped = why
            else:
                stopped += _unmet(run_spec, incumbent)

        wheel.position, wheel.incumbent = wheel.positions, incumbent
        if dataset.split("test"):
            wheel.enter("test", f"stopped ({stopped}); measuring test")
        test = _measure_test(wheel, spec, dataset, base_prompt, base_iteration, incumbent)
        milestones = _milestones(wheel, spec, base_iteration, incumbent, test)
    except BaseException:
        state.elapsed_s = time.perf_counter() - wheel.spent.started
        store.save_run_state(run_id, state)
        raise
    finally:
        wheel.close()

    laps: dict[int, float] = {}
    for o in outcomes:
        laps[o.lap] = laps.get(o.lap, 0.0) + o.wall_s
    result = WheelResult(
        run_id=run_id, baseline_valid=base_score, winner_valid=incumbent.score, winner_model=incumbent.model_ref,
        winner_prompt_id=incumbent.prompt.id, test=test, stages=outcomes, stopped=stopped,
        model_calls=wheel.spent.model_calls, tokens=wheel.spent.tokens, cost=wheel.spent.cost,
        wall_s=time.perf_counter() - wheel.spent.started, milestones=milestones, minimise=wheel.minimise,
        lap_wall_s=laps, tokens_measured=store.measured_tokens(run_id))
    state.elapsed_s, state.result, state.live, state.live_at = result.wall_s, result.to_dict(), None, None
    store.finish_run(run_id, "completed", state)
    if on_event is not None:
        on_event(WheelEvent(kind="finished", message=f"stopped: {stopped}", elapsed_s=result.wall_s, eta_s=0.0,
                            stage="finished", position=wheel.positions, positions=wheel.positions,
                            laps=run_spec.laps, incumbent_score=incumbent.score,
                            incumbent_cost=incumbent.cost.describe(wheel.minimise)))
    if run_spec.report:
        from flywheel.report.html import write_report

        folder = Path(report_dir) if report_dir else store.artefact_dir / "reports"
        folder.mkdir(parents=True, exist_ok=True)
        result.report_path = write_report(store, [run_id], folder / f"{run_id}.html").path
        state.result = result.to_dict()
        store.save_run_state(run_id, state)
    return result


def _unmet(run_spec: RunSpec, incumbent: Incumbent) -> str:
    """What the laps did not reach: `; target 0.9 not met on valid (0.812)` (empty without a target or goal)."""
    parts = []
    if run_spec.target is not None and incumbent.score < run_spec.target:
        parts.append(f"target {run_spec.target} not met on valid ({incumbent.score:.3f})")
    goal = run_spec.goal
    if goal is not None and goal.at_most is not None:
        cost = incumbent.cost.value(goal.minimise)
        if math.isnan(cost) or cost > goal.at_most:
            parts.append(f"cost goal not met ({incumbent.cost.describe(goal.minimise)} > {goal.at_most:g})")
    return "; " + ", ".join(parts) if parts else ""


def _measure_test(wheel: Wheel, spec: EvalSpec, dataset, base_prompt: Prompt, base_iteration: str,
                  incumbent: Incumbent) -> dict[str, Any]:
    """Test, only now, for the baseline and every promoted iteration."""
    if not dataset.split("test"):
        return {}
    store = wheel.store
    promoted = [row for row in store.iterations(wheel.run_id) if row.decision == "promoted" and row.split == "valid"]
    base_test, base_test_score = wheel.measure("test-report", spec.model, base_prompt, "test", base_iteration)
    store.update_iteration(base_test, decision="reported", reason="baseline on test")
    test: dict[str, Any] = {"baseline": base_test_score, "iterations": {}, "test_iterations": {base_iteration: base_test}}
    winner_test = base_test
    for row in promoted:
        prompt = Prompt.from_json(store.get_prompt(row.prompt_id))
        tid, tscore = wheel.measure("test-report", row.model_ref, prompt, "test", row.id)
        store.update_iteration(tid, decision="reported", reason=f"promoted {row.stage} on test")
        test["iterations"][row.id] = tscore
        test["test_iterations"][row.id] = tid
        if row.id == incumbent.iteration_id:
            winner_test = tid
    test["winner"] = test["iterations"].get(incumbent.iteration_id, base_test_score)
    test["comparison"] = paired_comparison(store, spec, base_test, winner_test)
    return test


def _milestones(wheel: Wheel, spec: EvalSpec, base_iteration: str, incumbent: Incumbent,
                test: dict[str, Any]) -> list[Milestone]:
    """Baseline, best prompt (the best promoted prompt on the eval's own model) and final model,
    each with valid and test scores and cost per item (on test when measured, else on valid)."""
    store = wheel.store
    rows = {row.id: row for row in store.iterations(wheel.run_id)}

    def milestone(label: str, iteration_id: str) -> Milestone:
        row = rows[iteration_id]
        test_iteration = test.get("test_iterations", {}).get(iteration_id)
        cost = store.iteration_cost(test_iteration or iteration_id)
        score = test.get("baseline") if iteration_id == base_iteration else test.get("iterations", {}).get(iteration_id)
        return Milestone(label, row.model_ref, row.prompt_id, iteration_id, row.score, score, cost.to_dict())

    out = [milestone("baseline", base_iteration)]
    prompts = [row for row in rows.values() if row.decision == "promoted" and row.split == "valid"
               and row.model_ref == spec.model and row.prompt_id != rows[base_iteration].prompt_id]
    if prompts:
        best = max(prompts, key=lambda row: (row.score, row.seq))
        if best.id != incumbent.iteration_id:
            out.append(milestone("best prompt", best.id))
    if incumbent.iteration_id != base_iteration:
        out.append(milestone("final model" if incumbent.tuned else "final prompt", incumbent.iteration_id))
    return out


def run(spec: str | Path | RunSpec, *, db: str | None = None, **options: Any) -> WheelResult:
    """The Python API of `flywheel run`: `flywheel.run("evals/banking77/run.yaml")`."""
    run_spec = spec if isinstance(spec, RunSpec) else load_run_spec(spec)
    store = Store.open(db)
    try:
        return run_wheel(run_spec, store, **options)
    finally:
        store.close()
