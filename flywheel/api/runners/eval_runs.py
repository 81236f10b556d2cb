"""What an eval run is: an `EvalSpec` built from the API objects, run by the harness in the queue.

The eval's `testing_criteria` become the spec's graders, the run's `data_source` its dataset
(the items, written as JSONL beside the store), input messages, model and sampling. The harness
stores samples and grades as for `flywheel eval`, so `flywheel report` and the review app show
API runs too; output items and result counts are read back from those rows. A run killed with the
server resumes: the same spec finds its unfinished harness run.

    spec = build_spec(eval_row, run_row)        # flywheel.spec.EvalSpec
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from flywheel.api.errors import invalid
from flywheel.api.jobs import JobContext
from flywheel.api.platform import model_for
from flywheel.errors import FlywheelError
from flywheel.harness import run_eval
from flywheel.models import ChatRequest, Completion, Model, cached_model
from flywheel.spec import EvalSpec, parse_eval_spec
from flywheel.store import Store, new_id, unix_seconds

RUN_STATUS = {"succeeded": "completed", "failed": "failed", "cancelled": "canceled"}
ROLES = ("system", "developer", "user", "assistant")


def content_text(content: Any, param: str) -> str:
    """A message's content as text: a string, an `input_text` part, or a list of text parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise invalid(f"{param}: only text content is supported (a string or input_text parts).", param)
    return "".join(texts)


def template_messages(input_messages: Any) -> list[dict[str, str]]:
    """The `{role, content}` list of an `input_messages` template (400 naming the bad message)."""
    param = "data_source.input_messages"
    if not isinstance(input_messages, dict) or input_messages.get("type") != "template":
        kind = input_messages.get("type") if isinstance(input_messages, dict) else input_messages
        raise invalid(f"{param}: type must be 'template' (item_reference is not supported yet), got {kind!r}.", param)
    template = input_messages.get("template")
    if not isinstance(template, list) or not template:
        raise invalid(f"{param}.template must be a non-empty list of messages.", param + ".template")
    messages = []
    for index, message in enumerate(template):
        where = f"{param}.template[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"{where}: a message needs a role among {', '.join(ROLES)}.", where)
        messages.append({"role": message["role"], "content": content_text(message.get("content"), where)})
    return messages


ROW_FIELD = "_row"  # the row index a `jsonl` run's items carry to its RecordedModel


def recorded_path(dataset: Path) -> Path:
    """Where a `jsonl` run keeps its given outputs, beside its items."""
    return dataset.with_suffix(".outputs.json")


def provider_path(dataset: Path) -> Path:
    """Where a run keeps the options of the `openai:` provider an admin configured for its model
    (base URL and key variable: the server's, never the caller's; flywheel.api.model_access)."""
    return dataset.with_suffix(".provider.json")


class RecordedModel(Model):
    """The "model" of a `jsonl` run: it answers each item with the sample the user gave for it.

    Its prompt is the item's row index (`{{item._row}}`), so the harness stores, caches, grades and
    resumes these samples exactly as generated ones."""

    ref = "recorded"

    def __init__(self, outputs: list[str]):
        self.outputs = outputs
        digest = hashlib.sha256(json.dumps(outputs, ensure_ascii=False).encode()).hexdigest()[:16]
        self._fingerprint = f"recorded:{digest}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        return [Completion(text=self.outputs[int(r.messages[-1]["content"])]) for r in requests]


def is_recorded(source: dict[str, Any]) -> bool:
    """Whether a run grades given outputs (a `jsonl` run, or stored completions graded as they are)."""
    inner = source.get("source") if isinstance(source.get("source"), dict) else {}
    return source.get("type") == "jsonl" or inner.get("type") in ("stored_completions", "responses")


