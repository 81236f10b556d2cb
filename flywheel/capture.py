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
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import graders

from flywheel.data import load_dataset
from flywheel.errors import FlywheelError
from flywheel.harness import GraderSet, ProgressFn, register_eval, run_eval, summarise
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.store import SampleRecord, Store, new_id

REFERENCE = "reference:"


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
    row = store.db.execute(
        "select i.prompt_id, i.score from iterations i join runs r on r.id = i.run_id join evals e"
        " on e.id = r.eval_id where e.name = ? and i.split = 'valid' and i.model_ref = ? and i.score is not null"
        " and i.stage != 'capture' and r.status = 'completed' order by i.score desc, i.created_at limit 1",
        [spec.name, spec.model]).fetchone()
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
            command: str | None = None, progress: ProgressFn | None = None) -> CaptureResult:
    """Sample `n` teacher outputs per `split` item, grade and store them, record the lineage.

    `temperature` defaults to the spec's for n == 1 and 1.0 for best-of-K (n > 1 at temperature 0
    would give K copies of one output and is refused). `prompt`: `best` (default), `spec` or a
    stored prompt id. Raises CaptureError when every teacher call failed."""
    if split != "train":
        raise CaptureError(f"capture draws training data, so only from the train split (got {split!r}): "
                           "valid selects checkpoints and test is reported, neither is trained on")
    if n < 1:
        raise CaptureError(f"--n must be at least 1, got {n}")
    if teacher.startswith(REFERENCE):
        return _capture_reference(spec, store, teacher, limit=limit, command=command)
    if ":" not in teacher:  # a checkpoint id: sample the trained model (on-policy pairs for DPO)
        from flywheel.train.checkpoints import load_checkpoint

        teacher = load_checkpoint(store, teacher).model_ref
    if temperature is None:
        temperature = spec.sampling.temperature if n == 1 else 1.0
    if n > 1 and temperature == 0:
        raise CaptureError(f"best-of-{n} needs temperature > 0: at temperature 0 every sample is the same output")
    from flywheel.models import load_model

    started = time.perf_counter()
    chosen, origin = _resolve_prompt(store, spec, prompt)
    # A local teacher (the student, or a checkpoint of it) runs with the spec's local options.
    same_kind = teacher.split(":", 1)[0] == spec.model.split(":", 1)[0] == "local" or teacher == spec.model
    options = {**(spec.model_options if same_kind else {}), **(teacher_options or {})}
    model = load_model(teacher, options)
    sampling = spec.sampling.model_copy(update={"repeats": n, "temperature": temperature, "seed": seed})
    capture_spec = spec.model_copy(update={"sampling": sampling})
    try:
        result = run_eval(capture_spec, store, split=split, limit=limit, model=model, prompt=chosen,
                          max_errors=max_errors, stage="capture", command=command, progress=progress)
    finally:
        model.close()
    store.update_iteration(result.iteration_id, decision="captured", reason=f"teacher {teacher}, prompt: {origin}")
    return _record(store, spec, teacher, model.fingerprint, result.run_id, result.iteration_id, chosen.id, n,
                   temperature, result.model_calls, time.perf_counter() - started)


def _record(store: Store, spec: EvalSpec, teacher: str, fingerprint: str, run_id: str, iteration_id: str,
            prompt_id: str, n: int, temperature: float, model_calls: int, wall: float) -> CaptureResult:
    rows = store.db.execute(
        "select s.item_key, s.error, min(coalesce(g.passed, 0)) as ok, count(g.grader) from samples s"
        " left join grades g on g.sample_id = s.id where s.iteration_id = ? group by s.id",
        [iteration_id]).fetchall()
    passed = [key for key, error, ok, graded in rows if error is None and graded and ok]
    errors = [error for _, error, _, _ in rows if error is not None]
    run = store.get_run(run_id)
    capture_id = new_id("cap")
    record = {"id": capture_id, "eval_name": spec.name, "eval_id": run["eval_id"], "dataset_id": run["dataset_id"],
              "run_id": run_id, "iteration_id": iteration_id, "teacher": teacher, "teacher_fingerprint": fingerprint,
              "prompt_id": prompt_id, "split": "train", "n": n, "temperature": temperature,
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
                       command: str | None) -> CaptureResult:
    """The labelled answers as teacher outputs, graded by the same graders."""
    started = time.perf_counter()
    template = teacher[len(REFERENCE):].strip()
    if not template:
        raise CaptureError("--teacher reference:FIELD needs a field (or a {{item.x}} template), e.g. reference:label")
    if "{{" not in template:
        template = "{{item." + template + "}}"
    dataset = load_dataset(spec)
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
    grader_set = GraderSet(spec.graders)
    try:
        gradable = [i for i, out in enumerate(outputs) if out is not None]
        grades = grader_set.grade([graders.make_sample(outputs[i]) for i in gradable],  # type: ignore[arg-type]
                                  [items[i].fields for i in gradable])
    finally:
        grader_set.close()
    by_index = dict(zip(gradable, grades))
    store.write_samples([SampleRecord(
        iteration_id=iteration_id, item_key=item.key, repeat=0,
        input_json=json.dumps(rendered[i], ensure_ascii=False) if not isinstance(rendered[i], str) else "null",
        output_text=outputs[i], finish_reason="stop" if outputs[i] is not None else None, error=failures[i],
        grades=by_index.get(i, [])) for i, item in enumerate(items)])
    summary = summarise(store, iteration_id, spec)
    store.update_iteration(iteration_id, n=summary["n_samples"], score=summary["objective"],
                           ci_low=summary["objective_ci"][0], ci_high=summary["objective_ci"][1],
                           decision="captured", reason=f"labelled answers ({template}) as teacher outputs")
    store.finish_run(run_id, "completed", summary)
    return _record(store, spec, teacher, teacher, run_id, iteration_id, prompt.id, 1, 0.0, 0,
                   time.perf_counter() - started)
