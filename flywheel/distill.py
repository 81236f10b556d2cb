"""Capture from a teacher: K graded outputs per train item, stored with their lineage.

    result = capture(spec, store, teacher="openai:gpt-4.1", n=4)            # a hosted or served teacher
    result = capture(spec, store, teacher="local:smollm2", n=8)              # best-of-K self-capture
    result = capture(spec, store, teacher="reference:label")                 # the labelled answers
    result = capture(spec, store, teacher="sft-20261122-...", n=4)           # a checkpoint, for DPO pairs

The teacher answers every train item `n` times with the best prompt so far (the highest-scoring
prompt on `valid` for the eval's model, else the spec's), through the harness: cached, resumable,
graded by the eval's own graders. The samples land in an iteration with stage `capture`, and a
`teacher_captures` row records teacher, prompt, K and temperature. Training sets are built from the
passing ones (rejection sampling: the graders are the filter).

`reference:FIELD` (or `reference:{{item.field}}`) is the offline teacher with labelled data: it
"answers" each item with that field, and the same graders check it. It is honest about what it is:
the rows are the labels, not a model's outputs.

Unlabelled inputs (an extra JSONL/CSV, or proxy captures filtered by metadata) have no reference
the graders could check, so `capture_unlabelled` keeps what **self-consistency** accepts: the
teacher answers each input K times at a temperature, and the majority answer (after whitespace and
case folding) is accepted when at least `min_agreement` of the K agree. The verdict is stored as a
`self_consistency` grade of each sample (score = the agreement), so training-set builders read it
like any grade. Inputs identical to a valid or test item are dropped first (the leak guard).

    result = capture_unlabelled(spec, store, "local:smollm2", inputs=load_inputs(spec, inputs_spec),
                                prompt=incumbent_prompt, n=5, temperature=0.7)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import graders
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.data import Dataset, Item, load_dataset
from flywheel.errors import FlywheelError
from flywheel.grading import GraderSet
from flywheel.harness import ProgressFn, evaluate, register_eval, run_eval, summarise
from flywheel.models import cached_model
from flywheel.prompt import Prompt
from flywheel.spec import DatasetSpec, EvalSpec, SplitSpec
from flywheel.store import SampleRecord, Store, new_id
from flywheel.store.rows import SampleWithGrades

REFERENCE = "reference:"
SELF_CONSISTENCY = "self_consistency"


class CaptureError(FlywheelError):
    """A capture cannot run (bad split or settings) or every teacher call failed."""


@dataclass
class CaptureResult:
    id: str
    teacher: str
    run_id: str
    iteration_id: str
    prompt_id: str
    n: int
    temperature: float
    n_items: int
    n_samples: int
    n_passed: int
    items_with_pass: int
    n_errors: int
    model_calls: int
    wall_s: float

    @property
    def pass_rate(self) -> float:
        return self.n_passed / self.n_samples if self.n_samples else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass_rate": self.pass_rate}


def best_prompt(store: Store, spec: EvalSpec) -> tuple[Prompt, str]:
    """The prompt with the best `valid` score for this eval and its model, else the spec's prompt.
    Returns the prompt and where it came from."""
    row = store.best_valid_prompt(spec.name, spec.model)
    if row:
        try:
            return Prompt.from_json(store.get_prompt(row[0])), f"best on valid ({row[1]:.3f}, {row[0]})"
        except FlywheelError:
            pass
    return Prompt(messages=spec.messages()), "spec"


def _resolve_prompt(store: Store, spec: EvalSpec, prompt: str | None) -> tuple[Prompt, str]:
    if prompt in (None, "best"):
        return best_prompt(store, spec)
    if prompt == "spec":
        return Prompt(messages=spec.messages()), "spec"
    try:
        return Prompt.from_json(store.get_prompt(prompt)), f"stored {prompt}"
    except FlywheelError as exc:
        raise CaptureError(f"--prompt {prompt}: {exc}") from None


def capture(spec: EvalSpec, store: Store, teacher: str, *, n: int = 4, temperature: float | None = None,
            split: str = "train", limit: int | None = None, prompt: str | None = None,
            teacher_options: dict[str, Any] | None = None, seed: int = 0, max_errors: int | None = None,
            command: str | None = None, progress: ProgressFn | None = None, dataset: Dataset | None = None,
            grader_set: GraderSet | None = None) -> CaptureResult:
    """Sample `n` teacher outputs per `split` item, grade and store them, record the lineage.

    `temperature` defaults to the spec's for n == 1 and 1.0 for best-of-K (n > 1 at temperature 0
    would give K copies of one output and is refused). `prompt`: `best` (default), `spec` or a
    stored prompt id. `dataset`, `grader_set`: the spec's, already loaded by the caller (the
    wheel's). Raises CaptureError when every teacher call failed."""
    if split != "train":
        raise CaptureError(f"capture draws training data, so only from the train split (got {split!r}): "
                           "valid selects checkpoints and test is reported, neither is trained on")
    if n < 1:
        raise CaptureError(f"--n must be at least 1, got {n}")
    if teacher.startswith(REFERENCE):
        return _capture_reference(spec, store, teacher, limit=limit, command=command, dataset=dataset,
                                  grader_set=grader_set)
    if ":" not in teacher:  # a checkpoint id: sample the trained model (on-policy pairs for DPO)
        from flywheel.train.checkpoints import load_checkpoint

        teacher = load_checkpoint(store, teacher).model_ref
    if temperature is None:
        temperature = spec.sampling.temperature if n == 1 else 1.0
    if n > 1 and temperature == 0:
        raise CaptureError(f"best-of-{n} needs temperature > 0: at temperature 0 every sample is the same output")

    started = time.perf_counter()
    chosen, origin = _resolve_prompt(store, spec, prompt)
    # A local teacher (the student, or a checkpoint of it) runs with the spec's local options.
    same_kind = teacher.split(":", 1)[0] == spec.model.split(":", 1)[0] == "local" or teacher == spec.model
    options = {**(spec.model_options if same_kind else {}), **(teacher_options or {})}
    # The process's model (flywheel.models.cached_model): in a wheel the teacher is usually the
    # incumbent, already loaded; a second copy of its weights would only add to the peak.
    model = cached_model(teacher, options)
    sampling = spec.sampling.model_copy(update={"repeats": n, "temperature": temperature, "seed": seed})
    capture_spec = spec.model_copy(update={"sampling": sampling})
    result = run_eval(capture_spec, store, split=split, limit=limit, model=model, prompt=chosen,
                      max_errors=max_errors, stage="capture", command=command, progress=progress,
                      dataset=dataset, grader_set=grader_set)
    store.update_iteration(result.iteration_id, decision="captured", reason=f"teacher {teacher}, prompt: {origin}")
    return _record(store, spec, teacher, model.fingerprint, result.run_id, result.iteration_id, chosen.id, n,
                   temperature, result.model_calls, time.perf_counter() - started)


