"""Prompt search: candidates scored on a valid minibatch, finalists on all of valid, winner tested.

    result = optimize_prompt(spec, store)        # settings from the spec's `optimize:` block
    result.promoted, result.winner.prompt, result.test_comparison

Order of work (every evaluation is an iteration of one `optimize` run, with lineage):
  1. the baseline and the hand-written variants, on the minibatch;
  2. few-shot candidates built on the best so far (demos from passing train outputs);
  3. reflective rewrites of the best `beam` candidates' instruction, for `rounds` rounds;
  4. the top `finalists` and the baseline on all of `valid`; the winner is the cheapest (fewest
     prompt tokens per item; the earlier, simpler one on a tie) among the finalists that no paired
     test separates from the best, a rewrite giving way to its parent unless it beats it on valid;
  5. winner vs baseline by a paired test on `valid` (McNemar for pass/fail, bootstrap CI of the
     per-item difference otherwise); promoted only when significant;
  6. only now, baseline and winner on `test` — reported, never used to choose (skipped inside a
     wheel run, which measures test once, at its end).
A rewrite is kept only when it beats its parent, which has the same demonstrations, on the
minibatch; otherwise it is recorded as dropped with both scores. `test` items are not rendered,
generated or graded before step 6. A stopped search resumes: the unfinished run is found by its
configuration and every evaluation skips what it stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flywheel.data import Dataset, Item, load_dataset
from flywheel.errors import FlywheelError
from flywheel.grading import GraderSet
from flywheel.harness import Evaluation, paired_comparison, evaluate, generate_cached, register_eval
from flywheel.models import ChatRequest, Model, Sampling, load_model
from flywheel.optimize.fewshot import demos_from_samples, labelled_demos, select_demos
from flywheel.optimize.propose import Failure, check_proposal, extract_instruction, proposer_messages
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec, OptimizeSpec
from flywheel.promotion import describe_test, significantly_better
from flywheel.store import Store

LogFn = Callable[[str], None]


@dataclass(eq=False)
class Candidate:
    prompt: Prompt
    origin: str
    parent: "Candidate | None" = None
    rationale: str | None = None
    minibatch: Evaluation | None = None
    valid: Evaluation | None = None
    test: Evaluation | None = None

    @property
    def score(self) -> float:
        value = self.minibatch.objective if self.minibatch else math.nan
        return -math.inf if value is None or math.isnan(value) else value

    def describe(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt.id, "origin": self.origin,
            "parent_prompt_id": self.parent.prompt.id if self.parent else None,
            "n_demos": len(self.prompt.demos), "nearest": self.prompt.nearest,
            "minibatch_score": self.minibatch.objective if self.minibatch else None,
            "valid_score": self.valid.objective if self.valid else None,
            "test_score": self.test.objective if self.test else None,
            "rationale": self.rationale,
        }


@dataclass
class OptimizeResult:
    run_id: str
    baseline: Candidate
    winner: Candidate
    promoted: bool
    reason: str
    valid_comparison: dict[str, Any]
    test_comparison: dict[str, Any]
    candidates: list[Candidate]
    rejected: list[dict[str, Any]]
    model_calls: int
    tokens: int  # paid: prompt + completion tokens of every model call this search made (cache hits are free)
    wall_s: float
    notes: list[str] = field(default_factory=list)
    tokens_measured: int = 0  # of this run's iterations, cached samples included: what its report shows

    def to_dict(self) -> dict[str, Any]:
        data = {
            "run_id": self.run_id, "promoted": self.promoted, "reason": self.reason,
            "baseline": self.baseline.describe(), "winner": self.winner.describe(),
            "winner_messages": self.winner.prompt.to_json(),
            "valid_comparison": self.valid_comparison, "test_comparison": self.test_comparison,
            "candidates": [c.describe() for c in self.candidates], "rejected": self.rejected,
            "model_calls": self.model_calls, "tokens": self.tokens, "tokens_measured": self.tokens_measured,
            "wall_s": self.wall_s, "notes": self.notes,
        }
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))


class _Search:
    """State of one optimisation: the run, the counters, and the budget."""

    def __init__(self, spec: EvalSpec, store: Store, run_id: str, model: Model, grader_set: GraderSet,
                 config: OptimizeSpec, log: LogFn):
        self.spec, self.store, self.run_id, self.model = spec, store, run_id, model
        self.grader_set, self.config, self.log = grader_set, config, log
        self.model_calls = 0
        self.tokens = 0
        self.evaluated = 0
        self.rejected: list[dict[str, Any]] = []

    def budget_left(self) -> str | None:
        """None while the budget allows another candidate, else what ran out."""
        budget = self.config.budget
        if self.evaluated >= budget.max_candidates:
            return f"max_candidates {budget.max_candidates} reached"
        if budget.max_model_calls is not None and self.model_calls >= budget.max_model_calls:
            return f"max_model_calls {budget.max_model_calls} reached"
        if budget.max_tokens is not None and self.tokens >= budget.max_tokens:
            return f"max_tokens {budget.max_tokens} reached"
        return None

    def run(self, candidate: Candidate, items: list[Item], split: str, stage: str,
            model: Model | None = None) -> Evaluation:
        """Evaluate a candidate into its own iteration (found again on resume)."""
        model = model or self.model
        parent_prompt = candidate.parent.prompt.id if candidate.parent else None
        self.store.save_prompt(candidate.prompt, origin=candidate.origin, parent_id=parent_prompt,
                               rationale=candidate.rationale)
        match = dict(prompt_id=candidate.prompt.id, split=split, stage=stage, model_fingerprint=model.fingerprint)
        found = self.store.find_iteration(self.run_id, **match)
        if found:
            iteration_id = found.id
        else:
            parent_iteration = candidate.parent.minibatch.iteration_id if candidate.parent and candidate.parent.minibatch else None
            iteration_id = self.store.iteration_for(
                self.run_id, self.store.next_seq(self.run_id), model_ref=model.ref,
                parent_id=parent_iteration, reason=candidate.origin, **match)
        outcome = evaluate(self.spec, self.store, iteration_id, items, model, candidate.prompt, self.grader_set)
        self.model_calls += outcome.model_calls
        if outcome.model_calls:
            self.tokens += outcome.summary.prompt_tokens + outcome.summary.completion_tokens
        return outcome

    def score_minibatch(self, candidate: Candidate, minibatch: list[Item]) -> None:
        candidate.minibatch = self.run(candidate, minibatch, "valid", "prompt")
        self.evaluated += 1
        self.log(f"{candidate.origin:<28} minibatch {candidate.minibatch.objective:.3f}"
                 f"  ({candidate.minibatch.model_calls} calls)")

    def drop_rewrite(self, candidate: Candidate, parent: Candidate) -> None:
        """A rewrite that does not beat its parent on the minibatch is recorded and never goes further."""
        reason = (f"{candidate.origin}: rewrite does not beat its parent {parent.origin} on the minibatch "
                  f"({candidate.score:.3f} vs {parent.score:.3f}, same demonstrations)")
        self.store.update_iteration(candidate.minibatch.iteration_id, decision="dropped", reason=reason)
        self.rejected.append({"parent_prompt_id": parent.prompt.id, "reason": reason,
                              "text": candidate.prompt.messages[0]["content"][:500]})
        self.log(f"{'rewrite dropped':<28} {reason}")

    def reject(self, parent: Candidate, text: str, reason: str) -> None:
        prompt = Prompt(messages=[{"role": "proposal", "content": text}])
        self.store.save_prompt(prompt, origin="proposer", parent_id=parent.prompt.id, rationale=reason)
        match = dict(prompt_id=prompt.id, split="valid", stage="prompt", model_fingerprint=self.model.fingerprint)
        if not self.store.find_iteration(self.run_id, **match):
            self.store.iteration_for(
                self.run_id, self.store.next_seq(self.run_id), model_ref=self.model.ref, n=0,
                parent_id=parent.minibatch.iteration_id if parent.minibatch else None,
                decision="invalid", reason=reason, **match)
        self.rejected.append({"parent_prompt_id": parent.prompt.id, "reason": reason, "text": text[:500]})
        self.log(f"{'proposal rejected':<28} {reason}")


def _config_key(spec: EvalSpec, dataset_hash: str, model: Model, config: OptimizeSpec, base: Prompt) -> str:
    payload = [spec.fingerprint(), dataset_hash, model.fingerprint, config.model_dump(mode="json"), "optimize",
               base.id]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def optimize_prompt(spec: EvalSpec, store: Store, *, model: Model | None = None,
                    config: OptimizeSpec | None = None, command: str | None = None,
                    log: LogFn | None = None, base_prompt: Prompt | None = None,
                    measure_test: bool = True, dataset: Dataset | None = None,
                    grader_set: GraderSet | None = None) -> OptimizeResult:
    """Search prompts for `spec` (see the module docstring) and store every step.

    `base_prompt` is the starting point (the spec's prompt by default; the wheel passes its
    incumbent's, demonstrations included); `measure_test=False` leaves `test` alone (the wheel
    measures it once, at its end). `dataset`, `grader_set`: the spec's, already loaded by the
    caller (the wheel's; the caller closes its grader set)."""
    started = time.perf_counter()
    config = config or spec.optimize_config()
    log = log or (lambda message: None)
    dataset = dataset or load_dataset(spec)
    valid, train = dataset.split("valid"), dataset.split("train")
    if not valid:
        raise FlywheelError(f"{spec.source}: prompt search needs a `valid` split; {dataset.path} has none")
    model = model or load_model(spec.model, spec.model_options)
    eval_id = register_eval(store, spec, dataset)
    base_prompt = base_prompt or Prompt(messages=spec.messages())
    config_key = _config_key(spec, dataset.content_hash, model, config, base_prompt)
    existing = store.find_unfinished_run(config_key)
    run_id = existing.id if existing else store.create_run(
        kind="optimize", config_key=config_key, eval_id=eval_id, dataset_id=dataset.content_hash,
        model_ref=model.ref, model_fingerprint=model.fingerprint, split="valid", command=command)
    if existing:
        log(f"resuming {run_id}")

    minibatch = sorted(random.Random(config.seed).sample(valid, min(config.minibatch, len(valid))),
                       key=lambda item: item.key)
    own_graders = grader_set is None
    grader_set = grader_set or GraderSet(spec.graders)
    search = _Search(spec, store, run_id, model, grader_set, config, log)
    notes: list[str] = []
    try:
        baseline = Candidate(base_prompt, "baseline")
        candidates = [baseline]
        search.score_minibatch(baseline, minibatch)
        for variant in config.variants:
            if (why := search.budget_left()):
                notes.append(f"variants stopped: {why}")
                break
            candidate = Candidate(_variant_prompt(spec, variant), f"variant:{variant.name}", parent=baseline)
            search.score_minibatch(candidate, minibatch)
            candidates.append(candidate)

        if config.fewshot:
            candidates += _fewshot_candidates(search, candidates, train, minibatch, notes)
        if config.proposer and config.proposer.rounds:
            candidates += _proposer_candidates(search, candidates, minibatch, dataset.fields, notes)

        # Finalists on all of valid; the baseline always, as the comparator.
        ranked = sorted(candidates[1:], key=lambda c: (-c.score, candidates.index(c)))
        finalists = [baseline] + ranked[: config.finalists]
        for candidate in finalists:
            candidate.valid = search.run(candidate, valid, "valid", "prompt-valid")
            log(f"{candidate.origin:<28} valid     {candidate.valid.objective:.3f}")
        winner = _cheapest_unseparated(store, spec, config, finalists)
        if winner is not finalists[0]:
            log(f"{winner.origin:<28} winner: the cheapest finalist no paired test separates from the best")
        valid_cmp = _compare(store, spec, baseline.valid, winner.valid)
        promoted, reason = _decide(spec, config, baseline, winner, valid_cmp)
        log(reason)

        # Only now is `test` touched: baseline and winner, reported, never used to choose.
        test = dataset.split("test") if measure_test else []
        test_cmp: dict[str, Any] = {}
        if test:
            for candidate in dict.fromkeys([baseline, winner]):
                candidate.test = search.run(candidate, test, "test", "test-report")
            test_cmp = _compare(store, spec, baseline.test, winner.test)
        _record_decisions(store, candidates, finalists, baseline, winner, promoted, reason)
    finally:
        if own_graders:
            grader_set.close()

    result = OptimizeResult(
        run_id=run_id, baseline=baseline, winner=winner, promoted=promoted, reason=reason,
        valid_comparison=valid_cmp, test_comparison=test_cmp, candidates=candidates,
        rejected=search.rejected, model_calls=search.model_calls, tokens=search.tokens,
        wall_s=time.perf_counter() - started, notes=notes, tokens_measured=store.measured_tokens(run_id))
    store.finish_run(run_id, "completed", {k: v for k, v in result.to_dict().items() if k != "candidates"})
    return result


def _variant_prompt(spec: EvalSpec, variant) -> Prompt:
    if variant.messages is not None:
        return Prompt(messages=[m.model_dump() for m in variant.messages])
    messages = spec.messages()
    index = next((i for i, m in enumerate(messages) if m["role"] in ("system", "developer")), None)
    if index is None:
        messages.insert(0, {"role": "system", "content": variant.system})
    else:
        messages[index] = {"role": messages[index]["role"], "content": variant.system}
    return Prompt(messages=messages)


def _fewshot_candidates(search: _Search, candidates: list[Candidate], train: list[Item],
                        minibatch: list[Item], notes: list[str]) -> list[Candidate]:
    fewshot = search.config.fewshot
    assert fewshot is not None
    base = max(candidates, key=lambda c: (c.score, -candidates.index(c)))
    pool_items = train[: fewshot.max_items]
    if not pool_items:
        notes.append("few-shot skipped: no train items")
        return []
    if fewshot.source == "labels":
        pool = labelled_demos(base.prompt, pool_items, fewshot.demo_output or "", search.grader_set)
    else:
        teacher = search.model if fewshot.source == "model" else load_model(fewshot.teacher or "")
        bootstrap = search.run(Candidate(base.prompt, f"bootstrap:{fewshot.source}"), pool_items, "train",
                               "bootstrap", model=teacher)
        samples = search.store.samples_with_grades(bootstrap.iteration_id)
        pool = demos_from_samples(samples, {i.key: i for i in pool_items}, base.prompt)
    search.log(f"{'few-shot pool':<28} {len(pool)} passing demos from {len(pool_items)} train items ({fewshot.source})")
    if not pool:
        notes.append(f"few-shot skipped: no passing {fewshot.source} outputs among {len(pool_items)} train items")
        return []
    labels = {i.key: str(i.fields.get(fewshot.label_field)) for i in pool_items} if fewshot.label_field else None
    out = []
    for strategy in fewshot.strategies:
        for k in fewshot.k:
            if (why := search.budget_left()):
                notes.append(f"few-shot stopped: {why}")
                return out
            demos = select_demos(pool, strategy, k, labels=labels, seed=search.config.seed)
            prompt = Prompt(messages=base.prompt.messages, demos=list(pool) if demos is None else demos,
                            nearest=k if demos is None else 0)
            candidate = Candidate(prompt, f"fewshot:{strategy}:k={k}", parent=base)
            search.score_minibatch(candidate, minibatch)
            out.append(candidate)
    return out


def _proposer_candidates(search: _Search, candidates: list[Candidate], minibatch: list[Item],
                         fields: list[str], notes: list[str]) -> list[Candidate]:
    settings = search.config.proposer
    assert settings is not None
    teacher = search.config.fewshot.teacher if search.config.fewshot else None
    ref = settings.model or teacher or search.spec.model
    proposer = search.model if ref == search.model.ref else load_model(ref)
    items_by_key = {i.key: i for i in minibatch}
    pool = list(candidates)
    out: list[Candidate] = []
    for round_ in range(settings.rounds):
        parents = sorted(pool, key=lambda c: (-c.score, pool.index(c)))[: settings.beam]
        for parent in parents:
            failures = _failures(search, parent, items_by_key, settings.failures_shown)
            if not failures:
                continue
            requests = [ChatRequest(proposer_messages(parent.prompt, failures),
                                    Sampling(temperature=settings.temperature, max_tokens=settings.max_tokens,
                                             seed=search.config.seed + round_), repeat=j)
                        for j in range(settings.proposals)]
            completions, calls = generate_cached(search.store, proposer, requests)
            search.model_calls += calls
            for completion in completions:
                if (why := search.budget_left()):
                    notes.append(f"proposer stopped: {why}")
                    return out
                text = extract_instruction(completion.text) if not completion.error else ""
                proposal = check_proposal(parent.prompt, text, set(fields))
                if proposal.rejected or proposal.prompt is None:
                    search.reject(parent, text, proposal.rejected or completion.error or "no proposal")
                    continue
                candidate = Candidate(proposal.prompt, f"proposer:r{round_ + 1}", parent=parent,
                                      rationale=f"rewrite of {parent.origin} from {len(failures)} failures")
                search.score_minibatch(candidate, minibatch)
                if candidate.score <= parent.score:  # same demonstrations: only the instruction changed
                    search.drop_rewrite(candidate, parent)
                    continue
                out.append(candidate)
                pool.append(candidate)
    return out


def _failures(search: _Search, candidate: Candidate, items_by_key: dict[str, Item], limit: int) -> list[Failure]:
    if candidate.minibatch is None:
        return []
    failures = []
    for sample in search.store.samples_with_grades(candidate.minibatch.iteration_id):
        failed = [g for g in sample.grades if not g.passed]
        if sample.error or not failed:
            continue
        user = next(m["content"] for m in reversed(candidate.prompt.render_base(items_by_key[sample.item_key]))
                    if m["role"] == "user")
        failures.append(Failure(input=user, output=sample.output_text or "",
                                feedback="; ".join(g.feedback or "" for g in failed)))
        if len(failures) >= limit:
            break
    return failures


def _compare(store: Store, spec: EvalSpec, a: Evaluation, b: Evaluation) -> dict[str, Any]:
    return paired_comparison(store, spec, a.iteration_id, b.iteration_id)


def _prompt_tokens(candidate: Candidate) -> float:
    evaluation = candidate.valid
    n = evaluation.summary.n_samples if evaluation else 0
    return evaluation.summary.prompt_tokens / n if n else math.inf


def _cheapest_unseparated(store: Store, spec: EvalSpec, config: OptimizeSpec,
                          finalists: list[Candidate]) -> Candidate:
    """Among the finalists that no paired test on valid separates from the best (the best is not
    significantly better than them), the one with the fewest prompt tokens per item; on a tie, the
    earlier one (the baseline and parents come before their rewrites)."""
    best = max(finalists, key=lambda c: (c.valid.objective, -finalists.index(c)))
    tied = [c for c in finalists if c is best or not significantly_better(
        _compare(store, spec, c.valid, best.valid), spec.objective.metric, config.alpha)]
    # A rewrite that does not beat its parent on all of valid too gives way to the parent.
    tied = [c for c in tied if not (c.parent in tied and c.origin.startswith("proposer")
                                    and c.valid.objective <= c.parent.valid.objective)] or tied
    return min(tied, key=lambda c: (_prompt_tokens(c), finalists.index(c)))


def _decide(spec: EvalSpec, config: OptimizeSpec, baseline: Candidate, winner: Candidate,
            cmp: dict[str, Any]) -> tuple[bool, str]:
    if winner is baseline:
        return False, "kept the baseline: no finalist is significantly better on valid, and none is cheaper"
    stats = f"valid diff {cmp['diff']:+.3f}, 95% CI [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]"
    test = describe_test(cmp, spec.objective.metric)
    if significantly_better(cmp, spec.objective.metric, config.alpha):
        return True, f"promoted {winner.origin}: {stats}; significantly better: {test}"
    return False, f"kept the baseline: {winner.origin} is not significantly better ({stats}; {test})"


def _record_decisions(store: Store, candidates: list[Candidate], finalists: list[Candidate],
                      baseline: Candidate, winner: Candidate, promoted: bool, reason: str) -> None:
    for candidate in candidates:
        if candidate.minibatch is None:
            continue
        finalist = candidate in finalists
        store.update_iteration(candidate.minibatch.iteration_id,
                               decision="finalist" if finalist else "dropped",
                               reason=f"{candidate.origin}: " + ("re-scored on all of valid" if finalist
                                                                 else "minibatch score below the finalists"))
    for candidate in finalists:
        if candidate is winner:
            decision = "promoted" if promoted else ("incumbent" if candidate is baseline else "not significant")
        else:
            decision = "incumbent" if candidate is baseline else "rejected"
        why = ("lower valid score" if candidate.valid.objective < winner.valid.objective
               else "no better on valid than the cheaper winner")
        store.update_iteration(candidate.valid.iteration_id, decision=decision,
                               reason=reason if candidate is winner else f"{candidate.origin}: {why}")
        if candidate.test is not None:
            store.update_iteration(candidate.test.iteration_id, decision="reported",
                                   reason=f"{candidate.origin} on test, after selection")
