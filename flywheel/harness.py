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
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import graders

from flywheel.data import Dataset, Item, load_dataset
from flywheel.errors import FlywheelError, ModelError, TooManyErrors
from flywheel.grading import GraderSet
from flywheel.images import check_item_images, hashed_view
from flywheel.models import ChatRequest, Completion, Model, Sampling, load_model
from flywheel.outputs import DataOutputs
from flywheel.prompt import Prompt
from flywheel.settings import env_seconds
from flywheel.spec import EvalSpec
from flywheel.stats import paired_by_key
from flywheel.store import SampleRecord, Store
from flywheel.summaries import EvalSummary, GraderSummary

ProgressFn = Callable[[int, int], None]


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
    # Set when nothing was measured (every sample, or every grade by one grader, errored): the
    # first such error, and the run is stored as failed.
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["graders"] = [g.model_dump() for g in self.graders]
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
        "messages": hashed_view(request.messages),  # images by content hash; text messages as they are
        "sampling": asdict(request.sampling),
        "repeat": request.repeat,
        "response_format": request.response_format,
    }
    if request.tools is not None or request.tool_choice is not None:  # absent otherwise: older keys stay valid
        payload.update(tools=request.tools, tool_choice=request.tool_choice)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def render_messages(messages: Sequence[dict[str, str]], item: Item) -> list[dict[str, str]]:
    """Fill `{{item.x}}` templates; raises graders.TemplateVariableError on a missing field."""
    return Prompt(messages=list(messages)).render_base(item)


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
    summary: EvalSummary
    model_calls: int
    cache_hits: int
    resumed: int
    wall_s: float

    @property
    def objective(self) -> float:
        return self.summary.objective


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
    executor: Any = None,
) -> Evaluation:
    """Render, generate (cached), grade and store every (item, repeat) missing from an iteration.

    `executor` (flywheel.executors.RayExecutor) generates and grades the chunks elsewhere; this
    process still writes every result.

    Samples already stored in the iteration are skipped, so calling this again after a crash
    resumes; the completion cache answers every request it has seen. Updates the iteration's
    score, CI, tokens and cost.
    """
    started = time.perf_counter()
    counters = _Counters()
    done = store.done_keys(iteration_id)
    counters.errors = store.count_errors(iteration_id)
    todo = [(item, r) for item in items for r in range(spec.sampling.repeats) if (item.key, r) not in done]
    total = len(items) * spec.sampling.repeats
    counters.done = total - len(todo)
    if progress:
        progress(counters.done, total)

    pending = _prepare(todo, prompt, model, sampling_of(spec), spec.response_format, spec.tools, spec.tool_choice)
    if isinstance(model, DataOutputs):  # no model: outputs come from the data
        model.fill(pending)
    cached = store.cached(p.cache_key for p in pending if p.cache_key)
    for p in pending:
        row = cached.get(p.cache_key) if p.cache_key else None
        if row is not None:
            p.completion, p.cache_hit = _completion_of(row), True

    ready = [p for p in pending if p.cache_hit or p.error or p.completion]
    to_generate = [p for p in pending if not (p.cache_hit or p.error or p.completion)]
    counters.cache_hits = sum(p.cache_hit for p in ready)
    _write(store, iteration_id, model, grader_set, ready, counters, max_errors, total, progress)
    if executor is not None:  # tasks elsewhere generate and grade; this process stays the single writer
        batch = getattr(executor, "chunk_size", None) or max(1, model.preferred_batch_size) * 4
        chunks = [to_generate[start:start + batch] for start in range(0, len(to_generate), batch)]
        work = [([p.request for p in c], [p.item.fields for p in c]) for c in chunks]
        for index, result in executor.map(model.ref, spec.model_options, spec.graders, work):
            chunk = chunks[index]
            counters.model_calls += len(chunk)
            for p, completion in zip(chunk, result.completions):
                p.error, p.completion = (completion.error, None) if completion.error else (None, completion)
            _cache(store, model.fingerprint, chunk)
            _write(store, iteration_id, model, grader_set, chunk, counters, max_errors, total, progress,
                   grades=result.grades)
        to_generate = []
    target = commit_interval() if commit_every_s is None else commit_every_s
    if to_generate and model.streams:  # one running batch for everything; commits as rows finish
        _stream(store, iteration_id, model, grader_set, to_generate, counters, max_errors, total, progress, target)
        to_generate = []
    # Commit by batch and by time: a chunk starts as one model batch and is resized so that its
    # generation takes about `commit_every_s` (between the model's `min_chunk_size` and four model
    # batches), so a kill loses at most a few seconds of generated work. A chunk never splits the
    # repeats of one item (a remote model sends them as one call with `n`). Before each chunk, what
    # another process running the same eval has stored meanwhile is skipped.
    preferred = max(1, model.preferred_batch_size)
    floor = max(1, min(preferred, model.min_chunk_size))
    size, start = preferred, 0
    with _Claims(store) as claims:
        while start < len(to_generate) or claims.waiting:
            if start >= len(to_generate):  # only requests another run is generating are left: wait for them
                to_generate, start = claims.take_waiting(), 0
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
            answered, chunk = claims.split(chunk)  # cached meanwhile / ours to generate (others: waiting)
            counters.cache_hits += len(answered)
            _write(store, iteration_id, model, grader_set, answered, counters, max_errors, total, progress)
            if not chunk:
                continue
            began = time.perf_counter()
            _generate(store, model, chunk, counters)
            elapsed = time.perf_counter() - began
            _write(store, iteration_id, model, grader_set, chunk, counters, max_errors, total, progress)
            claims.release(chunk)
            if elapsed > 0:
                size = max(floor, min(preferred * 4, int(len(chunk) * target / elapsed)))

    summary = summarise(store, iteration_id, spec)
    wall = time.perf_counter() - started
    store.update_iteration(
        iteration_id, n=summary.n_samples, score=summary.objective,
        ci_low=summary.objective_ci[0], ci_high=summary.objective_ci[1],
        prompt_tokens=summary.prompt_tokens, completion_tokens=summary.completion_tokens,
        cost=summary.cost, wall_s=wall)
    store.record_iteration_latency(iteration_id)
    return Evaluation(iteration_id=iteration_id, summary=summary, model_calls=counters.model_calls,
                      cache_hits=counters.cache_hits, resumed=len(done), wall_s=wall)


