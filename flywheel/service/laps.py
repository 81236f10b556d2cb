"""A lap: the new traffic -> a training set -> `flywheel.train.run` -> the offline gate -> `candidate`.

    lap = queue_lap(store, spec, trigger="new_captures")   # a row + a `service_lap` job, or None
    run_lap(store, spec, lap.id)                          # what the job's runner calls

A lap's captures are fixed when it is queued (an id range), so a lap resumed after kill -9 reads
the same captures, and the next lap starts after them: none lost, none counted twice. Steps:

1. the captures `production` answered (status 200) in the range, matching the trigger's metadata;
   captures deleted since are gone from the store, so nothing trains on them; with `redact` on
   the proxy stored them redacted; with `lap.history`, the newest earlier captures join the
   training set, and their held-back ones the gate (when the current production answered them);
2. labels: production's recorded answer, or a teacher's majority over `votes` samples
   (self-consistency, `flywheel.distill.vote`); inputs that render like a valid/test item of the
   eval are dropped (the leak guard, `flywheel.distill.leaked`); a `holdout` share is kept back;
3. `flywheel.train.run` on the rest (`reuse`: a lap resumed after its training finished does not
   train again; an unfinished training job is picked up where it stopped);
4. the offline gate with the run spec's rule (`flywheel.promotion.decide`): the student against
   production on the eval's valid split and on the held-back traffic, paired item by item;
5. passing both, the student becomes `candidate` (a recorded switch naming the tests); the shadow
   gate decides the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from flywheel.cost import CostPerItem
from flywheel.data import load_dataset
from flywheel.distill import leaked, vote
from flywheel.errors import FlywheelError
from flywheel.harness import paired_comparison, run_eval
from flywheel.models import ChatRequest, Sampling, cached_model
from flywheel.pricing import find_price
from flywheel.promotion import Goal, decide
from flywheel.report.service_view import GATE_SIDES, gate_run_id
from flywheel.prompt import Prompt
from flywheel.run_spec import load_run_spec
from flywheel.service import aliases
from flywheel.service.shadow import OnlineGraders, current_phase
from flywheel.service.spec import ServiceSpec
from flywheel.spec import load_eval_spec
from flywheel.stats import paired_stats
from flywheel.store import Store, new_id, now, timestamp
from flywheel.store.service import AliasTarget, ServiceLap
from flywheel.train import TrainRequest, run
from flywheel.train.methods import load_train_config

LAP_JOB = "service_lap"


class LapError(FlywheelError):
    """A lap cannot run (no data left after the guards, over its budget)."""


@dataclass(frozen=True)
class Gate:
    """One offline comparison: where, the verdict and its reason."""

    where: str
    passed: bool
    reason: str


# -- triggers and budgets ----------------------------------------------------------------------
def new_captures(store: Store, spec: ServiceSpec) -> list[dict[str, Any]]:
    """Answered `production` captures after the last lap's, matching the trigger's metadata."""
    rows = store.captures_after(store.last_lapped_capture(), metadata=spec.triggers.metadata, models=["production"])
    return rows[:spec.lap.max_captures]


def due(store: Store, spec: ServiceSpec, waiting: int, *, at: datetime | None = None) -> str | None:
    """The trigger that fires at `at` (default: now), `new_captures` or `schedule`; None when none does."""
    if waiting == 0:
        return None

    phase = current_phase(store, spec)
    if phase is not None and (spec.canary.share if phase.name == "canary" else spec.shadow.share) > 0:
        # A new student would replace the candidate under test (or the previous production the canary
        # pairs with) and restart its test: under steady traffic nothing would ever be decided.
        return None
    if spec.triggers.new_captures and waiting >= spec.triggers.new_captures:
        return "new_captures"
    if spec.triggers.every_s:
        # The schedule counts from the last lap, or from the service's first switch (its first start):
        # a service just started waits `every_s` before a scheduled lap, as it would between laps.
        last = store.service_laps(limit=1)
        since = last[0].created_at if last else min((s.created_at for s in store.service_switches()), default=None)
        if since is None or datetime.fromisoformat(since) + timedelta(seconds=spec.triggers.every_s) \
                <= (at or datetime.now(timezone.utc)):
            return "schedule"
    return None


def history(store: Store, spec: ServiceSpec, before: int | None) -> list[dict[str, Any]]:
    """The `lap.history` newest matching production captures before capture id `before`: earlier
    traffic a lap trains on too (labelled as the lap labels: the teacher's vote, else the answer
    recorded when they were served)."""
    if not spec.lap.history or not before:
        return []
    rows = store.captures_after(0, upto=before - 1, metadata=spec.triggers.metadata, models=["production"])
    return rows[-spec.lap.history:]


def planned_steps(spec: ServiceSpec) -> int | None:
    steps = spec.lap.train.get("max_steps")
    return int(steps) if isinstance(steps, int) else None


def planned_calls(spec: ServiceSpec, n_captures: int, n_valid: int) -> int:
    """Model calls a lap makes: teacher votes, then both sides of the valid split and the holdout."""
    teacher = (n_captures + spec.lap.history) * spec.lap.votes if spec.lap.teacher else 0
    return teacher + 2 * n_valid + 2 * int(n_captures * spec.lap.holdout + 1)


TEACHER_MAX_TOKENS = 256  # a teacher's answer is capped at this many tokens (run_lap's sampling)


def planned_money(spec: ServiceSpec, production: AliasTarget, rows: list[dict[str, Any]], n_valid: int) -> float:
    """USD a lap over these captures spends on priced (`openai:`) models, at list prices
    (`flywheel.pricing`): the teacher's votes on every capture, and production's side of the valid
    split and the holdout when production is priced. Each call is priced at the captures' mean prompt
    tokens and the longest answer it may give."""
    known = [r["prompt_tokens"] for r in rows if r.get("prompt_tokens")]
    prompt_tokens = int(sum(known) / len(known)) if known else 0
    money = 0.0
    if spec.lap.teacher and spec.lap.teacher.startswith("openai:"):
        money += (len(rows) + spec.lap.history) * spec.lap.votes * find_price(spec.lap.teacher.split(":", 1)[1]).cost(
            prompt_tokens, TEACHER_MAX_TOKENS)
    if production.model.startswith("openai:"):
        held = int(len(rows) * spec.lap.holdout + 1)
        money += (n_valid + held) * find_price(production.model.split(":", 1)[1]).cost(prompt_tokens,
                                                                                         TEACHER_MAX_TOKENS)
    return money


def over_budget(store: Store, spec: ServiceSpec, rows: list[dict[str, Any]], n_valid: int) -> str | None:
    """Why a lap over these captures would pass a per-lap or per-day budget; None when it fits."""
    n_captures = len(rows)
    steps, calls = planned_steps(spec), planned_calls(spec, n_captures, n_valid)
    money = planned_money(spec, aliases.target(store, "production"), rows, n_valid)
    per_lap, per_day = spec.budgets.per_lap, spec.budgets.per_day
    if per_lap.training_steps and (steps is None or steps > per_lap.training_steps):
        return f"budgets.per_lap.training_steps: the lap plans {steps or 'unbounded'} steps, limit {per_lap.training_steps}"
    if per_lap.model_calls and calls > per_lap.model_calls:
        return f"budgets.per_lap.model_calls: the lap plans {calls} model calls, limit {per_lap.model_calls}"
    if per_lap.money and money > per_lap.money:
        return f"budgets.per_lap.money: the lap plans ${money:.4g} on priced models, limit ${per_lap.money:.4g}"
    since = timestamp(datetime.now(timezone.utc) - timedelta(days=1))
    today = [lap for lap in store.service_laps() if lap.created_at >= since and lap.status != "skipped"]
    if per_day.training_steps and (steps or 0) * (len(today) + 1) > per_day.training_steps:
        return f"budgets.per_day.training_steps: {len(today)} laps today; one more passes {per_day.training_steps}"
    if per_day.model_calls and calls * (len(today) + 1) > per_day.model_calls:
        return f"budgets.per_day.model_calls: {len(today)} laps today; one more passes {per_day.model_calls}"
    if per_day.money and money * (len(today) + 1) > per_day.money:
        return f"budgets.per_day.money: {len(today)} laps today; one more at ${money:.4g} passes ${per_day.money:.4g}"
    if per_day.wall_s and per_lap.wall_s and per_lap.wall_s * (len(today) + 1) > per_day.wall_s:
        return f"budgets.per_day.wall_s: {len(today)} laps of up to {per_lap.wall_s:g} s today pass {per_day.wall_s:g} s"
    return None


def queue_lap(store: Store, spec: ServiceSpec, *, trigger: str) -> ServiceLap | None:
    """Record a lap over the new captures and queue its job; a lap over budget is recorded as
    `skipped` with the reason (its captures stay for the next lap). None when nothing is new or a
    lap is already queued or running (one at a time)."""
    if any(lap.status in ("queued", "running") for lap in store.service_laps(limit=20)):
        return None
    rows = new_captures(store, spec)
    if not rows:
        return None

    n_valid = len(load_dataset(load_eval_spec(spec.path(spec.eval))).split("valid"))
    refused = over_budget(store, spec, rows, n_valid)
    lap_id = new_id("lap")
    if refused:
        lap = store.create_service_lap(lap_id, trigger=trigger, capture_ids=[])
        store.update_service_lap(lap_id, status="skipped", decision="not started", reason=refused, finished_at=now())
        return store.service_lap(lap_id)
    with store.transaction():
        lap = store.create_service_lap(lap_id, trigger=trigger, capture_ids=[r["id"] for r in rows])
        store.enqueue_job("job-" + lap_id, LAP_JOB, lap_id)
    return lap


# -- the lap -----------------------------------------------------------------------------------
def _user_turns(request: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in request.get("messages") or []
            if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]


def _reply(response: dict[str, Any]) -> str | None:
    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def _held_back(capture_id: int, share: float) -> bool:
    digest = hashlib.sha256(f"holdout:{capture_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def run_lap(store: Store, spec: ServiceSpec, lap_id: str, *, check: Callable[[], None] = lambda: None,
            event: Callable[[str], None] = lambda message: None) -> ServiceLap:
    """Run (or resume) a queued lap; returns it with its decision (see the module docstring)."""
    lap = store.service_lap(lap_id)
    if lap is None:
        raise LapError(f"no lap {lap_id}")
    if lap.decision is not None:  # decided before a kill: nothing to redo
        return lap
    started = time.monotonic()
    store.update_service_lap(lap_id, status="running")
    eval_spec = load_eval_spec(spec.path(spec.eval))
    dataset = load_dataset(eval_spec)
    production = aliases.target(store, "production")
    student_prompt = (aliases.stored_prompt(store, spec, spec.lap.prompt, "lap.prompt") if spec.lap.prompt is not None
                      else production.prompt)
    production_served = aliases.prompt_of(store, production)
    student_served = aliases.prompt_of(store, AliasTarget(production.model, student_prompt))
    rows = store.captures_after((lap.first_capture_id or 1) - 1, upto=lap.last_capture_id,
                                metadata=spec.triggers.metadata, models=["production"])
    earlier = history(store, spec, lap.first_capture_id)
    examples = []
    for row in [*earlier, *rows]:
        request, response = json.loads(row["request_json"]), json.loads(row["response_json"] or "{}")
        turns = _user_turns(request)
        if not turns or turns[-1]["role"] != "user":
            continue
        # `served`: production's recorded reply (the gate's production side); `answer`: the label trained on
        examples.append({"capture": row["id"], "turns": turns, "served": _reply(response), "answer": _reply(response),
                         "metadata": {k: v for k, v in (request.get("metadata") or {}).items() if isinstance(v, str)},
                         "tokens": row.get("prompt_tokens")})
    guard = leaked(eval_spec, [e["turns"][-1]["content"] for e in examples], dataset)
    dropped = sum(guard)
    examples = [e for e, leak in zip(examples, guard) if not leak]
    if spec.lap.teacher:  # self-consistency: the teacher's majority answer labels each input
        teacher = cached_model(spec.lap.teacher)
        for e in examples:
            check()
            asks = [ChatRequest(messages=aliases.served_messages(production_served, e["turns"]),
                                sampling=Sampling(temperature=0.7 if spec.lap.votes > 1 else 0.0,
                                                  max_tokens=TEACHER_MAX_TOKENS),
                                repeat=i) for i in range(spec.lap.votes)]
            e["answer"], e["agreement"] = vote([c.text if not c.error else None for c in teacher.generate(asks)])
        agreement = sum(e["agreement"] for e in examples) / len(examples) if examples else 0.0
        event(f"labels: {spec.lap.teacher}'s majority of {spec.lap.votes} votes (mean agreement {agreement:.2f})")
    examples = [e for e in examples if e["answer"]]
    # The holdout is a fixed share of captures by id, so no lap ever trains on a held-back capture.
    # The gate pairs the student with what the current production answered: the held-back captures
    # (the lap's own and, with `history`, earlier ones) recorded since production's target last moved.
    since = store.current_switch("production").created_at
    gate_ids = {row["id"] for row in [*earlier, *rows] if row["created_at"] > since}
    held = [e for e in examples if _held_back(e["capture"], spec.lap.holdout) and e["capture"] in gate_ids]
    train_rows = [{"messages": aliases.served_messages(student_served, e["turns"])
                   + [{"role": "assistant", "content": e["answer"]}]} for e in examples
                  if not _held_back(e["capture"], spec.lap.holdout)]
    event(f"{len(rows)} new captures and {len(earlier)} earlier ones, {dropped} dropped by the leak guard, "
          f"{len(train_rows)} to train, {len(held)} held back")
    if not train_rows:
        return _finish(store, lap_id, "rejected", "no training rows left after the leak guard and the holdout")
    folder = Path(store.path).resolve().parent / "service" / lap_id
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows), encoding="utf-8")
    check()
    base = spec.lap.student or production.model
    config = load_train_config(spec.lap.method, values=spec.lap.train)
    result = run(TrainRequest(method=spec.lap.method, spec=eval_spec, store=store, base=base, data=str(data),
                              config=config, evaluate=False, quiet=True, reuse=True, dataset=dataset))
    student = AliasTarget(result.checkpoint.model_ref, student_prompt)
    event(f"trained {student.model} ({result.metrics.get('steps')} steps)")
    if spec.budgets.per_lap.wall_s and time.monotonic() - started > spec.budgets.per_lap.wall_s:
        return _finish(store, lap_id, "rejected", f"budgets.per_lap.wall_s: the lap took longer than "
                       f"{spec.budgets.per_lap.wall_s:g} s before its gate", checkpoint=student.model)
    check()
    gates = [offline_valid(store, spec, eval_spec, dataset, lap_id, production, student),
             offline_traffic(store, spec, eval_spec, held, student)]
    reason = "; ".join(f"{g.where}: {g.reason}" for g in gates)
    if not all(g.passed for g in gates):
        return _finish(store, lap_id, "rejected", reason, checkpoint=student.model)
    aliases.set_alias(store, "candidate", student, who=f"lap {lap_id}", why=reason,
                      test="offline: run spec rule on valid + held-back traffic")
    return _finish(store, lap_id, "candidate", reason, checkpoint=student.model)


def _finish(store: Store, lap_id: str, decision: str, reason: str, checkpoint: str | None = None) -> ServiceLap:
    fields: dict[str, Any] = {"status": "succeeded", "decision": decision, "reason": reason, "finished_at": now()}
    if checkpoint:
        fields["checkpoint"] = checkpoint
    store.update_service_lap(lap_id, **fields)
    return store.service_lap(lap_id)


def _rule(spec: ServiceSpec) -> tuple[Any, float]:
    """The run spec's goal and alpha (defaults without a run spec)."""
    if spec.run is None:
        return Goal(minimise="prompt_tokens", margin=spec.shadow.margin), 0.05

    run_spec = load_run_spec(spec.path(spec.run))
    return (run_spec.goal.rule() if run_spec.goal else None), run_spec.alpha


