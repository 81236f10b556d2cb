"""Checkpoints: trained adapters (and hosted fine-tuned model ids) registered with their lineage.

A local checkpoint is a PEFT adapter folder under `.flywheel/ckpt/<id>/` plus a `checkpoints` row:
base model, training-set id and hash, the training config, training metrics, the parent checkpoint
(when training continued from one) and the job. Its model reference is `local:BASE+PATH`, so the
harness evaluates it like any model.

Registration is atomic: the adapter is written to a staging folder, checked, renamed into place,
and only then is the row inserted (together with the job's status); a failure at any step removes
what was written and raises CheckpointError, so nothing is ever half-registered.

    ckpt = register_checkpoint(store, method="sft", save=lambda d: model.save_pretrained(d), ...)
    store.get_checkpoint(ckpt.id)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.models import parse_model_ref
from flywheel.models.loading import dir_fingerprint
from flywheel.store import Checkpoint, Store, new_id

LINEAGE_FILE = "flywheel_checkpoint.json"


class CheckpointError(FlywheelError):
    """A checkpoint could not be saved or found; nothing was registered."""


def checkpoint_dir(store: Store) -> Path:
    return store.artefact_dir / "ckpt"


def local_model_ref(base_model: str, adapter_dir: Path) -> str:
    """`local:BASE+ADAPTER` for an adapter on `base_model` (a `local:` reference without adapter)."""
    scheme, name, adapter = parse_model_ref(base_model)
    if scheme != "local" or adapter:
        raise CheckpointError(f"{base_model}: an adapter's base must be a local model without an adapter")
    return f"local:{name}+{adapter_dir}"


def register_checkpoint(store: Store, *, method: str, base_model: str, save: Callable[[Path], None] | None,
                        training_set_id: str | None, training_set_hash: str | None, config: dict[str, Any],
                        metrics: dict[str, Any], parent_id: str | None = None, job_id: str | None = None,
                        backend: str = "local", model_ref: str | None = None, step: int | None = None,
                        finish_job: bool = True) -> Checkpoint:
    """Save (via `save(folder)`) and register a checkpoint, all or nothing.

    Local checkpoints pass `save`, which must write a PEFT adapter (adapter_config.json) into the
    folder it is given; hosted ones pass `save=None` and the `model_ref` of the fine-tuned model.
    `step` is the training step it was saved at; an intermediate checkpoint (`finish_job=False`)
    leaves its job running.
    """
    checkpoint_id = new_id(method)
    row: dict[str, Any] = {
        "id": checkpoint_id, "method": method, "backend": backend, "base_model": base_model,
        "training_set_id": training_set_id, "training_set_hash": training_set_hash, "parent_id": parent_id,
        "job_id": job_id, "config_json": json.dumps(config, default=str),
        "metrics_json": json.dumps(metrics, default=str), "eval_json": "{}",
    }
    if step is not None:
        row["step"] = step
    if save is None:
        if not model_ref:
            raise CheckpointError("a checkpoint without saved weights needs the model_ref of the trained model")
        row.update(model_ref=model_ref, path=None, adapter_hash=None)
        try:
            store.insert_checkpoint(row, finish_job=finish_job)
        except Exception as exc:  # noqa: BLE001 - the row is one transaction: nothing was written
            raise CheckpointError(f"{store.path}: cannot register checkpoint {checkpoint_id}: {exc}") from exc
        return store.get_checkpoint(checkpoint_id)

    root = checkpoint_dir(store)
    final = root / checkpoint_id
    staging = root / f".staging-{checkpoint_id}"
    moved = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        save(staging)
        if not (staging / "adapter_config.json").exists():
            raise CheckpointError(f"{staging}: the save wrote no adapter_config.json")
        lineage = {k: v for k, v in row.items() if not k.endswith("_json")}
        lineage.update(config=config, metrics=metrics)
        (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
        staging.rename(final)
        moved = True
        row.update(model_ref=model_ref or local_model_ref(base_model, final), path=str(final),
                   adapter_hash=dir_fingerprint(final)[:16])
        store.insert_checkpoint(row, finish_job=finish_job)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if moved:
            shutil.rmtree(final, ignore_errors=True)
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{exc}; nothing was registered") from exc
        raise CheckpointError(f"saving checkpoint {checkpoint_id} failed ({type(exc).__name__}: {exc}); "
                              "nothing was registered") from exc
    return store.get_checkpoint(checkpoint_id)


def load_checkpoint(store: Store, checkpoint_id: str) -> Checkpoint:
    """A registered checkpoint; its adapter folder must still exist."""
    try:
        checkpoint = store.get_checkpoint(checkpoint_id)
    except FlywheelError as exc:
        raise CheckpointError(str(exc)) from None
    if checkpoint.path and not Path(checkpoint.path).is_dir():
        raise CheckpointError(f"checkpoint {checkpoint_id}: adapter folder {checkpoint.path} is missing")
    return checkpoint


def resolve_base(store: Store, base: str) -> tuple[str, str | None]:
    """A `--base` value as (model reference, parent checkpoint id): a checkpoint id becomes its
    model reference; `local:BASE+ADAPTER` of a registered adapter names it as the parent."""
    if ":" not in base:
        checkpoint = load_checkpoint(store, base)
        return checkpoint.model_ref, checkpoint.id
    return base, store.latest_checkpoint_for(base)