def _record(store: Store, spec: EvalSpec, teacher: str, fingerprint: str, run_id: str, iteration_id: str,
            prompt_id: str, n: int, temperature: float, model_calls: int, wall: float,
            split: str = "train") -> CaptureResult:
    rows = store.sample_outcomes(iteration_id)
    passed = [key for key, _, ok in rows if ok]
    errors = [error for _, error, _ in rows if error is not None]
    run = store.get_run(run_id)
    capture_id = new_id("cap")
    record = {"id": capture_id, "eval_name": spec.name, "eval_id": run.eval_id, "dataset_id": run.dataset_id,
              "run_id": run_id, "iteration_id": iteration_id, "teacher": teacher, "teacher_fingerprint": fingerprint,
              "prompt_id": prompt_id, "split": split, "n": n, "temperature": temperature,
              "n_items": len({r[0] for r in rows}), "n_samples": len(rows), "n_passed": len(passed),
              "items_with_pass": len(set(passed)), "n_errors": len(errors)}
    store.add_teacher_capture(record)
    result = CaptureResult(id=capture_id, teacher=teacher, run_id=run_id, iteration_id=iteration_id,
                           prompt_id=prompt_id, n=n, temperature=temperature, n_items=record["n_items"],
                           n_samples=len(rows), n_passed=len(passed), items_with_pass=len(set(passed)),
                           n_errors=len(errors), model_calls=model_calls, wall_s=wall)
    if rows and len(errors) == len(rows):
        raise CaptureError(f"capture {capture_id}: all {len(rows)} teacher calls failed ({teacher}); first error: "
                           f"{errors[0]}")
    return result


