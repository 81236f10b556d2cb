"""The wheel: `flywheel run` turns stages toward a target score, promoting only real gains.

    result = run_wheel(load_run_spec("evals/banking77/run.yaml"), store)
    result.winner, result.test, result.report_path

The incumbent is a (model, prompt) pair, first the eval's own. Each stage proposes a candidate:
`optimize` a better prompt for the incumbent model; `capture` no candidate but training data
(teacher outputs on train, graded); `sft` / `dpo` / `rft` a LoRA checkpoint trained from the
incumbent model. Every candidate is evaluated on `valid` in this run (the completion cache makes
that free when the stage already measured it) and promoted only when it beats the incumbent by a
paired test. The wheel stops at the target (on valid), at a budget, or after `plateau` candidate
stages in a row without a significant gain. `test` is measured only for the baseline and the
promoted iterations, after the wheel has stopped.

Resume: `flywheel run --resume RUN` re-enters the same run; finished stages are read back from
their iterations (nothing is retrained), evaluations skip stored samples, and the completion
cache answers every model call already paid for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.data import load_dataset
from flywheel.errors import FlywheelError
from flywheel.harness import GraderSet, paired_comparison, evaluate, register_eval
from flywheel.models import load_model
from flywheel.prompt import Prompt
from flywheel.spec import (CaptureStage, EvalSpec, OptimizeStage, RunSpec, TrainStage, load_eval_spec,
                           load_run_spec)
from flywheel.stats import significant_gain
from flywheel.store import Store

LogFn = Callable[[str], None]


@dataclass
class Incumbent:
    model_ref: str
    prompt: Prompt
    iteration_id: str
    score: float


@dataclass
class StageOutcome:
    stage: str
    candidate: str | None  # what was tried: a model ref and prompt, or None (capture)
    valid: float | None
    decision: str
    reason: str
    iteration_id: str | None = None


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
    tokens: int
    cost: float
    wall_s: float
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str).replace("NaN", "null"))


@dataclass
class _Spent:
    model_calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    candidates: int = 0
    started: float = field(default_factory=time.perf_counter)


class Wheel:
    """One `flywheel run`: the run row, the incumbent, the budget and the stages."""

    def __init__(self, run_spec: RunSpec, spec: EvalSpec, store: Store, run_id: str, log: LogFn,
                 elapsed_before: float = 0.0):
        self.run_spec, self.spec, self.store, self.run_id, self.log = run_spec, spec, store, run_id, log
        self.dataset = load_dataset(spec)
        self.grader_set = GraderSet(spec.graders)
        self.spent = _Spent()
        self.spent.started -= elapsed_before
        self.models: dict[str, Any] = {}

    # -- evaluation inside the wheel run ----------------------------------------------------------
    def model(self, ref: str):
        if ref not in self.models:
            options = dict(self.spec.model_options) if ref.startswith("local:") == self.spec.model.startswith("local:") else {}
            self.models[ref] = load_model(ref, options)
        return self.models[ref]

    def measure(self, stage: str, model_ref: str, prompt: Prompt, split: str, parent: str | None) -> tuple[str, float]:
        """Evaluate (model, prompt) on a split as an iteration of the wheel run; (iteration id, score)."""
        model = self.model(model_ref)
        self.store.save_prompt(prompt, origin=stage)
        match = dict(stage=stage, split=split, prompt_id=prompt.id, model_fingerprint=model.fingerprint)
        found = self.store.find_iteration(self.run_id, **match)
        iteration_id = found["id"] if found else self.store.iteration_for(
            self.run_id, self.store.next_seq(self.run_id), model_ref=model_ref, parent_id=parent, **match)
        items = self.dataset.split(split)
        outcome = evaluate(self.spec, self.store, iteration_id, items, model, prompt, self.grader_set)
        self._count(outcome.model_calls, outcome.summary if outcome.model_calls else None)
        return iteration_id, outcome.objective

    def _count(self, calls: int, summary: dict[str, Any] | None) -> None:
        self.spent.model_calls += calls
        if summary:
            self.spent.tokens += summary["prompt_tokens"] + summary["completion_tokens"]
            self.spent.cost += summary.get("cost") or 0.0

    def compare(self, a: str, b: str) -> dict[str, Any]:
        return paired_comparison(self.store, self.spec, a, b)

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

    # -- stages -----------------------------------------------------------------------------------
    def promote_or_reject(self, stage: str, incumbent: Incumbent, model_ref: str, prompt: Prompt,
                          detail: str) -> tuple[Incumbent, StageOutcome]:
        iteration_id, score = self.measure(stage, model_ref, prompt, "valid", incumbent.iteration_id)
        cmp = self.compare(incumbent.iteration_id, iteration_id)
        stats = (f"valid {score:.3f} vs {incumbent.score:.3f}: diff {cmp['diff']:+.3f} "
                 f"[{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}], McNemar p={cmp['p_mcnemar']:.3g}")
        promoted = significant_gain(cmp, self.spec.objective.metric, self.run_spec.alpha)
        decision = "promoted" if promoted else "rejected"
        reason = f"{detail}; {stats}" + ("" if promoted else "; not a significant gain")
        self.store.update_iteration(iteration_id, decision=decision, reason=reason)
        outcome = StageOutcome(stage, f"{model_ref} · {prompt.id}", score, decision, reason, iteration_id)
        if promoted:
            return Incumbent(model_ref, prompt, iteration_id, score), outcome
        return incumbent, outcome

    def run_optimize(self, stage: OptimizeStage, incumbent: Incumbent) -> tuple[Incumbent, StageOutcome]:
        from flywheel.optimize import optimize_prompt

        spec = self.spec.model_copy(update={"model": incumbent.model_ref,
                                            "input": [_message(m) for m in incumbent.prompt.messages]})
        result = optimize_prompt(spec, self.store, model=self.model(incumbent.model_ref),
                                 config=stage.optimize or self.spec.optimize, log=lambda m: self.log(f"  {m}"))
        self._count(result.model_calls, {"prompt_tokens": result.tokens, "completion_tokens": 0})
        winner = result.winner.prompt
        if winner.id == incumbent.prompt.id:
            return incumbent, StageOutcome("optimize", None, incumbent.score, "no candidate",
                                           f"search {result.run_id}: {result.reason}")
        return self.promote_or_reject("optimize", incumbent, incumbent.model_ref, winner,
                                      f"search {result.run_id} winner {result.winner.origin}")

    def run_capture(self, stage: CaptureStage, incumbent: Incumbent) -> StageOutcome:
        from flywheel.capture import capture

        self.store.save_prompt(incumbent.prompt, origin="incumbent")
        # `incumbent`: the best model so far samples its own outputs (best-of-K gives DPO its pairs).
        teacher = incumbent.model_ref if stage.teacher == "incumbent" else stage.teacher
        result = capture(self.spec, self.store, teacher, n=stage.n, temperature=stage.temperature,
                         limit=stage.limit, prompt=incumbent.prompt.id)
        self._count(result.model_calls, None)
        reason = (f"capture {result.id}: {result.n_passed}/{result.n_samples} samples pass, "
                  f"{result.items_with_pass}/{result.n_items} train items covered by {teacher}")
        return StageOutcome("capture", None, None, "captured", reason)

    def run_train(self, stage: TrainStage, incumbent: Incumbent) -> tuple[Incumbent, StageOutcome]:
        from flywheel.train import build_dpo_set, build_rft_set, build_sft_set, load_train_config
        from flywheel.train.dpo import train_dpo
        from flywheel.train.grpo import train_grpo
        from flywheel.train.sft import train_sft

        # Checkpoints are trained and evaluated with the eval's own prompt: a tuned model should
        # not need the few-shot context a base model was given.
        prompt = Prompt(messages=self.spec.messages())
        overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in stage.config.items()]
        config = load_train_config(stage.stage, overrides=overrides)
        if stage.stage == "sft":
            training_set = build_sft_set(self.spec, self.store, min_score=stage.min_score, prompt=prompt)
            trainer = train_sft
        elif stage.stage == "dpo":
            training_set = build_dpo_set(self.spec, self.store, min_margin=stage.min_margin, prompt=prompt)
            trainer = train_dpo
        else:
            training_set = build_rft_set(self.spec)
            trainer = train_grpo
        self.log(f"  {stage.stage}: {len(training_set)} rows from {incumbent.model_ref}")
        done = self.store.db.execute(
            "select id, model_ref, metrics_json from checkpoints where method = ? and training_set_hash = ?"
            " and config_json = ? and base_model = ? order by created_at desc limit 1",
            [stage.stage, training_set.content_hash, json.dumps(config.model_dump()), _base_of(incumbent.model_ref)],
        ).fetchone()
        if done:  # trained before a kill: never train twice
            checkpoint_id, model_ref, metrics = done[0], done[1], json.loads(done[2] or "{}")
            self.log(f"  reusing {checkpoint_id}, trained before")
        else:
            result = trainer(self.spec, self.store, training_set, base=incumbent.model_ref, config=config,
                             evaluate=False, quiet=True)
            checkpoint_id, model_ref, metrics = result.checkpoint.id, result.checkpoint.model_ref, result.metrics
        detail = (f"checkpoint {checkpoint_id} ({len(training_set)} rows, "
                  f"loss {metrics.get('first_loss')} -> {metrics.get('last_loss')})")
        return self.promote_or_reject(stage.stage, incumbent, model_ref, prompt, detail)

    def close(self) -> None:
        self.grader_set.close()
        for model in self.models.values():
            model.close()


def _base_of(model_ref: str) -> str:
    return model_ref.split("+", 1)[0]


def _message(m: dict[str, str]):
    from flywheel.spec import MessageSpec

    return MessageSpec(role=m["role"], content=m["content"])


def _state(store: Store, run_id: str) -> dict[str, Any]:
    return json.loads(store.get_run(run_id).get("summary_json") or "{}")


def _save_state(store: Store, run_id: str, state: dict[str, Any]) -> None:
    """The wheel's progress (finished stages, incumbent) on its run row: what resume reads."""
    with store.db.conn:
        store.db["runs"].update(run_id, {"summary_json": json.dumps(state, default=str)})


