"""The eval harness: render -> generate (cached) -> grade -> store, per sample, resumable.

    result = run_eval(spec, store, split="test")
    print(result.pass_rate, result.model_calls)

Work is done in batches. Each batch's samples and grades are committed together as soon as they
exist; a run killed at any point and started again with the same arguments finds its unfinished
run, skips what is stored and pays for nothing twice. Completions are cached by a key that covers
the model fingerprint, the full messages, the sampling settings and the repeat index; errors are
never cached, so an unchanged rerun makes zero model calls.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import graders

from flywheel.data import Dataset, Item, load_dataset
from flywheel.errors import FlywheelError, TooManyErrors
from flywheel.models import ChatRequest, Completion, Model, Sampling, load_model
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.stats import mean_ci, wilson_ci
from flywheel.store import SampleRecord, Store

ProgressFn = Callable[[int, int], None]


@dataclass
class GraderSummary:
    name: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    pass_rate: float
    errors: int


@dataclass
class EvalResult:
    run_id: str
    iteration_id: str
    eval_name: str
    model: str
    split: str
    n_samples: int
    n_errors: int
    pass_rate: float
    pass_ci: tuple[float, float]
    objective: float
    graders: list[GraderSummary]
    prompt_tokens: int
    completion_tokens: int
    model_calls: int
    cache_hits: int
    resumed: int
    wall_s: float
    status: str = "completed"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return json.loads(json.dumps(data, default=float, allow_nan=True).replace("NaN", "null"))


@dataclass
class _Pending:
    item: Item
    repeat: int
    messages: list[dict[str, str]] | None
    request: ChatRequest | None = None
    cache_key: str | None = None
    error: str | None = None
    completion: Completion | None = None
    cache_hit: bool = False


@dataclass
class _Counters:
    model_calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    done: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def cache_key(fingerprint: str, request: ChatRequest) -> str:
    """The completion-cache key: model, full messages, sampling and repeat index."""
    payload = {
        "model": fingerprint,
        "messages": request.messages,
        "sampling": asdict(request.sampling),
        "repeat": request.repeat,
        "response_format": request.response_format,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def render_messages(messages: Sequence[dict[str, str]], item: Item) -> list[dict[str, str]]:
    """Fill `{{item.x}}` templates; raises graders.TemplateVariableError on a missing field."""
    return Prompt(messages=list(messages)).render_base(item)


class GraderSet:
    """The spec's graders, built once per run, with a model resolver for judge graders."""

    def __init__(self, configs: list[dict[str, Any]], judge_options: dict[str, Any] | None = None):
        self._judges: dict[str, Model] = {}
        self._judge_options = judge_options or {}
        self.runners = []
        self.names = []
        for index, raw in enumerate(configs):
            config = graders.parse_grader(raw)
            self.names.append(getattr(config, "name", None) or f"grader_{index}")
            self.runners.append(graders.build_grader(config, judge=self.judge_model))

    def judge_model(self, ref: str) -> Model:
        """The judge model for a grader's `model` string (no scheme means openai:), loaded once."""
        if ref not in self._judges:
            full = ref if ":" in ref and ref.split(":", 1)[0] in ("local", "openai") else f"openai:{ref}"
            self._judges[ref] = load_model(full)
        return self._judges[ref]

    def grade(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Grades per sample: a list (one per grader) of store-ready dicts. Never raises."""
        per_sample: list[list[dict[str, Any]]] = [[] for _ in samples]
        for name, runner in zip(self.names, self.runners):
            try:
                results = runner.grade_batch(samples, items)
            except Exception as exc:  # noqa: BLE001 - a grader bug is a recorded error, not a crash
                message = f"{type(exc).__name__}: {exc}"
                results = [None] * len(samples)
            for row, grade in zip(per_sample, results):
                if grade is None:
                    row.append({"grader": name, "score": 0.0, "passed": False,
                                "feedback": f"grader raised {message}", "details": {},
                                "error": "other_error", "error_details": message})
                else:
                    row.append({"grader": name, "score": float(grade.score), "passed": bool(grade.passed),
                                "feedback": grade.feedback, "details": grade.details,
                                "error": grade.error, "error_details": grade.error_details})
        return per_sample

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
        for model in self._judges.values():
            model.close()


def _config_key(spec: EvalSpec, dataset: Dataset, model: Model, split: str, limit: int | None,
                prompt: Prompt, stage: str) -> str:
    payload = [spec.fingerprint(), dataset.content_hash, model.fingerprint, split, limit, prompt.id, stage]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def select_items(dataset: Dataset, split: str, limit: int | None) -> list[Item]:
    items = dataset.split(split)
    if not items:
        raise FlywheelError(f"{dataset.path}: split {split!r} has no items")
    return items[:limit] if limit else items


@dataclass
class Evaluation:
    """What `evaluate` did to one iteration: its summary and what it cost this time."""

    iteration_id: str
    summary: dict[str, Any]
    model_calls: int
    cache_hits: int
    resumed: int
    wall_s: float

    @property
    def objective(self) -> float:
        return self.summary["objective"]


def sampling_of(spec: EvalSpec) -> Sampling:
    return Sampling(temperature=spec.sampling.temperature, max_tokens=spec.sampling.max_tokens,
                    top_p=spec.sampling.top_p, seed=spec.sampling.seed)


def evaluate(
    spec: EvalSpec,
    store: Store,
    iteration_id: str,
    items: Sequence[Item],
    model: Model,
    prompt: Prompt,
    grader_set: GraderSet,
    *,
    max_errors: int | None = None,
    progress: ProgressFn | None = None,
    commit_every_s: float | None = None,
) -> Evaluation:
    """Render, generate (cached), grade and store every (item, repeat) missing from an iteration.

    Samples already stored in the iteration are skipped, so calling this again after a crash
    resumes; the completion cache answers every request it has seen. Updates the iteration's
    score, CI, tokens and cost.
    """
    started = time.perf_counter()
    counters = _Counters()
    done = store.done_keys(iteration_id)
    counters.errors = store.db.execute(
        "select count(*) from samples where iteration_id = ? and error is not null",
        [iteration_id]).fetchone()[0]
    todo = [(item, r) for item in items for r in range(spec.sampling.repeats) if (item.key, r) not in done]
    total = len(items) * spec.sampling.repeats
    counters.done = total - len(todo)
    if progress:
        progress(counters.done, total)

    pending = _prepare(todo, prompt, model, sampling_of(spec), spec.response_format)
    cached = store.cached(p.cache_key for p in pending if p.cache_key)
    for p in pending:
        row = cached.get(p.cache_key) if p.cache_key else None
        if row is not None:
            p.completion = Completion(
                text=row["output_text"], prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"], finish_reason=row["finish_reason"],
                latency_s=row["latency_s"], cost=row["cost"])
            p.cache_hit = True

    ready = [p for p in pending if p.cache_hit or p.error]
    to_generate = [p for p in pending if not (p.cache_hit or p.error)]
    counters.cache_hits = sum(p.cache_hit for p in ready)
    _write(store, iteration_id, model, grader_set, ready, counters, max_errors, total, progress)
    # Commit by batch and by time: a chunk starts as one model batch and is resized so that its
    # generation takes about `commit_every_s` (between the model's `min_chunk_size` and four model
    # batches), so a kill loses at most a few seconds of generated work. A chunk never splits the
    # repeats of one item (a remote model sends them as one call with `n`). Before each chunk, what
    # another process running the same eval has stored meanwhile is skipped.
    target = commit_interval() if commit_every_s is None else commit_every_s
    preferred = max(1, model.preferred_batch_size)
    floor = max(1, min(preferred, model.min_chunk_size))
    size, start = preferred, 0
    while start < len(to_generate):
        end = min(start + size, len(to_generate))
        while end < len(to_generate) and to_generate[end].item.key == to_generate[end - 1].item.key:
            end += 1
        chunk = to_generate[start:end]
        start = end
        stored = store.done_keys(iteration_id)
        others = [p for p in chunk if (p.item.key, p.repeat) in stored]
        if others:
            counters.done += len(others)
            chunk = [p for p in chunk if (p.item.key, p.repeat) not in stored]
            if not chunk:
                continue
        began = time.perf_counter()
        _generate(model, chunk, counters)
        elapsed = time.perf_counter() - began
        _write(store, iteration_id, model, grader_set, chunk, counters, max_errors, total, progress)
        if elapsed > 0:
            size = max(floor, min(preferred * 4, int(len(chunk) * target / elapsed)))

    summary = summarise(store, iteration_id, spec)
    wall = time.perf_counter() - started
    store.update_iteration(
        iteration_id, n=summary["n_samples"], score=summary["objective"],
        ci_low=summary["objective_ci"][0], ci_high=summary["objective_ci"][1],
        prompt_tokens=summary["prompt_tokens"], completion_tokens=summary["completion_tokens"],
        cost=summary["cost"], wall_s=wall)
    return Evaluation(iteration_id=iteration_id, summary=summary, model_calls=counters.model_calls,
                      cache_hits=counters.cache_hits, resumed=len(done), wall_s=wall)


COMMIT_EVERY_S = 5.0


def commit_interval() -> float:
    """Seconds of generation between commits ($FLYWHEEL_COMMIT_EVERY_S, default 5)."""
    raw = os.environ.get("FLYWHEEL_COMMIT_EVERY_S", "")
    try:
        value = float(raw) if raw else COMMIT_EVERY_S
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise FlywheelError(f"$FLYWHEEL_COMMIT_EVERY_S={raw!r}: expected a positive number of seconds")
    return value


def generate_cached(store: Store, model: Model, requests: Sequence[ChatRequest]) -> tuple[list[Completion], int]:
    """Completions for requests outside an eval (a proposer's), through the completion cache.

    Returns the completions and how many model calls were made. Errors are returned, not cached.
    """
    keys = [cache_key(model.fingerprint, r) for r in requests]
    hits = store.cached(keys)
    missing = [i for i, k in enumerate(keys) if k not in hits]
    fresh = model.generate([requests[i] for i in missing]) if missing else []
    out: list[Completion] = []
    made = dict(zip(missing, fresh))
    for index, key in enumerate(keys):
        if index in made:
            out.append(made[index])
        else:
            row = hits[key]
            out.append(Completion(text=row["output_text"], prompt_tokens=row["prompt_tokens"],
                                  completion_tokens=row["completion_tokens"], finish_reason=row["finish_reason"]))
    store.cache_completions([
        {"key": keys[i], "model_fingerprint": model.fingerprint, "output_text": c.text,
         "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
         "completion_tokens": c.completion_tokens, "latency_s": c.latency_s, "cost": c.cost}
        for i, c in made.items() if c.error is None])
    return out, len(missing)


def item_scores(store: Store, iteration_id: str, spec: EvalSpec) -> dict[tuple[str, int], tuple[float, bool]]:
    """(score, passed) of the objective grader per (item_key, repeat); errored samples score 0."""
    grader = spec.objective_grader
    rows = store.db.execute(
        "select s.item_key, s.repeat, g.score, g.passed from samples s left join grades g"
        " on g.sample_id = s.id and g.grader = ? where s.iteration_id = ?", [grader, iteration_id]).fetchall()
    return {(key, repeat): (float(score or 0.0), bool(passed)) for key, repeat, score, passed in rows}


def paired_comparison(store: Store, spec: EvalSpec, a: str, b: str) -> dict[str, Any]:
    """Paired statistics of iteration b against a over the (item, repeat) keys they share."""
    from flywheel.stats import paired_stats

    sa, sb = item_scores(store, a, spec), item_scores(store, b, spec)
    keys = sorted(set(sa) & set(sb))
    return paired_stats([sa[k][0] for k in keys], [sb[k][0] for k in keys],
                        [sa[k][1] for k in keys], [sb[k][1] for k in keys])


def register_eval(store: Store, spec: EvalSpec, dataset: Dataset) -> str:
    """Store the eval definition and its dataset (once per content hash); return the eval id."""
    eval_id = "e-" + spec.fingerprint()
    store.save_eval(eval_id, spec.name, spec.source, spec.model_dump_json())
    store.save_dataset(dataset.content_hash, str(dataset.path), dataset.items)
    return eval_id


def run_eval(
    spec: EvalSpec,
    store: Store,
    *,
    split: str = "test",
    limit: int | None = None,
    model: Model | None = None,
    prompt: Prompt | None = None,
    max_errors: int | None = None,
    stage: str = "eval",
    command: str | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate `spec` on one split and store everything; resume an unfinished identical run."""
    started = time.perf_counter()
    dataset = load_dataset(spec)
    items = select_items(dataset, split, limit)
    model = model or load_model(spec.model, spec.model_options)
    prompt = prompt or Prompt(messages=spec.messages())

    eval_id = register_eval(store, spec, dataset)
    store.save_prompt(prompt, origin="spec")
    config_key = _config_key(spec, dataset, model, split, limit, prompt, stage)
    existing = store.find_unfinished_run(config_key)
    if existing:
        run_id = existing["id"]
    else:
        run_id = store.create_run(
            kind="eval", config_key=config_key, eval_id=eval_id, dataset_id=dataset.content_hash,
            model_ref=model.ref, model_fingerprint=model.fingerprint, split=split, item_limit=limit,
            command=command)
    iteration_id = store.iteration_for(
        run_id, 0, stage=stage, model_ref=model.ref, model_fingerprint=model.fingerprint,
        prompt_id=prompt.id, split=split)

    try:
        grader_set = GraderSet(spec.graders)
        try:
            outcome = evaluate(spec, store, iteration_id, items, model, prompt, grader_set,
                               max_errors=max_errors, progress=progress)
        finally:
            grader_set.close()
    except TooManyErrors:
        store.finish_run(run_id, "failed", summarise(store, iteration_id, spec))
        raise
    except BaseException as exc:
        # Failing before the first sample (a model that does not load, no API key) leaves nothing
        # to resume: the run is marked failed rather than left `running`. Later failures leave it
        # running, so the same command resumes it.
        try:
            if not store.done_keys(iteration_id):
                store.finish_run(run_id, "failed", {"n_samples": 0, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        except FlywheelError:
            pass  # the store itself is the problem (busy): the original error says more
        raise

    summary = dict(outcome.summary)
    wall = time.perf_counter() - started
    store.update_iteration(iteration_id, wall_s=wall, decision="measured")
    summary.update(model_calls=outcome.model_calls, cache_hits=outcome.cache_hits, wall_s=wall)
    store.finish_run(run_id, "completed", summary)
    return EvalResult(
        run_id=run_id, iteration_id=iteration_id, eval_name=spec.name, model=model.ref, split=split,
        n_samples=summary["n_samples"], n_errors=summary["n_errors"], pass_rate=summary["pass_rate"],
        pass_ci=tuple(summary["pass_ci"]), objective=summary["objective"],
        graders=[GraderSummary(**g) for g in summary["graders"]],
        prompt_tokens=summary["prompt_tokens"], completion_tokens=summary["completion_tokens"],
        model_calls=outcome.model_calls, cache_hits=outcome.cache_hits, resumed=outcome.resumed,
        wall_s=wall)


def _prepare(todo: list[tuple[Item, int]], prompt: Prompt, model: Model, sampling: Sampling,
             response_format: dict[str, Any] | None = None) -> list[_Pending]:
    fingerprint = model.fingerprint
    unique = list({item.key: item for item, _ in todo}.values())
    rendered = dict(zip((i.key for i in unique), prompt.render_many(unique)))
    pending = []
    for item, repeat in todo:
        messages = rendered[item.key]
        if isinstance(messages, str):
            pending.append(_Pending(item=item, repeat=repeat, messages=None, error=messages))
            continue
        request = ChatRequest(messages=messages, sampling=sampling, repeat=repeat, response_format=response_format)
        pending.append(_Pending(item=item, repeat=repeat, messages=messages, request=request,
                                cache_key=cache_key(fingerprint, request)))
    return pending


def _generate(model: Model, chunk: list[_Pending], counters: _Counters) -> None:
    """Fill `completion` (or `error`) for each pending sample; isolate a failing request."""
    requests = [p.request for p in chunk]
    counters.model_calls += len(requests)
    try:
        completions = model.generate(requests)  # type: ignore[arg-type]
    except FlywheelError:
        raise
    except Exception:  # noqa: BLE001 - retry one by one to find the request that fails
        completions = []
        for request in requests:
            try:
                completions.extend(model.generate([request]))  # type: ignore[list-item]
            except Exception as exc:  # noqa: BLE001
                completions.append(Completion(text="", error=f"model_error: {type(exc).__name__}: {exc}"))
    for p, completion in zip(chunk, completions):
        if completion.error:
            p.error = completion.error
        else:
            p.completion = completion


def _write(store: Store, iteration_id: str, model: Model, grader_set: GraderSet, chunk: list[_Pending],
           counters: _Counters, max_errors: int | None, total: int, progress: ProgressFn | None) -> None:
    if not chunk:
        return
    gradable = [p for p in chunk if p.completion is not None]
    grades = grader_set.grade(
        [graders.make_sample(p.completion.text) for p in gradable],  # type: ignore[union-attr]
        [p.item.fields for p in gradable])
    grades_by_id = {id(p): g for p, g in zip(gradable, grades)}
    records = []
    for p in chunk:
        c = p.completion
        records.append(SampleRecord(
            iteration_id=iteration_id, item_key=p.item.key, repeat=p.repeat,
            input_json=json.dumps(p.messages, ensure_ascii=False) if p.messages else "null",
            output_text=c.text if c else None, finish_reason=c.finish_reason if c else None,
            prompt_tokens=c.prompt_tokens if c else 0, completion_tokens=c.completion_tokens if c else 0,
            latency_s=c.latency_s if c else 0.0, cost=c.cost if c else 0.0, cache_hit=p.cache_hit,
            error=p.error, grades=grades_by_id.get(id(p), []), cache_key=p.cache_key,
            model_fingerprint=model.fingerprint))
    store.write_samples(records)
    counters.errors += sum(1 for p in chunk if p.error)
    counters.done += len(chunk)
    if progress:
        progress(counters.done, total)
    if max_errors is not None and counters.errors > max_errors:
        raise TooManyErrors(
            f"{counters.errors} samples failed (more than --max-errors {max_errors}); "
            f"last error: {next(p.error for p in reversed(chunk) if p.error) if any(p.error for p in chunk) else 'see runs show'}")


def summarise(store: Store, iteration_id: str, spec: EvalSpec) -> dict[str, Any]:
    """Pass rate, per-grader mean with 95% CI, objective, tokens and cost of one iteration."""
    rows = store.db.execute(
        "select id, error, prompt_tokens, completion_tokens, cost from samples where iteration_id = ?",
        [iteration_id]).fetchall()
    grade_rows = store.db.execute(
        "select g.sample_id, g.grader, g.score, g.passed, g.error from grades g"
        " join samples s on s.id = g.sample_id where s.iteration_id = ?", [iteration_id]).fetchall()
    by_grader: dict[str, dict[int, tuple[float, int, str | None]]] = {}
    for sample_id, grader, score, passed, error in grade_rows:
        by_grader.setdefault(grader, {})[sample_id] = (score, passed, error)
    sample_ids = [r[0] for r in rows]
    errored = {r[0] for r in rows if r[1]}
    passed_all = [
        int(sid not in errored and bool(by_grader) and all(g.get(sid, (0, 0, None))[1] for g in by_grader.values()))
        for sid in sample_ids]
    graders_out = []
    for name, grades in by_grader.items():
        # A sample that failed before grading scores 0 for every grader: errors are not dropped.
        scores = [grades.get(sid, (0.0, 0, None))[0] for sid in sample_ids]
        passes = [grades.get(sid, (0.0, 0, None))[1] for sid in sample_ids]
        mean, low, high = mean_ci(scores)
        graders_out.append(dict(
            name=name, n=len(scores), mean=mean, ci_low=low, ci_high=high,
            pass_rate=sum(passes) / len(passes) if passes else math.nan,
            errors=sum(1 for sid in sample_ids if sid in errored or grades.get(sid, (0, 0, None))[2])))
    n = len(sample_ids)
    successes = sum(passed_all)
    objective, objective_ci = successes / n if n else math.nan, list(wilson_ci(successes, n))
    for g in graders_out:
        if g["name"] == spec.objective_grader:
            if spec.objective.metric == "pass_rate":
                objective = g["pass_rate"]
                objective_ci = list(wilson_ci(round(g["pass_rate"] * g["n"]), g["n"]))
            else:
                objective, objective_ci = g["mean"], [g["ci_low"], g["ci_high"]]
    return dict(
        n_samples=n, n_errors=len(errored), pass_rate=successes / n if n else math.nan,
        pass_ci=list(wilson_ci(successes, n)), graders=graders_out,
        objective=objective, objective_ci=objective_ci,
        prompt_tokens=sum(r[2] or 0 for r in rows), completion_tokens=sum(r[3] or 0 for r in rows),
        cost=sum(r[4] or 0.0 for r in rows))