def _capture_reference(spec: EvalSpec, store: Store, teacher: str, *, limit: int | None,
                       command: str | None, dataset: Dataset | None = None,
                       grader_set: GraderSet | None = None) -> CaptureResult:
    """The labelled answers as teacher outputs, graded by the same graders."""
    started = time.perf_counter()
    template = teacher[len(REFERENCE):].strip()
    if not template:
        raise CaptureError("--teacher reference:FIELD needs a field (or a {{item.x}} template), e.g. reference:label")
    if "{{" not in template:
        template = "{{item." + template + "}}"
    dataset = dataset or load_dataset(spec)
    items = dataset.split("train")[:limit] if limit else dataset.split("train")
    if not items:
        raise CaptureError(f"{dataset.path}: the train split has no items")
    prompt = Prompt(messages=spec.messages())
    eval_id = register_eval(store, spec, dataset)
    store.save_prompt(prompt, origin="spec")
    run_id = store.create_run(kind="capture", config_key=new_id("reference"), eval_id=eval_id,
                              dataset_id=dataset.content_hash, model_ref=teacher, model_fingerprint=teacher,
                              split="train", item_limit=limit, command=command)
    iteration_id = store.iteration_for(run_id, 0, stage="capture", model_ref=teacher, model_fingerprint=teacher,
                                       prompt_id=prompt.id, split="train")
    outputs: list[str | None] = []
    failures: list[str | None] = []
    for item in items:
        try:
            outputs.append(graders.render_template(template, item=item.fields))
            failures.append(None)
        except graders.TemplateVariableError as exc:
            outputs.append(None)
            failures.append(f"invalid_variable_error: {exc}")
    rendered = prompt.render_many(items)
    graders_here = grader_set or GraderSet(spec.graders)
    try:
        gradable = [i for i, out in enumerate(outputs) if out is not None]
        grades = graders_here.grade([graders.make_sample(outputs[i]) for i in gradable],  # type: ignore[arg-type]
                                    [items[i].fields for i in gradable])
    finally:
        if grader_set is None:
            graders_here.close()
    by_index = dict(zip(gradable, grades))
    store.write_samples([SampleRecord(
        iteration_id=iteration_id, item_key=item.key, repeat=0,
        input_json=json.dumps(rendered[i], ensure_ascii=False) if not isinstance(rendered[i], str) else "null",
        output_text=outputs[i], finish_reason="stop" if outputs[i] is not None else None, error=failures[i],
        grades=by_index.get(i, [])) for i, item in enumerate(items)])
    summary = summarise(store, iteration_id, spec)
    store.update_iteration(iteration_id, n=summary.n_samples, score=summary.objective,
                           ci_low=summary.objective_ci[0], ci_high=summary.objective_ci[1],
                           decision="captured", reason=f"labelled answers ({template}) as teacher outputs")
    store.finish_run(run_id, "completed", summary)
    return _record(store, spec, teacher, teacher, run_id, iteration_id, prompt.id, 1, 0.0, 0,
                   time.perf_counter() - started)


# -- unlabelled inputs, accepted by self-consistency -----------------------------------------------
class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptureFilterSpec(_Settings):
    """Proxy captures (`flywheel proxy`) as unlabelled inputs: their last user message becomes a field."""

    field: str = Field(description="Item field that receives each capture's last user message, e.g. text.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Metadata values a capture must carry.")
    since: str | None = Field(default=None, description="Only captures at or after this ISO time.")
    until: str | None = Field(default=None, description="Only captures before this ISO time.")
    model: str | None = Field(default=None, description="Only captures of this model.")


class InputsSpec(_Settings):
    """Unlabelled inputs for distillation: a file of items (no labels needed), or proxy captures."""

    path: str | None = Field(default=None, description="JSONL or CSV of items, relative to the run spec.")
    format: Literal["jsonl", "csv"] | None = Field(default=None, description="File format; from the suffix.")
    id_field: str | None = Field(default=None, description="Field holding a stable id; the row number if unset.")
    columns: dict[str, str] = Field(default_factory=dict, description="Item field -> source column.")
    captures: CaptureFilterSpec | None = Field(default=None, description="Proxy captures instead of a file.")
    n: int = Field(default=5, ge=2, le=64, description="Teacher samples per input (the self-consistency vote).")
    temperature: float = Field(default=0.7, gt=0, le=2, description="Teacher temperature for the vote.")
    min_agreement: float = Field(default=0.6, gt=0.5, le=1, description="Share of the n that must agree.")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many inputs.")

    @model_validator(mode="after")
    def _one_source(self) -> "InputsSpec":
        if (self.path is None) == (self.captures is None):
            raise ValueError("give exactly one of `path` or `captures`")
        return self


def load_inputs(spec: EvalSpec, inputs: InputsSpec, store: Store, base_dir: Path | None = None) -> Dataset:
    """The unlabelled inputs as a dataset whose items are all in split `unlabelled` (keys prefixed
    `u:`), read with the eval's loader rules (the same errors, templates checked)."""
    if inputs.captures is not None:
        return _inputs_from_captures(store, inputs.captures, inputs.limit)
    path = Path(inputs.path)  # type: ignore[arg-type]
    path = path if path.is_absolute() else (base_dir or Path.cwd()) / path
    dataset_spec = DatasetSpec(path=str(path.resolve()), format=inputs.format, columns=inputs.columns,
                               id_field=inputs.id_field)
    loaded = load_dataset(spec.model_copy(update={"dataset": dataset_spec, "split": SplitSpec(ratios={"train": 1.0})}))
    items = [Item(key=f"u:{item.key}", fields=item.fields, split="unlabelled", line=item.line, source=item.source,
                  image_access=item.image_access)
             for item in loaded.items[:inputs.limit]]
    return Dataset(path=loaded.path, content_hash=loaded.content_hash, items=items)