COMMIT_EVERY_S = 5.0


def commit_interval() -> float:
    """Seconds of generation between commits ($FLYWHEEL_COMMIT_EVERY_S, default 5)."""
    return env_seconds("FLYWHEEL_COMMIT_EVERY_S", COMMIT_EVERY_S)


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
    _cache_rows(store, model.fingerprint, [(keys[i], c) for i, c in made.items()])
    return out, len(missing)


def item_scores(store: Store, iteration_id: str, spec: EvalSpec) -> dict[tuple[str, int], tuple[float, bool]]:
    """(score, passed) of the objective grader per (item_key, repeat); errored samples score 0.

    The grader's raw score (whatever the metric): the paired test compares scores and McNemar passes.
    """
    return store.objective_scores(iteration_id, spec.objective_grader)


def paired_comparison(store: Store, spec: EvalSpec, a: str, b: str) -> dict[str, Any]:
    """Paired statistics of iteration b against a over the (item, repeat) keys they share."""
    return paired_by_key(item_scores(store, a, spec), item_scores(store, b, spec))


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
    executor: Any = None,
    run_id: str | None = None,
    dataset: Dataset | None = None,
    grader_set: GraderSet | None = None,
) -> EvalResult:
    """Evaluate `spec` on one split and store everything; resume an unfinished identical run.

    `run_id`: the run's id, chosen by the caller (the API stores it on its object first): a run
    with that id is resumed, else created with it; without one, an unfinished identical run is
    resumed. `dataset` and `grader_set`: the spec's, already loaded by the caller (the wheel
    loads them once per run); the caller closes its grader set. `executor`: see `evaluate` (None:
    generate and grade in this process)."""
    started = time.perf_counter()
    dataset = dataset or load_dataset(spec)
    items = select_items(dataset, split, limit)
    if model is None and spec.outputs is not None:  # no model: outputs come from the data
        model = DataOutputs.for_spec(spec, dataset)
    model = model or load_model(spec.model, spec.model_options)
    prompt = prompt or Prompt(messages=spec.messages())

    # A bad image, or images for a text model, fail the run before anything is stored.
    if check_item_images(prompt.messages, items) and model.reads_images is False:
        raise ModelError(f"{model.ref} is a text model: it does not read images, and the prompt has image "
                         "parts (use a vision-language model, docs/vision.md)")
    eval_id = register_eval(store, spec, dataset)
    store.save_prompt(prompt, origin="spec")
    config_key = _config_key(spec, dataset, model, split, limit, prompt, stage)
    existing = store.find_run(run_id) if run_id else store.find_unfinished_run(config_key)
    if existing and existing.config_key != config_key:
        raise FlywheelError(f"run {run_id} is the run of another eval, model, split, limit or prompt "
                            f"({existing.kind}, {existing.model_ref}); give a new run id")
    if existing:
        run_id = existing.id
    else:
        run_id = store.create_run(
            id=run_id, kind="eval", config_key=config_key, eval_id=eval_id, dataset_id=dataset.content_hash,
            model_ref=model.ref, model_fingerprint=model.fingerprint, split=split, item_limit=limit,
            command=command)
    iteration_id = store.iteration_for(
        run_id, 0, stage=stage, model_ref=model.ref, model_fingerprint=model.fingerprint,
        prompt_id=prompt.id, split=split)

    try:
        graders_here = grader_set or GraderSet(spec.graders)
        try:
            outcome = evaluate(spec, store, iteration_id, items, model, prompt, graders_here,
                               max_errors=max_errors, progress=progress, executor=executor)
        finally:
            if grader_set is None:
                graders_here.close()
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

    wall = time.perf_counter() - started
    store.update_iteration(iteration_id, wall_s=wall, decision="measured")
    summary = outcome.summary.model_copy(update=dict(
        model_calls=outcome.model_calls, cache_hits=outcome.cache_hits, wall_s=wall))
    error = _nothing_measured(store, iteration_id, summary)
    store.finish_run(run_id, "failed" if error else "completed", summary)
    return EvalResult(
        run_id=run_id, iteration_id=iteration_id, eval_name=spec.name, model=model.ref, split=split,
        n_samples=summary.n_samples, n_errors=summary.n_errors, pass_rate=summary.pass_rate,
        pass_ci=tuple(summary.pass_ci), objective=summary.objective, graders=summary.graders,
        prompt_tokens=summary.prompt_tokens, completion_tokens=summary.completion_tokens,
        model_calls=outcome.model_calls, cache_hits=outcome.cache_hits, resumed=outcome.resumed,
        wall_s=wall, status="failed" if error else "completed", error=error)


