"""Hosted fine-tuning: the platform's files + fine-tuning jobs API, through the official openai SDK.

    result = train_hosted("sft", spec, store, build_sft_set(spec, store), base="openai:gpt-4.1-mini-2025-04-14",
                          config=SFTSpec(), poll_interval=30)
    result.checkpoint.model_ref      # openai:ft:gpt-4.1-mini-2025-04-14:org::abc123

The training set is uploaded as JSONL (`purpose="fine-tune"`, the formats of reference §5.4), a job
is created with `method` supervised, dpo or reinforcement (the eval's grader config passed as it is
written in the spec), its events are polled into `training_events` (deduplicated by event id), and
on success the fine-tuned model id is registered like a local checkpoint and evaluated through the
`openai:` backend. Hyperparameters the user set in the training config are sent (`epochs` ->
`n_epochs`, `batch_size`, DPO `beta`); the others are left to the platform (`"auto"`).

Options (`-o key=value` on the CLI): `base_url`, `api_key_env`, `poll_interval` (s), `timeout` (s of
polling before giving up, the job keeps running), `wait` (false: return once the job is created),
`suffix`, `seed`, `hyperparameters` (a mapping sent as is, e.g. learning_rate_multiplier), `grader`
(RFT: the name of the spec grader to send; default the objective grader).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flywheel.errors import ModelError, TrainingError
from graders.registry import HOSTED_RFT_TYPES

import graders
from flywheel.models import parse_model_ref
from flywheel.models.openai_backend import resolve_base_url
from flywheel.spec import EvalSpec
from flywheel.store import Store, timestamp_from_unix
from flywheel.train.checkpoints import register_checkpoint
from flywheel.train.config import TrainConfig
from flywheel.train.formats import TrainingDataError, TrainingSet, set_has_images
from flywheel.train.local import TrainResult, evaluate_checkpoint
from flywheel.train.methods import training_method
from flywheel.train.sets import record_training_set
from flywheel.train.vision import screen_images

TERMINAL = ("succeeded", "failed", "cancelled")
OPTIONS = ("base_url", "api_key_env", "poll_interval", "timeout", "wait", "suffix", "seed", "hyperparameters",
           "grader", "max_retries")


@dataclass
class HostedJob:
    """A created (maybe still running) hosted job, when not waiting for it."""

    job_id: str
    remote_id: str
    status: str
    training_set_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        return [f"hosted job {self.remote_id} ({self.job_id}) is {self.status}; training set {self.training_set_id}"]


def _plain(obj: Any) -> Any:
    """An SDK object (or anything) as plain JSON data."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return obj


def rft_grader(spec: EvalSpec, name: str | None = None) -> dict[str, Any]:
    """The spec's grader (the objective one unless named), as written, checked for RFT use."""
    wanted = name or spec.objective_grader
    for raw in spec.graders:
        if raw["name"] == wanted:
            kind = raw.get("type")
            if kind not in HOSTED_RFT_TYPES:
                raise TrainingDataError(f"{spec.source}: grader {wanted!r} is {kind}; reinforcement fine-tuning "
                                        f"accepts {', '.join(HOSTED_RFT_TYPES)} (reference §2)")
            if kind == "text_similarity" and raw.get("evaluation_metric") == "cosine":
                raise TrainingDataError(f"{spec.source}: grader {wanted!r}: cosine similarity is for evals only, "
                                        "not reinforcement fine-tuning")
            graders.parse_grader(raw)
            return raw
    raise TrainingDataError(f"{spec.source}: no grader named {wanted!r}")