def _inputs_from_captures(store: Store, chosen: CaptureFilterSpec, limit: int | None) -> Dataset:
    rows = store.query_captures(metadata=chosen.metadata, since=chosen.since, until=chosen.until,
                                model=chosen.model, outcome="ok", limit=limit)
    items = []
    for row in rows:
        messages = (json.loads(row.request_json or "{}") or {}).get("messages") or []
        user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if isinstance(user, list):  # content parts: keep the text
            user = "".join(p.get("text", "") for p in user if isinstance(p, dict))
        if isinstance(user, str) and user.strip():
            items.append(Item(key=f"u:cap-{row.id}", fields={chosen.field: user}, split="unlabelled", line=row.id,
                              capture_id=row.id))
    if not items:
        raise CaptureError(f"no proxy captures match {chosen.model_dump(exclude_none=True)} (with a user message)")
    digest = hashlib.sha256(json.dumps([(i.key, i.fields) for i in items], sort_keys=True).encode()).hexdigest()[:16]
    return Dataset(path=Path(store.path).resolve(), content_hash=f"captures-{digest}", items=items)


def drop_leaks(spec: EvalSpec, prompt: Prompt, inputs: list[Item],
               dataset: Dataset | None = None) -> tuple[list[Item], int]:
    """Inputs whose rendered messages equal a valid or test item's are dropped: training on them
    would leak what selection and the report measure. Returns the kept inputs and the count dropped.
    `dataset`: the spec's, already loaded by the caller."""
    dataset = dataset or load_dataset(spec)
    guarded = dataset.split("valid") + dataset.split("test")
    seen = {json.dumps(m, sort_keys=True) for m in prompt.render_many(guarded) if not isinstance(m, str)}
    kept = [item for item, messages in zip(inputs, prompt.render_many(inputs))
            if isinstance(messages, str) or json.dumps(messages, sort_keys=True) not in seen]
    return kept, len(inputs) - len(kept)



def leaked(spec: EvalSpec, texts: list[str], dataset: Dataset | None = None) -> list[bool]:
    """Whether each user text (live traffic: flywheel.service) is the user turn of a valid or test
    item as the eval renders it: the leak guard of `drop_leaks` for inputs that are not items."""
    dataset = dataset or load_dataset(spec)
    guarded = set()
    for messages in Prompt(messages=spec.messages()).render_many(dataset.split("valid") + dataset.split("test")):
        if not isinstance(messages, str):
            guarded |= {m["content"].strip() for m in messages if m["role"] == "user" and isinstance(m["content"], str)}
    return [text.strip() in guarded for text in texts]

def vote(outputs: list[str | None]) -> tuple[str | None, float]:
    """The majority answer among samples (whitespace and case folded) and its share of all samples.

    >>> vote(["card_arrival", "Card_arrival ", "pin_blocked", None])
    ('card_arrival', 0.5)
    """
    folded = [" ".join(o.split()).casefold() for o in outputs if o is not None and o.strip()]
    if not folded:
        return None, 0.0
    answer, count = Counter(folded).most_common(1)[0]
    return answer, count / len(outputs)