def _nothing_measured(store: Store, iteration_id: str, summary: EvalSummary) -> str | None:
    """The first error, when every sample errored or one grader's grade errored on every sample
    (a judge that does not load, a base_url nobody answers): a 0% pass rate that measured nothing.
    None when anything was measured."""
    failing = [g.name for g in summary.graders if summary.n_samples and g.errors >= summary.n_samples]
    if not summary.n_samples or (summary.n_errors < summary.n_samples and not failing):
        return None
    for sample in store.samples_with_grades(iteration_id):
        where = f"item {sample.item_key!r}"
        if sample.error:
            return f"every sample failed; the first, {where}: {sample.error[:500]}"
        for grade in sample.grades:
            if grade.grader in failing and grade.error:
                said = grade.error + (f": {grade.error_details}" if grade.error_details else "")
                return f"grader {grade.grader!r} failed on every sample; the first, {where}: {said[:500]}"
    return f"grader {failing[0]!r} failed on every sample"


def _prepare(todo: list[tuple[Item, int]], prompt: Prompt, model: Model, sampling: Sampling,
             response_format: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
             tool_choice: Any = None) -> list[_Pending]:
    fingerprint = model.fingerprint
    unique = list({item.key: item for item, _ in todo}.values())
    rendered = dict(zip((i.key for i in unique), prompt.render_many(unique)))
    pending = []
    for item, repeat in todo:
        messages = rendered[item.key]
        if isinstance(messages, str):
            pending.append(_Pending(item=item, repeat=repeat, messages=None, error=messages))
            continue
        request = ChatRequest(messages=messages, sampling=sampling, repeat=repeat, response_format=response_format,
                              tools=tools, tool_choice=tool_choice)
        pending.append(_Pending(item=item, repeat=repeat, messages=messages, request=request,
                                cache_key=cache_key(fingerprint, request)))
    return pending