def run_wheel(run_spec: RunSpec, store: Store, *, resume: str | None = None, report_dir: str | None = None,
              command: str | None = None, log: LogFn | None = None) -> WheelResult:
    """Turn the wheel (see the module docstring); returns the winner, its test score and the report."""
    log = log or (lambda message: None)
    spec = load_eval_spec(run_spec.eval_path)
    dataset = load_dataset(spec)
    if not dataset.split("valid"):
        raise FlywheelError(f"{spec.source}: the wheel selects on `valid`; {dataset.path} has no valid items")
    eval_id = register_eval(store, spec, dataset)
    elapsed_before = 0.0
    if resume:
        run = store.get_run(resume)
        if run["kind"] != "wheel":
            raise FlywheelError(f"{run['id']} is a {run['kind']} run, not a `flywheel run`")
        run_id = run["id"]
        elapsed_before = _state(store, run_id).get("elapsed_s", 0.0)
        store.db["runs"].update(run_id, {"status": "running"})
        log(f"resuming {run_id}")
    else:
        run_id = store.create_run(kind="wheel", config_key=json.dumps(run_spec.model_dump(mode="json")),
                                  eval_id=eval_id, dataset_id=dataset.content_hash, model_ref=spec.model,
                                  split="valid", command=command or f"flywheel run {run_spec.source}")
        _save_state(store, run_id, {"run_spec": run_spec.source, "stages": []})
    wheel = Wheel(run_spec, spec, store, run_id, log, elapsed_before)
    outcomes: list[StageOutcome] = []
    try:
        log(f"baseline: {spec.model} on valid")
        base_prompt = Prompt(messages=spec.messages())
        base_iteration, base_score = wheel.measure("baseline", spec.model, base_prompt, "valid", None)
        store.update_iteration(base_iteration, decision="incumbent", reason="the eval's own model and prompt")
        incumbent = Incumbent(spec.model, base_prompt, base_iteration, base_score)
        log(f"baseline valid {base_score:.3f}")
        stopped, without_gain = "all stages ran", 0
        for index, stage in enumerate(run_spec.stages):
            if run_spec.target is not None and incumbent.score >= run_spec.target:
                stopped = f"target {run_spec.target} reached on valid ({incumbent.score:.3f})"
                break
            if (why := wheel.budget_exhausted()):
                stopped = why
                break
            state = _state(store, run_id)
            done = state["stages"][index] if index < len(state.get("stages", [])) else None
            if done:
                outcome = StageOutcome(**done["outcome"])
                kept = done["incumbent"]
                incumbent = Incumbent(kept["model_ref"], Prompt.from_json(store.get_prompt(kept["prompt_id"])),
                                      kept["iteration_id"], kept["score"])
                log(f"stage {index + 1} {stage.stage}: done before ({outcome.decision})")
            else:
                log(f"stage {index + 1}/{len(run_spec.stages)} {stage.stage} (incumbent valid {incumbent.score:.3f})")
                try:
                    if isinstance(stage, CaptureStage):
                        outcome = wheel.run_capture(stage, incumbent)
                    elif isinstance(stage, OptimizeStage):
                        incumbent, outcome = wheel.run_optimize(stage, incumbent)
                    else:
                        incumbent, outcome = wheel.run_train(stage, incumbent)
                except FlywheelError as exc:  # e.g. no DPO pairs: the stage brings nothing, the wheel goes on
                    outcome = StageOutcome(stage.stage, None, None, "failed", str(exc).splitlines()[0])
                state["stages"].append({"outcome": asdict(outcome), "incumbent": {
                    "model_ref": incumbent.model_ref, "prompt_id": incumbent.prompt.id,
                    "iteration_id": incumbent.iteration_id, "score": incumbent.score}})
                state["elapsed_s"] = time.perf_counter() - wheel.spent.started
                _save_state(store, run_id, state)
                log(f"  -> {outcome.decision}: {outcome.reason}")
            outcomes.append(outcome)
            if outcome.stage != "capture":
                wheel.spent.candidates += 1
                without_gain = 0 if outcome.decision == "promoted" else without_gain + 1
                if without_gain >= run_spec.plateau:
                    stopped = f"plateau: {without_gain} stage(s) without a significant gain"
                    break
        else:
            if run_spec.target is not None and incumbent.score >= run_spec.target:
                stopped = f"target {run_spec.target} reached on valid ({incumbent.score:.3f})"

        # Test, only now, for the baseline and every promoted iteration.
        test: dict[str, Any] = {}
        if dataset.split("test"):
            promoted = [row for row in store.iterations(run_id) if row["decision"] == "promoted" and row["split"] == "valid"]
            base_test, base_test_score = wheel.measure("test-report", spec.model, base_prompt, "test", base_iteration)
            store.update_iteration(base_test, decision="reported", reason="baseline on test")
            test = {"baseline": base_test_score, "iterations": {}}
            winner_test = base_test
            for row in promoted:
                prompt = Prompt.from_json(store.get_prompt(row["prompt_id"]))
                tid, tscore = wheel.measure("test-report", row["model_ref"], prompt, "test", row["id"])
                store.update_iteration(tid, decision="reported", reason=f"promoted {row['stage']} on test")
                test["iterations"][row["id"]] = tscore
                if row["id"] == incumbent.iteration_id:
                    winner_test = tid
            test["winner"] = test["iterations"].get(incumbent.iteration_id, base_test_score)
            test["comparison"] = wheel.compare(base_test, winner_test)
    except BaseException:
        state = _state(store, run_id)
        state["elapsed_s"] = time.perf_counter() - wheel.spent.started
        _save_state(store, run_id, state)
        raise
    finally:
        wheel.close()

    result = WheelResult(
        run_id=run_id, baseline_valid=base_score, winner_valid=incumbent.score, winner_model=incumbent.model_ref,
        winner_prompt_id=incumbent.prompt.id, test=test, stages=outcomes, stopped=stopped,
        model_calls=wheel.spent.model_calls, tokens=wheel.spent.tokens, cost=wheel.spent.cost,
        wall_s=time.perf_counter() - wheel.spent.started)
    state = _state(store, run_id)
    store.finish_run(run_id, "completed", {**state, **result.to_dict(), "elapsed_s": result.wall_s})
    if run_spec.report:
        from flywheel.report.html import write_report

        folder = Path(report_dir or Path(store.path).resolve().parent / ".flywheel" / "reports")
        folder.mkdir(parents=True, exist_ok=True)
        result.report_path = write_report(store, [run_id], folder / f"{run_id}.html").path
        _save_state(store, run_id, {**state, **result.to_dict(), "elapsed_s": result.wall_s})
    return result


def run(spec: str | Path | RunSpec, *, db: str | None = None, **options: Any) -> WheelResult:
    """The Python API of `flywheel run`: `flywheel.run("evals/banking77/run.yaml")`."""
    run_spec = spec if isinstance(spec, RunSpec) else load_run_spec(spec)
    store = Store.open(db)
    try:
        return run_wheel(run_spec, store, **options)
    finally:
        store.close()