def hyperparameters(method: str, config: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The platform hyperparameters for what the user set; unset ones stay the platform's `auto`."""
    chosen = config.model_fields_set
    out: dict[str, Any] = {}
    if "epochs" in chosen:
        if config.epochs != int(config.epochs) or not 1 <= config.epochs <= 50:
            raise TrainingDataError(f"hosted training: epochs must be a whole number 1-50, got {config.epochs}")
        out["n_epochs"] = int(config.epochs)
    if "batch_size" in chosen:
        out["batch_size"] = config.batch_size

    if "beta" in training_method(method).hosted_hyperparameters and "beta" in chosen:
        out["beta"] = config.beta  # type: ignore[attr-defined]
    out.update(extra or {})
    return out


def job_request(method: str, spec: EvalSpec, training_set: TrainingSet, base_model: str, config: TrainConfig,
                *, training_file: str, suffix: str | None = None, seed: int | None = None,
                extra_hyperparameters: dict[str, Any] | None = None, grader: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `client.fine_tuning.jobs.create` for this training run."""
    chosen = training_method(method)
    kind = chosen.hosted_type
    body: dict[str, Any] = {"hyperparameters": hyperparameters(method, config, extra_hyperparameters)}
    if chosen.grader_rewards:
        body = {"grader": rft_grader(spec, grader), **body}
    request: dict[str, Any] = {
        "model": base_model, "training_file": training_file, "method": {"type": kind, kind: body},
        "metadata": {"flywheel_eval": spec.name[:512], "flywheel_training_set": (training_set.id or "")[:512]},
    }
    if suffix:
        request["suffix"] = suffix[:64]
    if seed is not None:
        request["seed"] = seed
    return request


class HostedBackend:
    """The fine-tuning API of an OpenAI(-compatible) server. Constructing it makes no call."""

    def __init__(self, *, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 poll_interval: float = 30.0, timeout: float | None = None, max_retries: int = 3):
        self.base_url = resolve_base_url(base_url)
        self.api_key_env = api_key_env
        self.poll_interval = float(poll_interval)
        self.timeout = timeout
        self.max_retries = max_retries
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from openai import OpenAI

            key = os.environ.get(self.api_key_env)
            if not key:
                raise ModelError(f"hosted fine-tuning at {self.base_url}: set ${self.api_key_env} to an API key")
            self._client = OpenAI(base_url=self.base_url, api_key=key, max_retries=self.max_retries)
        return self._client

    def upload(self, training_set: TrainingSet) -> dict[str, Any]:
        name = f"{training_set.id or training_set.kind}.jsonl"
        return _plain(self.client.files.create(file=(name, training_set.jsonl().encode(), "application/jsonl"),
                                               purpose="fine-tune"))

    def create_job(self, request: dict[str, Any]) -> dict[str, Any]:
        return _plain(self.client.fine_tuning.jobs.create(**request))

    def retrieve(self, remote_id: str) -> dict[str, Any]:
        return _plain(self.client.fine_tuning.jobs.retrieve(remote_id))

    def new_events(self, remote_id: str, seen: set[str]) -> list[dict[str, Any]]:
        """Events not seen yet, oldest first (the API lists newest first, paged with `after`)."""
        fresh: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.client.fine_tuning.jobs.list_events(remote_id, limit=100, **({"after": after} if after else {}))
            data = [_plain(e) for e in page.data]
            stop = False
            for event in data:
                if event["id"] in seen:
                    stop = True
                    break
                fresh.append(event)
            if stop or not data or not getattr(page, "has_more", False):
                break
            after = data[-1]["id"]
        return list(reversed(fresh))

    def poll(self, remote_id: str, on_events: Callable[[list[dict[str, Any]]], None],
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """Poll until the job ends (or `timeout`); events go to `on_events` as they arrive."""
        seen: set[str] = set()
        started = time.monotonic()
        while True:
            job = self.retrieve(remote_id)
            events = self.new_events(remote_id, seen)
            seen.update(e["id"] for e in events)
            if events:
                on_events(events)
            if job.get("status") in TERMINAL:
                return job
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise TrainingError(f"hosted job {remote_id} is still {job.get('status')} after {self.timeout:.0f}s "
                                    "of polling; it keeps running on the platform")
            sleep(self.poll_interval)


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    created = event.get("created_at")
    stamp = timestamp_from_unix(created) if isinstance(created, (int, float)) else None
    return {"remote_id": event.get("id"), "created_at": stamp, "level": event.get("level", "info"),
            "type": event.get("type") or "message", "message": event.get("message"), "data": event.get("data")}


def _metrics(store: Store, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
    steps = [json.loads(e["data_json"]) for e in store.training_events(job_id)
             if e["type"] == "metrics" and e["data_json"]]
    losses = [s.get("train_loss") for s in steps if isinstance(s.get("train_loss"), (int, float))]
    rewards = [s.get("train_mean_reward") for s in steps if isinstance(s.get("train_mean_reward"), (int, float))]
    return {"remote_id": job.get("id"), "trained_tokens": job.get("trained_tokens"), "steps": len(steps),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None,
            "last_metrics": steps[-1] if steps else None, "result_files": job.get("result_files"),
            "hyperparameters": _resolved_hyperparameters(job)}


def _resolved_hyperparameters(job: dict[str, Any]) -> Any:
    """What the platform resolved: `method.<type>.hyperparameters`, else the legacy top-level field."""
    method = job.get("method") or {}
    return ((method.get(method.get("type") or "") or {}).get("hyperparameters")) or job.get("hyperparameters")


def train_hosted(method: str, spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
                 config: TrainConfig, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"),
                 backend: HostedBackend | None = None, sleep: Callable[[float], None] = time.sleep,
                 **options: Any) -> TrainResult | HostedJob:
    """Upload, create the job, poll its events, register the fine-tuned model, evaluate it."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ModelError(f"hosted options: unknown {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")

    scheme, base_model, adapter = parse_model_ref(base)
    if scheme != "openai" or adapter:
        raise TrainingError(f"{base}: hosted fine-tuning needs an openai:MODEL base")
    backend = backend or HostedBackend(
        base_url=options.get("base_url"), api_key_env=options.get("api_key_env", "OPENAI_API_KEY"),
        poll_interval=options.get("poll_interval", 30.0), timeout=options.get("timeout"),
        max_retries=options.get("max_retries", 3))

    screening = None
    if set_has_images(training_set):  # a vision job: upload only what the platform's image rules keep
        training_set, screening = screen_images(training_set)
    record_training_set(store, training_set)
    job_id = store.create_training_job(backend="hosted", method=method, training_set_id=training_set.id,
                                       base_model=base, config_json=config.model_dump_json(), status="uploading")
    if screening is not None:
        store.add_training_events(job_id, [{"type": "message", "level": "warn" if screening.skipped else "info",
                                            "message": f"image screening: {screening.summary()}; {screening.not_checked}",
                                            "data": screening.to_dict()}])
    try:
        uploaded = backend.upload(training_set)
        store.add_training_events(job_id, [{"type": "message", "message": f"uploaded {uploaded.get('id')}",
                                            "data": uploaded}])
        request = job_request(method, spec, training_set, base_model, config, training_file=uploaded["id"],
                              suffix=options.get("suffix"), seed=options.get("seed"),
                              extra_hyperparameters=options.get("hyperparameters"), grader=options.get("grader"))
        job = backend.create_job(request)
        store.update_training_job(job_id, remote_id=job["id"], status=job.get("status", "queued"))
        if not options.get("wait", True):
            return HostedJob(job_id=job_id, remote_id=job["id"], status=job.get("status", "queued"),
                             training_set_id=training_set.id or "")
        job = backend.poll(job["id"], lambda events: store.add_training_events(job_id, [_event_row(e) for e in events]),
                           sleep=sleep)
    except TrainingError as exc:
        store.update_training_job(job_id, error=str(exc))
        raise
    except Exception as exc:
        store.update_training_job(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, (ModelError, TrainingDataError)):
            raise
        raise TrainingError(f"hosted fine-tuning at {backend.base_url}: {type(exc).__name__}: {exc}") from exc
    status = job.get("status")
    if status != "succeeded" or not job.get("fine_tuned_model"):
        error = job.get("error") or {}
        message = f"hosted job {job.get('id')} {status}"
        if error:
            message += f": {error.get('code')}: {error.get('message')}" + (f" (param {error['param']})"
                                                                          if error.get("param") else "")
        store.update_training_job(job_id, status=status or "failed", error=message)
        raise TrainingError(message)
    metrics = _metrics(store, job_id, job)
    checkpoint = register_checkpoint(
        store, method=method, base_model=base, save=None, backend="hosted",
        model_ref=f"openai:{job['fine_tuned_model']}", training_set_id=training_set.id,
        training_set_hash=training_set.content_hash, config={**config.model_dump(), "request": request},
        metrics=metrics, job_id=job_id)
    result = TrainResult(method=method, checkpoint=checkpoint, job_id=job_id, training_set_id=training_set.id or "",
                         metrics=metrics)
    if evaluate:
        model_options = {"base_url": backend.base_url, "api_key_env": backend.api_key_env}
        result.evals = evaluate_checkpoint(spec, store, checkpoint, parent_ref=base, splits=splits,
                                           model_options=model_options)
        result.checkpoint = store.get_checkpoint(checkpoint.id)  # with its evals
    return result