def _generate(store: Store, model: Model, chunk: list[_Pending], counters: _Counters, *, stream: bool = True) -> None:
    """Fill `completion` (or `error`) for each pending sample, isolating a failing request, and cache
    each completion the moment its call returns (`model.stream`; `stream=False`: one `generate`
    call, after a stream failed), before grading and commit: a kill re-pays none of the calls that
    came back."""
    requests = [p.request for p in chunk]
    counters.model_calls += len(requests)
    completions: list[Completion | None] = [None] * len(requests)
    try:
        returned = model.stream(requests) if stream else enumerate(model.generate(requests))  # type: ignore[arg-type]
        for index, completion in returned:
            completions[index] = completion
            _cache_rows(store, model.fingerprint, [(chunk[index].cache_key, completion)])
    except FlywheelError:
        raise
    except Exception:  # noqa: BLE001 - retry the rest one by one to find the request that fails
        for index, request in enumerate(requests):
            if completions[index] is not None:
                continue
            try:
                (completions[index],) = model.generate([request])  # type: ignore[list-item]
                _cache_rows(store, model.fingerprint, [(chunk[index].cache_key, completions[index])])
            except Exception as exc:  # noqa: BLE001
                completions[index] = Completion(text="", error=f"model_error: {type(exc).__name__}: {exc}")
    for p, completion in zip(chunk, completions):
        if completion is None:
            p.error = "model_error: the model returned no completion for this request"
        elif completion.error:
            p.error = completion.error
        else:
            p.completion = completion


def _cache(store: Store, fingerprint: str, chunk: Sequence[_Pending]) -> None:
    """Cache the completions of `chunk` that a model call just made (not hits, not errors)."""
    _cache_rows(store, fingerprint, [(p.cache_key, p.completion) for p in chunk if not p.cache_hit])


def _cache_rows(store: Store, fingerprint: str, made: Sequence[tuple[str | None, Completion | None]]) -> None:
    """The one path into the completion cache: (key, completion) pairs as a model call returned them."""
    store.cache_completions([
        {"key": key, "model_fingerprint": fingerprint, "output_text": c.text, "finish_reason": c.finish_reason,
         "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "latency_s": c.latency_s,
         "cost": c.cost, "error": c.error,
         "output_tools_json": json.dumps(c.tool_calls, ensure_ascii=False) if c.tool_calls else None}
        for key, c in made if key and c is not None])


CLAIM_LEASE_S = 10.0
CLAIM_POLL_S = 0.2