def chat_response_format(text_format: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's `text.format` (json_schema flattened) as a chat `response_format`."""
    if text_format.get("type") == "json_schema" and "json_schema" not in text_format:
        return {"type": "json_schema", "json_schema": {k: v for k, v in text_format.items() if k != "type"}}
    return text_format


def build_spec(eval_row: dict[str, Any], run_row: dict[str, Any], *, batch_size: int = 8,
               store: Store | None = None) -> EvalSpec:
    """The harness spec of an API eval run; 400 when the run cannot be expressed as one. With
    `store`, an `ft:` model made on this server (in the run's project) becomes its adapter's reference."""
    source = json.loads(run_row["data_source_json"])
    params = dict(source.get("sampling_params") or {})
    if isinstance((params.get("text") or {}).get("format"), dict):  # a `responses` run's response format
        params.setdefault("response_format", chat_response_format(params["text"]["format"]))
    model = source.get("model")
    if is_recorded(source):
        model = RecordedModel.ref
        source = {**source, "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.%s}}" % ROW_FIELD}]}}
    if not isinstance(model, str) or not model:
        raise invalid("data_source.model: a Flywheel model reference is required (e.g. local:smollm2).",
                      "data_source.model")
    if model.startswith("ft:") and store is not None:

        try:
            model = model_for(store, model, run_row.get("project") or "default")
        except FlywheelError as exc:
            raise invalid(f"data_source.model: {exc}.", "data_source.model", "model_not_found") from None
    criteria = json.loads(eval_row["testing_criteria_json"])
    sampling = {"temperature": params.get("temperature", 0.0), "top_p": params.get("top_p", 1.0),
                "seed": params.get("seed", 0), "max_tokens": params.get("max_completion_tokens", 64)}
    data = {
        "name": eval_row["name"] or eval_row["id"],
        # The run id makes each API run its own harness run; a restarted run finds it again.
        "description": f"{eval_row['id']}/{run_row['id']} via the API",
        "dataset": {"path": run_row["dataset_path"], "format": "jsonl"},
        "split": {"ratios": {"test": 1.0}},
        "input": template_messages(source.get("input_messages")),
        "model": model,
        "model_options": {"batch_size": batch_size} if model.startswith("local:") else provider_options(run_row),
        "sampling": sampling,
        "response_format": params.get("response_format") if isinstance(params.get("response_format"), dict)
        and params["response_format"].get("type") != "text" else None,
        "graders": [{k: v for k, v in c.items() if k != "id"} for c in criteria],
    }
    try:
        return parse_eval_spec(data, source=f"run {run_row['id']}", base_dir=Path(run_row["dataset_path"]).parent)
    except FlywheelError as exc:
        raise invalid(str(exc), "data_source") from None


def provider_options(run_row: dict[str, Any]) -> dict[str, Any]:
    """The provider options stored beside a run's items at creation (none: the model needs none)."""
    path = provider_path(Path(run_row["dataset_path"]))
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# Local models compute on this machine's cores with their own thread pools: two workers generating
# at once oversubscribe them (measured: 30 tiny jobs took 40x longer with 2 workers than with 1), so
# local runs take turns; remote (`openai:`) runs overlap.
LOCAL_COMPUTE = threading.Lock()


@contextlib.contextmanager
def local_turn(store: Store):
    """Hold the cores for local-model work: against this process's other workers (LOCAL_COMPUTE)
    and against worker processes on the same store (a file lock beside it)."""
    import fcntl

    path = store.artefact_dir / "api" / "local-compute.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with LOCAL_COMPUTE, open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EvalRunRunner:
    """Runs `eval_run` jobs on the process's cached models (loading is the slow part)."""

    def __init__(self, batch_size: int = 8):
        self.batch_size = batch_size

    def _model(self, spec: EvalSpec, run: dict[str, Any]):
        if spec.model == RecordedModel.ref:
            path = recorded_path(Path(run["dataset_path"]))
            return RecordedModel(json.loads(path.read_text(encoding="utf-8")))
        return cached_model(spec.model, spec.model_options)

    def run(self, ctx: JobContext) -> None:
        store = ctx.store
        run = store.api_get("api_eval_runs", ctx.job["object_id"])
        evaluation = store.api_get("api_evals", run["eval_id"]) if run else None
        if run is None or evaluation is None:
            raise FlywheelError(f"eval run {ctx.job['object_id']} or its eval was deleted")
        spec = build_spec(evaluation, run, batch_size=self.batch_size, store=store)
        if run.get("run_id") is None:  # the harness run's id, chosen here and kept before it runs
            run["run_id"] = new_id("run")
            store.api_update("api_eval_runs", run["id"], run_id=run["run_id"])

        def progress(done: int, total: int) -> None:
            if run.get("iteration_id") is None and (iterations := store.iterations(run["run_id"])):
                run["iteration_id"] = iterations[0].id
                store.api_update("api_eval_runs", run["id"], iteration_id=run["iteration_id"])
            ctx.event(f"{done}/{total} samples done", type="metrics", data={"done": done, "total": total})
            ctx.check()

        local = spec.model.startswith("local:")
        with local_turn(store) if local else contextlib.nullcontext():
            ctx.check()  # cancelled while waiting for its turn
            store.api_update("api_eval_runs", run["id"], status="in_progress")
            attempt = f" (attempt {ctx.job['attempts']})" if ctx.job["attempts"] > 1 else ""
            ctx.event(f"Run started on {spec.model}{attempt}")
            result = run_eval(spec, store, split="test", model=self._model(spec, run), progress=progress,
                              command=f"api:{run['id']}", run_id=run["run_id"])
        store.api_update("api_eval_runs", run["id"], run_id=result.run_id, iteration_id=result.iteration_id)

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        fields: dict[str, Any] = {"status": RUN_STATUS[status]}
        if error:
            fields["error_json"] = json.dumps({"code": "run_failed", "message": error})
        run = store.api_get("api_eval_runs", job["object_id"])
        if run is None:
            return
        iteration_id = run.get("iteration_id")
        if iteration_id is None and run.get("run_id") and (iterations := store.iterations(run["run_id"])):
            iteration_id = fields["iteration_id"] = iterations[0].id
        if iteration_id:
            # A finished run's counts never change: kept on the row, retrieving it reads no samples.
            fields["result_json"] = json.dumps(store.result_counts(iteration_id))
        store.api_update("api_eval_runs", job["object_id"], **fields)