def served_over(store: Store, target: AliasTarget, template: list[dict[str, Any]]) -> Prompt:
    """The target's served prompt over an eval's message template (what it answers an eval item with)."""
    served = aliases.prompt_of(store, target)
    return served.over(template) if served is not None else Prompt(messages=template)


def offline_valid(store: Store, spec: ServiceSpec, eval_spec: Any, dataset: Any, lap_id: str,
                  production: AliasTarget, student: AliasTarget) -> Gate:
    """The student against production on the eval's valid split, with the run spec's rule."""
    results = {}
    for side, target in zip(GATE_SIDES, (production, student)):
        results[side] = run_eval(eval_spec, store, split="valid", model=cached_model(target.model),
                                 prompt=served_over(store, target, eval_spec.messages()),
                                 stage="service", run_id=gate_run_id(lap_id, side), dataset=dataset)
    goal, alpha = _rule(spec)
    cmp = paired_comparison(store, eval_spec, results["production"].iteration_id, results["student"].iteration_id)
    verdict = decide(cmp, metric=eval_spec.objective.metric, alpha=alpha, goal=goal,
                     candidate_cost=store.iteration_cost(results["student"].iteration_id),
                     incumbent_cost=store.iteration_cost(results["production"].iteration_id))
    return Gate("valid", verdict.promoted, verdict.reason)