class _Claims:
    """The requests this process is generating, claimed in the store (`completion_claims`) so that a
    second run of the same eval at the same time waits for their answers in the cache instead of
    paying for them again. A heartbeat thread renews the claims every third of a lease; a claim of a
    process that died (same host, pid gone) or whose lease ran out is free. Used by the chunked path
    (remote models: what costs money); the local stream generates what it was given.
    """

    def __init__(self, store: Store):
        self.store = store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.waiting: list[_Pending] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_Claims":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.store.release_completion_claims(self.owner)

    def _renew(self) -> None:
        store = type(self.store).open(self.store.path)
        try:
            while not self.stop.wait(CLAIM_LEASE_S / 3):
                store.renew_completion_claims(self.owner, CLAIM_LEASE_S)
        finally:
            store.close()

    def split(self, chunk: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """(answered from the cache meanwhile, claimed here to generate); the rest, which another live
        run is generating, waits in `waiting`."""
        keyed = [p for p in chunk if p.cache_key]
        if not keyed:
            return [], chunk
        if self.thread is None and self.store.path != ":memory:":
            self.thread = threading.Thread(target=self._renew, name="flywheel-claims", daemon=True)
            self.thread.start()
        keys = [p.cache_key for p in keyed]
        mine, theirs = self.store.claim_completions(keys, self.owner, CLAIM_LEASE_S)
        dead = {owner for owner in set(theirs.values()) if not _owner_alive(owner)}
        if dead:
            for owner in dead:
                self.store.release_completion_claims(owner)
            mine, theirs = self.store.claim_completions(keys, self.owner, CLAIM_LEASE_S)
        hits = self.store.cached(k for k in keys if k not in mine and k not in theirs)
        answered = []
        for p in keyed:
            row = hits.get(p.cache_key)  # type: ignore[arg-type]
            if row is not None:
                p.completion, p.cache_hit = _completion_of(row), True
                answered.append(p)
        self.waiting += [p for p in keyed if p.cache_key in theirs]
        claimed = [p for p in chunk if not p.cache_key or p.cache_key in mine]
        return answered, claimed

    def take_waiting(self) -> list[_Pending]:
        """The requests left to other runs, after a short wait for their answers."""
        time.sleep(CLAIM_POLL_S)
        waiting, self.waiting = self.waiting, []
        return waiting

    def release(self, chunk: Sequence[_Pending]) -> None:
        self.store.release_completion_claims(self.owner, [p.cache_key for p in chunk if p.cache_key])


def _owner_alive(owner: str) -> bool:
    """Whether the process named in a claim's owner (`host:pid:token`) may still run: False only for
    a pid of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _completion_of(row: dict[str, Any]) -> Completion:
    """A completion-cache row as the completion it cached."""
    return Completion(
        text=row["output_text"], prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
        finish_reason=row["finish_reason"], latency_s=row["latency_s"], cost=row["cost"],
        tool_calls=json.loads(row["output_tools_json"]) if row.get("output_tools_json") else None)


def _stream(store: Store, iteration_id: str, model: Model, grader_set: GraderSet, pending: list[_Pending],
            counters: _Counters, max_errors: int | None, total: int, progress: ProgressFn | None,
            every_s: float) -> None:
    """Generate `pending` as one stream (`model.stream`), grading and committing what has finished
    while the model's running batch stays full: first after one model batch, then every `every_s`
    seconds or four model batches, whichever comes first, as the chunked path does — so a kill
    loses at most that much finished work, and `progress` (which may cancel) is called as often.
    A sample another process stored meanwhile is generated again but stored once (the store keeps
    the first copy). If the stream fails, the requests not yet done go through `_generate`, which
    isolates a failing request.
    """
    counters.model_calls += len(pending)
    finished: list[_Pending] = []
    left = set(range(len(pending)))
    last_commit = time.perf_counter()
    batch = max(1, model.preferred_batch_size)
    most = batch  # finished rows held before a commit: one batch at first, then four

    def commit() -> None:
        nonlocal finished, last_commit, most
        chunk, finished = finished, []
        _write(store, iteration_id, model, grader_set, chunk, counters, max_errors, total, progress)
        last_commit, most = time.perf_counter(), batch * 4

    stream = model.stream([p.request for p in pending])
    while True:
        try:  # only the model's own failures are caught here; a commit's (or a cancel's) propagate
            index, completion = next(stream)
        except StopIteration:
            break
        except FlywheelError:
            commit()  # what finished before the failure is kept
            raise
        except Exception:  # noqa: BLE001 - the rest one batch, then one by one, to find the failing request
            rest = [pending[i] for i in sorted(left)]
            counters.model_calls -= len(rest)
            _generate(store, model, rest, counters, stream=False)
            finished += rest
            break
        p = pending[index]
        p.error, p.completion = (completion.error, None) if completion.error else (None, completion)
        _cache(store, model.fingerprint, [p])
        finished.append(p)
        left.discard(index)
        if len(finished) >= most or time.perf_counter() - last_commit >= every_s:
            commit()
    commit()


def _write(store: Store, iteration_id: str, model: Model, grader_set: GraderSet, chunk: list[_Pending],
           counters: _Counters, max_errors: int | None, total: int, progress: ProgressFn | None,
           grades: list[list[dict[str, Any]]] | None = None) -> None:
    """Grade (unless an executor sent `grades`, one per completed sample) and commit one chunk."""
    if not chunk:
        return
    gradable = [p for p in chunk if p.completion is not None]
    if grades is None:
        grades = grader_set.grade(
            [graders.make_sample(p.completion.text, output_tools=p.completion.tool_calls)  # type: ignore[union-attr]
             for p in gradable],
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
            model_fingerprint=model.fingerprint,
            output_tools_json=json.dumps(c.tool_calls, ensure_ascii=False) if c and c.tool_calls else None))
    store.write_samples(records)
    counters.errors += sum(1 for p in chunk if p.error)
    counters.done += len(chunk)
    if progress:
        progress(counters.done, total)
    if max_errors is not None and counters.errors > max_errors:
        raise TooManyErrors(
            f"{counters.errors} samples failed (more than --max-errors {max_errors}); "
            f"last error: {next(p.error for p in reversed(chunk) if p.error) if any(p.error for p in chunk) else 'see runs show'}")


def summarise(store: Store, iteration_id: str, spec: EvalSpec) -> EvalSummary:
    """Pass rate, per-grader mean with 95% CI, objective, tokens and cost of one iteration."""
    return store.eval_summary(iteration_id, spec.objective_grader, spec.objective.metric)