# -- shapes ------------------------------------------------------------------------------------------
def run_object(store: Store, run: dict[str, Any], criteria: list[dict[str, Any]],
               report_base: str | None = None) -> dict[str, Any]:
    """An eval run as the platform shows it, with counts read from the harness rows."""
    source = json.loads(run["data_source_json"])
    if run.get("result_json"):
        counts = json.loads(run["result_json"])
    else:
        counts = store.result_counts(run["iteration_id"]) if run.get("iteration_id") else None
    ids = {c["name"]: c["id"] for c in criteria}
    per_criteria = [{"testing_criteria": ids.get(name, name), "passed": ok or 0, "failed": bad or 0}
                    for name, (ok, bad) in (counts or {}).get("graders", {}).items()]
    usage = None
    if counts and counts["total"]:
        usage = [{"model_name": run["model"], "invocation_count": counts["total"],
                  "prompt_tokens": counts["prompt_tokens"], "completion_tokens": counts["completion_tokens"],
                  "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"], "cached_tokens": 0}]
    return {
        "object": "eval.run", "id": run["id"], "eval_id": run["eval_id"], "name": run["name"],
        "created_at": unix_seconds(run["created_at"]), "status": run["status"], "model": run["model"],
        "data_source": source, "metadata": json.loads(run["metadata_json"] or "{}"),
        "error": json.loads(run["error_json"]) if run.get("error_json") else None,
        "report_url": f"{report_base}runs/{run['run_id']}" if report_base and run.get("iteration_id") else None,
        "result_counts": {k: (counts or {}).get(k, 0) for k in ("total", "errored", "failed", "passed")},
        "per_model_usage": usage, "per_testing_criteria_results": per_criteria or None,
    }


def output_item_object(row: dict[str, Any], run: dict[str, Any], criteria: list[dict[str, Any]]) -> dict[str, Any]:
    """One sample with its grades as an `eval.run.output_item`."""
    by_name = {c["name"]: c for c in criteria}
    source = json.loads(run["data_source_json"])
    params = source.get("sampling_params") or {}
    recorded = is_recorded(source)
    results = []
    for grade in row["grades"]:
        criterion = by_name.get(grade["grader"], {})
        results.append({"name": criterion.get("id", grade["grader"]), "type": criterion.get("type"),
                        "score": grade["score"], "passed": bool(grade["passed"]) and not grade["error"],
                        "sample": None, **({"error": grade["error"]} if grade["error"] else {})})
    error = {"code": "sample_error", "message": row["error"]} if row["error"] else None
    return {
        "object": "eval.run.output_item", "id": f"outputitem_{row['id']}", "run_id": run["id"],
        "eval_id": run["eval_id"], "created_at": unix_seconds(row["created_at"]),
        "status": "pass" if row["passed"] else "fail",
        "datasource_item_id": (row["line"] or 1) - 1,
        "datasource_item": {k: v for k, v in json.loads(row["fields_json"] or "{}").items()
                            if not (recorded and k == ROW_FIELD)},
        "results": results,
        "sample": {
            "input": [] if recorded else json.loads(row["input_json"] or "null") or [],
            "output": [{"role": "assistant", "content": row["output_text"]}] if row["output_text"] is not None else [],
            "finish_reason": row["finish_reason"] or "", "model": run["model"],
            "usage": {"prompt_tokens": row["prompt_tokens"] or 0, "completion_tokens": row["completion_tokens"] or 0,
                      "total_tokens": (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0),
                      "cached_tokens": 0},
            "error": error, "temperature": params.get("temperature", 0.0),
            "max_completion_tokens": params.get("max_completion_tokens", 64), "top_p": params.get("top_p", 1.0),
            "seed": params.get("seed", 0)},
    }
