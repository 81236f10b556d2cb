"""Moving without the API: the platform's eval / run definitions to a Flywheel eval spec, and back.

    written = import_openai_eval("eval.json", ["items.jsonl"], run_path="run.json", out_dir="evals/mine")
    exported = export_openai_eval(load_eval_spec("evals/mine/eval.yaml"), split="test")  # .bodies: eval, run
    job = import_openai_job(store, "job.json", "train.jsonl", model="local:smollm2")  # a queued API job

An imported eval keeps its `testing_criteria` as graders (the same schema), the run's
`input_messages` template as the spec's input, its `model` (a platform model name becomes
`openai:<name>`) and sampling; items come from the given JSONL files (`{"item": {...}}` lines) or
the run's inline `file_content`. The spec is written beside a `data.jsonl` and loaded back, so a
definition Flywheel cannot run fails here with the spec's own error lines.

A platform fine-tuning job (its JSON object, or the create body) with local copies of its files
becomes a fine-tuning job record in the store, checked as `POST /v1/fine_tuning/jobs` checks it
(`flywheel serve --api` runs it; the API lists it), and optionally our training config (YAML) for
`flywheel train` without the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flywheel.errors import SpecError
from flywheel.spec import EvalSpec, load_eval_spec


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object")
    return data


def _read_items(path: Path) -> list[dict[str, Any]]:
    from flywheel.data import read_jsonl

    items = []
    for number, row in read_jsonl(path, error=SpecError):
        if not isinstance(row.get("item"), dict):
            raise SpecError(f"{path}:{number}: expected {{\"item\": {{...}}}}")
        items.append(row["item"])
    return items


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def _model_ref(model: str | None) -> str:
    if not model:
        return "local:smollm2"
    return model if model.split(":", 1)[0] in ("local", "openai") else f"openai:{model}"


@dataclass
class ImportResult:
    spec_path: Path
    data_path: Path
    items: int
    graders: int


def import_openai_eval(eval_path: str | Path, items_paths: list[str | Path], *, out_dir: str | Path,
                       run_path: str | Path | None = None) -> ImportResult:
    """Write `out_dir/eval.yaml` and `out_dir/data.jsonl` from a platform eval (and run) definition."""
    eval_path = Path(eval_path)
    evaluation = _read_json(eval_path)
    run = _read_json(Path(run_path)) if run_path else {}
    source = run.get("data_source") or {}
    items = [item for path in items_paths for item in _read_items(Path(path))]
    inline = (source.get("source") or {}).get("content")
    if not items and isinstance(inline, list):
        items = [row["item"] for row in inline if isinstance(row, dict) and isinstance(row.get("item"), dict)]
    if not items:
        raise SpecError(f"{eval_path}: no items: give ITEMS.jsonl files or a run whose source has file_content")
    criteria = evaluation.get("testing_criteria")
    if not isinstance(criteria, list) or not criteria:
        raise SpecError(f"{eval_path}: testing_criteria: a non-empty list of graders is required")
    template = ((source.get("input_messages") or {}).get("template")
                or [{"role": "user", "content": "{{item.input}}"}])
    params = source.get("sampling_params") or {}
    spec: dict[str, Any] = {
        "name": evaluation.get("name") or eval_path.stem,
        "description": f"imported from {eval_path.name}" + (f" and {Path(run_path).name}" if run_path else ""),
        "dataset": {"path": "data.jsonl"},
        "input": [{"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in template],
        "model": _model_ref(source.get("model")),
        "sampling": {k: v for k, v in {"temperature": params.get("temperature"), "top_p": params.get("top_p"),
                                       "seed": params.get("seed"),
                                       "max_tokens": params.get("max_completion_tokens")}.items() if v is not None},
        "graders": [{k: v for k, v in c.items() if k != "id"} for c in criteria],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "data.jsonl"
    data_path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    spec_path = out / "eval.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    loaded = load_eval_spec(spec_path)  # the spec's own validation, with file: field: message lines
    return ImportResult(spec_path=spec_path, data_path=data_path, items=len(items), graders=len(loaded.graders))


#: Items above this many bytes of JSON go in a file (the run's source by `file_id`), not inline.
INLINE_ITEMS_BYTES = 1_000_000


@dataclass
class EvalExport:
    """The platform's create bodies for a spec; `items_jsonl` holds the items (`{"item": ...}` lines, the
    upload shape of a purpose=evals file) when the run names them by `file_id` rather than inline."""

    bodies: dict[str, Any]  # {"eval": POST /v1/evals, "run": POST /v1/evals/{id}/runs}
    items: int
    items_jsonl: str | None = None


def export_openai_eval(spec: EvalSpec, *, split: str | None = None, file_id: str | None = None,
                       inline_limit: int = INLINE_ITEMS_BYTES) -> EvalExport:
    """The platform's create bodies for a spec: `eval` (POST /v1/evals) and `run` (POST .../runs).

    The run's items are those of `split` (every item when None). They go inline (`file_content`) when
    small; by reference (`{"type": "file_id", "id": file_id}`) when `file_id` is given or their JSON
    is over `inline_limit` bytes: then `items_jsonl` is the file to upload, and the id is `file_id` or a
    placeholder naming the upload to do."""
    from flywheel.data import load_dataset

    dataset = load_dataset(spec)
    items = dataset.split(split) if split else dataset.items
    if not items:
        raise SpecError(f"{spec.source}: split {split!r} has no items in {dataset.path}")
    fields = dataset.fields
    model = spec.model.removeprefix("openai:")
    rows = [{"item": item.fields} for item in items]
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    by_reference = file_id is not None or len(lines.encode("utf-8")) > inline_limit
    source: dict[str, Any] = ({"type": "file_id", "id": file_id or UPLOAD_PLACEHOLDER} if by_reference
                              else {"type": "file_content", "content": rows})
    bodies = {
        "eval": {"name": spec.name,
                 "data_source_config": {"type": "custom", "include_sample_schema": True,
                                        "item_schema": {"type": "object",
                                                        "properties": {f: {} for f in fields}}},
                 "testing_criteria": spec.graders},
        "run": {"name": f"{spec.name} on {model}" + (f" ({split})" if split else ""),
                "data_source": {"type": "completions", "model": model,
                                "input_messages": {"type": "template", "template": spec.messages()},
                                "sampling_params": {"temperature": spec.sampling.temperature,
                                                    "top_p": spec.sampling.top_p, "seed": spec.sampling.seed,
                                                    "max_completion_tokens": spec.sampling.max_tokens},
                                "source": source}},
    }
    return EvalExport(bodies=bodies, items=len(rows), items_jsonl=lines if by_reference else None)


#: The run's file id until the items file is uploaded (POST /v1/files, purpose "evals").
UPLOAD_PLACEHOLDER = "UPLOAD_items.jsonl_AND_PUT_ITS_FILE_ID_HERE"


@dataclass
class JobImport:
    job: dict[str, Any]  # the job object, as the API shows it
    config: Any  # our SFTSpec / DPOSpec / RFTSpec for it
    config_path: Path | None
    metrics: Any = None  # flywheel.importers.jobs.JobMetrics: the platform job's own, for comparison
    metrics_path: Path | None = None


def import_openai_job(store: Any, job_path: str | Path, training_path: str | Path, *,
                      validation_path: str | Path | None = None, model: str | None = None,
                      project: str = "default", config_out: str | Path | None = None,
                      result_path: str | Path | None = None) -> JobImport:
    """Queue a platform fine-tuning job (JSON) on its local training (and validation) file copies.

    The platform's model names no local model: `model` replaces it (required unless the job's own
    model is a `local:` reference or an `ft:` id made here). Its method and hyper-parameters map to
    our config as the API maps them (flywheel.train.methods via the fine-tuning runner). Every check
    of the API's create applies; a failure is a SpecError naming the job file and the field, and
    nothing is stored. `result_path`: the job's result file (its per-step metrics CSV,
    flywheel.importers.jobs), kept with the queued job (`Store.platform_job_metrics`) and, with
    `config_out`, written beside the config as `<name>.platform-metrics.json`."""
    from flywheel.api.access import check_project
    from flywheel.api.routes.files import store_file
    from flywheel.api.routes.fine_tuning import create_job
    from flywheel.api.runners.fine_tuning import train_config
    from flywheel.web import ApiError

    check_project(project)
    job_path = Path(job_path)
    job = _read_json(job_path)
    base = model or job.get("model")
    if not isinstance(base, str) or not base.startswith(("local:", "ft:")):
        raise SpecError(f"{job_path}: model: {job.get('model')!r} is a platform model; give the local base to "
                        "train with --model (e.g. local:smollm2)")
    if job.get("validation_file") and validation_path is None:
        raise SpecError(f"{job_path}: validation_file: {job['validation_file']} is a platform file; give its "
                        "content with --validation-file (or drop it from the job)")
    metrics = None
    if result_path is not None:
        from flywheel.importers.jobs import read_result_file

        metrics = read_result_file(result_path, job=job)  # checked before anything is stored
    body = {key: job[key] for key in ("method", "hyperparameters", "suffix", "seed", "metadata")
            if job.get(key) is not None}
    if "method" in body:  # a job object echoes `hyperparameters` beside `method`; the method wins
        body.pop("hyperparameters", None)
    stored: list[dict[str, Any]] = []
    try:
        for name, path in (("training_file", training_path), ("validation_file", validation_path)):
            if path is None:
                continue
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
            row = store_file(store, data, Path(path).name, "fine-tune", project)
            stored.append(row)
            body[name] = row["id"]
        with store.transaction():  # the job and its platform metrics, or neither
            created = create_job(store, {**body, "model": base}, project)
            if metrics is not None:
                store.set_platform_job_metrics(created["id"], metrics.to_dict())
    except (ApiError, SpecError) as exc:
        for row in stored:  # nothing is kept unless the job is
            store.api_delete("api_files", row["id"])
            Path(row["path"]).unlink(missing_ok=True)
        if isinstance(exc, SpecError):
            raise
        where = {"training_file": str(training_path), "validation_file": str(validation_path),
                 "file": str(training_path)}.get(exc.param or "", str(job_path))
        named = exc.param and where == str(job_path) and not exc.message.startswith(exc.param)
        raise SpecError(f"{where}: {exc.param + ': ' if named else ''}{exc.message}") from None
    config = train_config(store.api_get("api_fine_tuning_jobs", created["id"]))
    written = None
    if config_out is not None:
        written = Path(config_out)
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    metrics_path = None
    if metrics is not None and written is not None:
        metrics_path = written.with_name(written.stem + ".platform-metrics.json")
        metrics_path.write_text(json.dumps(metrics.to_dict(), indent=2) + "\n", encoding="utf-8")
    return JobImport(job=created, config=config, config_path=written, metrics=metrics, metrics_path=metrics_path)