def capture_unlabelled(spec: EvalSpec, store: Store, teacher: str, *, inputs: Dataset, prompt: Prompt,
                       n: int = 5, temperature: float = 0.7, min_agreement: float = 0.6, seed: int = 0,
                       teacher_options: dict[str, Any] | None = None, command: str | None = None,
                       progress: ProgressFn | None = None, dataset: Dataset | None = None) -> CaptureResult:
    """Sample `n` teacher outputs per unlabelled input with `prompt`, accept the majority answer by
    self-consistency, store samples, votes and lineage (split `unlabelled`). Resumable like an eval.
    `dataset`: the spec's, already loaded by the caller."""
    if n < 2:
        raise CaptureError("self-consistency needs at least 2 samples per input (n >= 2)")
    started = time.perf_counter()
    dataset = dataset or load_dataset(spec)
    items, leaked = drop_leaks(spec, prompt, inputs.items, dataset)
    if not items:
        raise CaptureError(f"{inputs.path}: no unlabelled inputs left" + (f" ({leaked} equal valid/test items)" if leaked else ""))
    eval_id = register_eval(store, spec, dataset)
    store.save_dataset(inputs.content_hash, str(inputs.path), items)
    store.save_prompt(prompt, origin="teacher")
    same_kind = teacher.split(":", 1)[0] == spec.model.split(":", 1)[0] == "local" or teacher == spec.model
    model = cached_model(teacher, {**(spec.model_options if same_kind else {}), **(teacher_options or {})})
    sampling = spec.sampling.model_copy(update={"repeats": n, "temperature": temperature, "seed": seed})
    capture_spec = spec.model_copy(update={"sampling": sampling})
    config_key = hashlib.sha256(json.dumps(["unlabelled", spec.fingerprint(), inputs.content_hash, model.fingerprint,
                                            prompt.id, n, temperature, seed, len(items)]).encode()).hexdigest()[:24]
    existing = store.find_unfinished_run(config_key)
    run_id = existing.id if existing else store.create_run(
        kind="capture", config_key=config_key, eval_id=eval_id, dataset_id=inputs.content_hash, model_ref=teacher,
        model_fingerprint=model.fingerprint, split="unlabelled", command=command)
    iteration_id = store.iteration_for(run_id, 0, stage="capture", model_ref=teacher,
                                       model_fingerprint=model.fingerprint, prompt_id=prompt.id, split="unlabelled")
    grader_set = GraderSet([])  # no labels to grade against: the vote below is the filter
    try:
        outcome = evaluate(capture_spec, store, iteration_id, items, model, prompt, grader_set, progress=progress)
    finally:
        grader_set.close()
    by_item: dict[str, list[SampleWithGrades]] = {}
    for sample in store.samples_with_grades(iteration_id):
        by_item.setdefault(sample.item_key, []).append(sample)
    grades = []
    for key, samples in by_item.items():
        answer, share = vote([None if s.error else s.output_text for s in samples])
        accepted = answer is not None and share >= min_agreement
        for sample in samples:
            mine = " ".join((sample.output_text or "").split()).casefold()
            agrees = accepted and not sample.error and mine == answer
            grades.append({"sample_id": sample.id, "grader": SELF_CONSISTENCY, "score": share if agrees else 0.0,
                           "passed": agrees, "details": {"majority": answer, "agreement": share, "n": len(samples)},
                           "feedback": (f"{share:.0%} of {len(samples)} samples agree on this answer" if agrees else
                                        f"majority {answer!r} at {share:.0%} (needs {min_agreement:.0%})"
                                        if answer != mine else f"agreement {share:.0%} below {min_agreement:.0%}")})
    store.add_grades(grades)
    summary = summarise(store, iteration_id, capture_spec)
    store.update_iteration(iteration_id, decision="captured",
                           reason=f"teacher {teacher} on {len(items)} unlabelled inputs, self-consistency "
                                  f">= {min_agreement:.0%} of {n}" + (f"; {leaked} inputs equal to valid/test items dropped"
                                                                       if leaked else ""))
    store.finish_run(run_id, "completed", summary)
    return _record(store, spec, teacher, model.fingerprint, run_id, iteration_id, prompt.id, n, temperature,
                   outcome.model_calls, time.perf_counter() - started, split="unlabelled")


def capture_unlabelled_file(spec: EvalSpec, store: Store, teacher: str, path: str, *, id_field: str | None = None,
                            n: int = 5, temperature: float | None = None, min_agreement: float = 0.6,
                            prompt: str | None = None, limit: int | None = None,
                            teacher_options: dict[str, Any] | None = None, command: str | None = None,
                            progress: ProgressFn | None = None) -> CaptureResult:
    """`flywheel capture --inputs FILE`: unlabelled inputs from a file, the teacher with the best
    (or a named) prompt, kept by self-consistency."""
    if n < 2:
        raise CaptureError(f"--inputs needs --n of at least 2 (the self-consistency vote), got {n}")
    inputs = load_inputs(spec, InputsSpec(path=path, id_field=id_field, n=n, limit=limit,
                                          min_agreement=min_agreement), store)
    if ":" not in teacher:  # a checkpoint id
        from flywheel.train.checkpoints import load_checkpoint

        teacher = load_checkpoint(store, teacher).model_ref
    chosen, _ = _resolve_prompt(store, spec, prompt)
    return capture_unlabelled(spec, store, teacher, inputs=inputs, prompt=chosen, n=n,
                              temperature=0.7 if temperature is None else temperature, min_agreement=min_agreement,
                              teacher_options=teacher_options, command=command, progress=progress)
