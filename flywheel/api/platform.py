"""The platform's model names and ours: a fine-tuned model is `ft:<base>:<suffix>:<job>` (and
`...:ckpt-step-<n>` for a step checkpoint) on the platform, a Flywheel model reference here.
Routes (chat, fine-tuning) and runners (eval runs, fine-tuning) resolve names through these two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.api.scoped import list_owned
from flywheel.errors import FlywheelError
from flywheel.models import parse_model_ref
from flywheel.store import Store


def fine_tuned_name(row: dict[str, Any], base: str) -> str:
    """`ft:<base>:<suffix>:<job>` as the platform names a tuned model."""
    short = row["id"].removeprefix("ftjob-")[:8]
    name = Path(base.partition(":")[2].partition("+")[0]).name or "model"
    return f"ft:{name}:{row['suffix'] or 'flywheel'}:{short}"


def model_for(store: Store, model: str, project: str) -> str:
    """The Flywheel model reference of a `ft:` id made here by `project`; any other value is taken as a
    reference."""
    if not model.startswith("ft:"):
        parse_model_ref(model)  # ModelError for what is no reference
        return model
    name, _, step = model.rpartition(":ckpt-step-")
    if name and step.isdigit():  # a step checkpoint the job lists (`fine_tuned_model_checkpoint`)
        rows, _ = list_owned(store, "api_fine_tuning_jobs", project, limit=1, where={"fine_tuned_model": name})
        training_job_id = rows[0].get("training_job_id") if rows else None
        found = [c for c in (store.job_checkpoints(training_job_id) if training_job_id else [])
                 if c.get("step") == int(step) and not c.get("pruned_at")]
        if not found:
            raise FlywheelError(f"no fine-tuned model checkpoint {model!r} on this server (pruned or never saved)")
        return found[-1]["model_ref"]
    rows, _ = list_owned(store, "api_fine_tuning_jobs", project, limit=1, where={"fine_tuned_model": model})
    if not rows or not rows[0]["checkpoint_id"]:
        raise FlywheelError(f"no fine-tuned model {model!r} on this server")
    return store.get_checkpoint(rows[0]["checkpoint_id"])["model_ref"]