def offline_traffic(store: Store, spec: ServiceSpec, eval_spec: Any, held: list[dict[str, Any]],
                    student: AliasTarget) -> Gate:
    """The student against production's recorded answers on the held-back traffic, graded by the
    graders the requests can feed (flywheel.service.shadow.OnlineGraders), with the run spec's rule."""
    if not held:
        return Gate("held-back traffic", True, "no held-back traffic (holdout 0 or too little traffic)")
    scorer = OnlineGraders(eval_spec.graders)
    try:
        model = cached_model(student.model)
        served = aliases.prompt_of(store, student)
        asks = [ChatRequest(messages=aliases.served_messages(served, e["turns"]), sampling=Sampling(temperature=0.0,
                            max_tokens=eval_spec.sampling.max_tokens or 256)) for e in held]
        answers = model.generate(asks)
        pairs = []
        for e, answer in zip(held, answers):
            a = scorer.score(e["served"], e["metadata"])
            b = scorer.score(None if answer.error else answer.text, e["metadata"])
            if a is not None and b is not None:
                pairs.append((a, b, answer.prompt_tokens, e["tokens"]))
    finally:
        scorer.close()
    if not pairs:
        return Gate("held-back traffic", True, "no grader can judge the held-back requests")
    cmp = paired_stats([p[0] for p in pairs], [p[1] for p in pairs], [p[0] >= 1.0 for p in pairs],
                       [p[1] >= 1.0 for p in pairs])
    goal, alpha = _rule(spec)
    student_cost = CostPerItem(n=len(pairs), prompt_tokens=sum(p[2] for p in pairs) / len(pairs))
    known = [p[3] for p in pairs if p[3]]
    production_cost = CostPerItem(n=len(known), prompt_tokens=sum(known) / len(known) if known else float("nan"))
    verdict = decide(cmp, metric=eval_spec.objective.metric, alpha=alpha, goal=goal,
                     candidate_cost=student_cost, incumbent_cost=production_cost)
    return Gate("held-back traffic", verdict.promoted, verdict.reason.replace("valid ", "traffic "))
