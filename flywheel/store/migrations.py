"""The store's schema, and the only place it is defined.

Each migration is a function registered in order; `apply_migrations` runs the ones a database has
not seen yet and records them in `_migrations`. Never edit a released migration: add a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import sqlite_utils

# The text of every stored timestamp in SQL: the same as `flywheel.store.db.timestamp` in Python.
TIMESTAMP_SQL_FORMAT = "%Y-%m-%dT%H:%M:%f+00:00"

MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["evals"].create(
        {"id": str, "name": str, "spec_path": str, "spec_json": str, "created_at": str}, pk="id"
    )
    db["datasets"].create(
        {"id": str, "path": str, "n_items": int, "created_at": str}, pk="id"
    )
    db["items"].create(
        {"dataset_id": str, "key": str, "split": str, "line": int, "fields_json": str},
        pk=("dataset_id", "key"),
        foreign_keys=[("dataset_id", "datasets", "id")],
    )
    db["prompts"].create(
        {"id": str, "messages_json": str, "origin": str, "parent_id": str, "rationale": str,
         "created_at": str},
        pk="id",
    )
    db["runs"].create(
        {"id": str, "kind": str, "config_key": str, "eval_id": str, "dataset_id": str,
         "model_ref": str, "model_fingerprint": str, "split": str, "item_limit": int,
         "status": str, "command": str, "started_at": str, "finished_at": str,
         "summary_json": str},
        pk="id",
        foreign_keys=[("eval_id", "evals", "id"), ("dataset_id", "datasets", "id")],
    )
    db["runs"].create_index(["config_key", "status"])
    db["iterations"].create(
        {"id": str, "run_id": str, "seq": int, "stage": str, "parent_id": str, "model_ref": str,
         "model_fingerprint": str, "prompt_id": str, "split": str, "n": int, "score": float,
         "ci_low": float, "ci_high": float, "prompt_tokens": int, "completion_tokens": int,
         "cost": float, "wall_s": float, "decision": str, "reason": str, "created_at": str},
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("prompt_id", "prompts", "id")],
    )
    db["iterations"].create_index(["run_id", "seq"], unique=True)
    db["samples"].create(
        {"id": int, "iteration_id": str, "item_key": str, "repeat": int, "input_json": str,
         "output_text": str, "finish_reason": str, "prompt_tokens": int, "completion_tokens": int,
         "latency_s": float, "cost": float, "cache_hit": int, "error": str, "created_at": str},
        pk="id",
        foreign_keys=[("iteration_id", "iterations", "id")],
    )
    # One sample per (iteration, item, repeat): a resumed run can never store an item twice.
    db["samples"].create_index(["iteration_id", "item_key", "repeat"], unique=True)
    db["grades"].create(
        {"sample_id": int, "grader": str, "score": float, "passed": int, "feedback": str,
         "details_json": str, "error": str, "error_details": str},
        pk=("sample_id", "grader"),
        foreign_keys=[("sample_id", "samples", "id")],
    )
    db["completion_cache"].create(
        {"key": str, "model_fingerprint": str, "output_text": str, "finish_reason": str,
         "prompt_tokens": int, "completion_tokens": int, "latency_s": float, "cost": float,
         "created_at": str},
        pk="key",
    )


@migration
def m002_captures(db: sqlite_utils.Database) -> None:
    # Chat calls recorded by `flywheel proxy`; request/response are the JSON bodies as sent.
    db["captures"].create(
        {"id": int, "created_at": str, "endpoint": str, "upstream": str, "model": str, "stream": int,
         "status": int, "latency_s": float, "prompt_tokens": int, "completion_tokens": int,
         "total_tokens": int, "metadata_json": str, "request_json": str, "request_bytes": int,
         "response_json": str, "response_id": str, "error": str},
        pk="id",
    )
    db["captures"].create_index(["created_at"])
    db["captures"].create_index(["model", "created_at"])


@migration
def m003_reviews(db: sqlite_utils.Database) -> None:
    # Human verdicts on samples, append-only (the latest value of each field wins). A review is of
    # `sample_id`; a preference compares it with `other_sample_id` ('sample', 'other' or 'tie').
    db["reviews"].create(
        {"id": int, "created_at": str, "reviewer": str, "sample_id": int, "other_sample_id": int,
         "verdict": str, "preference": str, "correction": str, "note": str},
        pk="id",
        foreign_keys=[("sample_id", "samples", "id"), ("other_sample_id", "samples", "id")],
    )
    db["reviews"].create_index(["sample_id"])
    db["reviews"].create_index(["other_sample_id"])


@migration
def m004_training(db: sqlite_utils.Database) -> None:
    # Teacher sampling (`flywheel capture`): the K graded samples per train item live in `samples` of
    # an iteration with stage 'capture'; this row is their lineage (teacher, prompt, K, temperature).
    db["teacher_captures"].create(
        {"id": str, "created_at": str, "eval_name": str, "eval_id": str, "dataset_id": str, "run_id": str,
         "iteration_id": str, "teacher": str, "teacher_fingerprint": str, "prompt_id": str, "split": str,
         "n": int, "temperature": float, "n_items": int, "n_samples": int, "n_passed": int,
         "items_with_pass": int, "n_errors": int},
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("iteration_id", "iterations", "id")],
    )
    db["teacher_captures"].create_index(["eval_name", "dataset_id"])
    # Training sets (SFT rows, DPO pairs, RFT prompts): content hash, JSONL path, where they came from.
    db["training_sets"].create(
        {"id": str, "created_at": str, "kind": str, "eval_name": str, "dataset_id": str, "content_hash": str,
         "n_rows": int, "path": str, "source_json": str},
        pk="id",
    )
    # One row per training run, local (TRL) or hosted (a fine-tuning job); its log lines and metrics
    # (local trainer logs, or the platform's job events, deduplicated by remote_id) in training_events.
    db["training_jobs"].create(
        {"id": str, "created_at": str, "finished_at": str, "backend": str, "method": str, "status": str,
         "training_set_id": str, "base_model": str, "remote_id": str, "config_json": str, "error": str,
         "checkpoint_id": str},
        pk="id",
        foreign_keys=[("training_set_id", "training_sets", "id")],
    )
    db["training_events"].create(
        {"id": int, "job_id": str, "created_at": str, "level": str, "type": str, "message": str,
         "data_json": str, "remote_id": str},
        pk="id",
        foreign_keys=[("job_id", "training_jobs", "id")],
    )
    db["training_events"].create_index(["job_id", "remote_id"], unique=True)
    # Registered adapters (path under .flywheel/ckpt/) and hosted fine-tuned model ids, with lineage.
    db["checkpoints"].create(
        {"id": str, "created_at": str, "method": str, "backend": str, "model_ref": str, "base_model": str,
         "path": str, "adapter_hash": str, "training_set_id": str, "training_set_hash": str, "parent_id": str,
         "job_id": str, "config_json": str, "metrics_json": str, "eval_json": str},
        pk="id",
        foreign_keys=[("training_set_id", "training_sets", "id"), ("job_id", "training_jobs", "id")],
    )


@migration
def m005_prompt_demos(db: sqlite_utils.Database) -> None:
    # Few-shot prompts: fixed or nearest-neighbour demonstrations beside the message templates.
    db["prompts"].add_column("demos_json", str)
    db["prompts"].add_column("nearest", int)


@migration
def m006_wheel_laps_and_cost(db: sqlite_utils.Database) -> None:
    # The wheel turns laps; every iteration records the lap it ran in and its summed sample latency
    # (tokens and money were already summed), so cost per item is read off the row.
    db["iterations"].add_column("lap", int)
    db["iterations"].add_column("latency_s", float)


@migration
def m007_tools_output_tools(db: sqlite_utils.Database) -> None:
    # Tool calls of an output (platform shape, JSON), beside its text; cached with it.
    db["samples"].add_column("output_tools_json", str)
    db["completion_cache"].add_column("output_tools_json", str)


@migration
def m008_judges_calibrations(db: sqlite_utils.Database) -> None:
    # `flywheel graders calibrate`: a grader's agreement with a labelled set, shown in reports.
    db["judge_calibrations"].create(
        {"id": int, "created_at": str, "grader": str, "type": str, "judge": str, "config_json": str,
         "data_path": str, "data_hash": str, "n": int, "errors": int, "pass_accuracy": float,
         "pass_kappa": float, "label_accuracy": float, "label_kappa": float, "auc": float,
         "constrained": int, "result_json": str},
        pk="id",
    )
    db["judge_calibrations"].create_index(["grader", "created_at"])


@migration
def m009_privacy(db: sqlite_utils.Database) -> None:
    # Files Flywheel wrote outside .flywheel/sets (`captures export`, `train export`), so that a
    # deletion can find every copy of a captured row.
    db["exports"].create(
        {"id": str, "created_at": str, "kind": str, "path": str, "n_rows": int, "content_hash": str,
         "redaction_json": str, "source_json": str},
        pk="id",
    )
    # Lineage of proxy captures into artefacts: one row per copied capture and artefact (an export
    # or a training set), with the sha256 of the canonical JSON row it became.
    db["capture_copies"].create(
        {"capture_id": int, "artefact": str, "artefact_id": str, "row_hash": str}, pk=("capture_id", "artefact",
                                                                                       "artefact_id", "row_hash"),
    )
    db["capture_copies"].create_index(["artefact", "artefact_id"])
    # `flywheel captures delete` / retention: what was deleted (ids, never text) and where copies went.
    db["deletions"].create(
        {"id": str, "created_at": str, "reason": str, "filters_json": str, "n_captures": int,
         "capture_ids_json": str, "training_sets_json": str, "exports_json": str, "checkpoints_json": str},
        pk="id",
    )
    db["training_sets"].add_column("redaction_json", str)
    db["training_sets"].add_column("deleted_rows", int)
    db["checkpoints"].add_column("trained_on_deleted", str)


@migration
def m010_api_objects(db: sqlite_utils.Database) -> None:
    # `flywheel serve --api`: the platform's objects (files, evals, eval runs, fine-tuning jobs),
    # the job queue that runs them, their events and the API keys. created_at is unix seconds, as
    # the platform reports it; `rowid` order is creation order and pages lists (`after`).
    db["api_files"].create(
        {"id": str, "created_at": int, "filename": str, "purpose": str, "bytes": int, "path": str,
         "n_rows": int}, pk="id")
    db["api_evals"].create(
        {"id": str, "created_at": int, "name": str, "metadata_json": str, "data_source_config_json": str,
         "testing_criteria_json": str}, pk="id")
    # An eval run's samples and grades live in the harness tables: `run_id` / `iteration_id` point there.
    db["api_eval_runs"].create(
        {"id": str, "eval_id": str, "created_at": int, "name": str, "status": str, "model": str,
         "data_source_json": str, "metadata_json": str, "error_json": str, "run_id": str,
         "iteration_id": str, "dataset_path": str, "result_json": str},
        pk="id", foreign_keys=[("eval_id", "api_evals", "id")])
    db["api_eval_runs"].create_index(["eval_id"])
    # Output items are pages of an iteration's samples in id order: this index reads a page directly.
    db["samples"].create_index(["iteration_id", "id"], if_not_exists=True)
    db["api_fine_tuning_jobs"].create(
        {"id": str, "created_at": int, "finished_at": int, "status": str, "model": str, "training_file": str,
         "validation_file": str, "method_json": str, "suffix": str, "seed": int, "metadata_json": str,
         "fine_tuned_model": str, "checkpoint_id": str, "error_json": str, "trained_tokens": int}, pk="id")
    # `POST /v1/flywheel/runs`: a wheel run submitted over HTTP; `run_id` is its `flywheel run` row.
    db["api_wheel_runs"].create(
        {"id": str, "created_at": int, "status": str, "spec_path": str, "run_id": str, "result_json": str,
         "error_json": str, "metadata_json": str}, pk="id")
    # The queue: one row per piece of work (kind 'eval_run' / 'fine_tuning'), claimed atomically.
    db["api_jobs"].create(
        {"id": str, "kind": str, "object_id": str, "status": str, "cancel_requested": int, "attempts": int,
         "created_at": int, "started_at": int, "finished_at": int, "error": str}, pk="id")
    db["api_jobs"].create_index(["status"])
    db["api_jobs"].create_index(["object_id"])
    db["api_events"].create(
        {"id": int, "object_id": str, "created_at": int, "level": str, "type": str, "message": str,
         "data_json": str}, pk="id")
    db["api_events"].create_index(["object_id", "id"])
    # Keys are stored as sha256 hashes; `prefix` (the first characters) names a key in listings.
    db["api_keys"].create(
        {"id": str, "created_at": int, "name": str, "key_hash": str, "prefix": str, "revoked": int}, pk="id")
    db["api_keys"].create_index(["key_hash"], unique=True)


@migration
def m011_api_projects_roles_limits(db: sqlite_utils.Database) -> None:
    # Every API object belongs to the project of the key that made it; rows made before projects
    # (and on a loopback bind without a key) belong to 'default'. Keys carry a project, a role
    # (admin / member / reader) and an optional requests-per-minute limit of their own.
    for table in ("api_files", "api_evals", "api_eval_runs", "api_fine_tuning_jobs", "api_wheel_runs"):
        db[table].add_column("project", str)
        db.execute(f"update {table} set project = 'default' where project is null")
        db[table].create_index(["project"], if_not_exists=True)
    db["api_keys"].add_column("project", str)
    db["api_keys"].add_column("role", str)
    db["api_keys"].add_column("rpm", int)
    db.execute("update api_keys set project = 'default', role = 'admin' where project is null")
    # A fine-tuning job can be paused (`POST .../pause`): the flag the running job reads, like cancel.
    db["api_jobs"].add_column("pause_requested", int)
    # Where a paused job stopped (step, total steps, the adapter saved there), and the job's final
    # metrics (train_loss, valid_loss on its validation_file, or RFT rewards).
    db["api_fine_tuning_jobs"].add_column("resume_json", str)
    db["api_fine_tuning_jobs"].add_column("metrics_json", str)
    # Chat completions stored through the API carry their project; proxy captures (null) are 'default'.
    db["captures"].add_column("api_project", str)


@migration
def m012_search_training_searches(db: sqlite_utils.Database) -> None:
    # Hyper-parameter searches (flywheel/train/search.py): one row per search, one per trial. Each
    # trial that started training points at its training job (and, when it finished, its checkpoint
    # and the valid iteration that scored it); `signal` names the loss the pruner was fed.
    db["training_searches"].create(
        {"id": str, "created_at": str, "finished_at": str, "method": str, "eval_name": str, "base_model": str,
         "training_set_id": str, "run_id": str, "sampler": str, "settings_json": str, "signal": str,
         "status": str, "stopped_by": str, "best_trial": int, "best_checkpoint_id": str, "reason": str,
         "wall_s": float, "error": str},
        pk="id", foreign_keys=[("training_set_id", "training_sets", "id")])
    db["training_searches"].create_index(["run_id"])
    db["training_search_trials"].create(
        {"search_id": str, "number": int, "state": str, "params_json": str, "job_id": str, "checkpoint_id": str,
         "valid_iteration_id": str, "valid_score": float, "loss": float, "steps": int, "wall_s": float,
         "error": str, "started_at": str, "finished_at": str},
        pk=("search_id", "number"),
        foreign_keys=[("search_id", "training_searches", "id"), ("job_id", "training_jobs", "id")])
    db["training_search_trials"].create_index(["job_id"])


@migration
def m013_checkpoints_validation(db: sqlite_utils.Database) -> None:
    # Checkpoints saved every `save_steps` (flywheel.train.validation): each row carries its step, and
    # `pruned_at` once `keep` deleted its folder (the row and its metrics stay). A job records why it
    # stopped (end of schedule, early stopping, a search's pruning) and its resumable output folder.
    db["checkpoints"].add_column("step", int)
    db["checkpoints"].add_column("pruned_at", str)
    db["training_jobs"].add_column("stop_reason", str)
    db["training_jobs"].add_column("output_dir", str)
    db["checkpoints"].create_index(["job_id", "step"])


@migration
def m014_training_set_checks(db: sqlite_utils.Database) -> None:
    # The data checks run before training (flywheel.train.datachecks.DataCheck as JSON): size, token
    # counts against max_length and the model's context, duplicates, the graders' pass share.
    db["training_sets"].add_column("checks_json", str)


@migration
def m015_apiwire_fine_tuning_training_jobs(db: sqlite_utils.Database) -> None:
    # The local training job (flywheel.train) a fine-tuning API job trains in: a job killed with the
    # server, or paused, resumes that training job from its last saved step (optimiser, schedule and
    # data order included), and its step checkpoints are the job's `checkpoints` while it runs.
    db["api_fine_tuning_jobs"].add_column("training_job_id", str)


@migration
def m016_one_timestamp_type(db: sqlite_utils.Database) -> None:
    # One timestamp type: every `*_at` column holds UTC ISO 8601 text with milliseconds
    # (`flywheel.store.db.now()`; docs/storage.md says why). The API tables held unix seconds
    # (m010): their values are converted and their columns retyped TEXT (sqlite-utils rebuilds each
    # table, keeping rowids, so API list order and `after` cursors stay). Other text stamps are
    # normalised to the same form (a hosted job's events had no milliseconds; `_migrations` used
    # SQLite's `YYYY-MM-DD HH:MM:SS`). Text that is not a date is left as it is.
    for table in db.table_names():
        columns = [c for c in db[table].columns if c.name.endswith("_at")]
        for column in columns:
            c = f"[{column.name}]"
            stamp = (f"case typeof({c}) when 'text' then case when {c} glob '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'"
                     f" then strftime('{TIMESTAMP_SQL_FORMAT}', {c}) end"
                     f" when 'blob' then null else strftime('{TIMESTAMP_SQL_FORMAT}', {c}, 'unixepoch') end")
            db.execute(f"update [{table}] set {c} = {stamp} where {c} is not null and {stamp} is not null"
                       f" and {c} is not {stamp}")
        retype = {c.name: str for c in columns if c.type.upper() != "TEXT"}
        if retype:
            db[table].transform(types=retype)


@migration
def m017_fine_tuning_status_from_the_training_job(db: sqlite_utils.Database) -> None:
    # One status per fine-tune: the API's is its training job's (the queue row's before it has one),
    # read by Store.fine_tuning_status; the copy kept in step by hand goes. An unfinished job's
    # training job takes the status the API showed (paused, cancelled, queued: states only the API knows).
    for status in ("paused", "cancelled", "queued"):
        db.execute("update training_jobs set status = ? where status != 'succeeded' and id in (select "
                   "training_job_id from api_fine_tuning_jobs where status = ?)", [status, status])
    db.execute("alter table api_fine_tuning_jobs drop column status")


@migration
def m018_job_leases_completion_claims(db: sqlite_utils.Database) -> None:
    # Paid once (flywheel/api/jobs.py, flywheel/harness.py): a running queue job holds a lease that
    # its worker renews (`lease_owner` names the worker, `lease_expires_at` a stored timestamp); a job
    # is taken again only when queued or when its lease ran out. `completion_claims` marks requests
    # being generated right now (key as in `completion_cache`), so a second run of the same eval
    # waits for the answer instead of paying for it again; a claim whose lease ran out is free.
    db["api_jobs"].add_column("lease_owner", str)
    db["api_jobs"].add_column("lease_expires_at", str)
    db["completion_claims"].create({"key": str, "owner": str, "expires_at": str}, pk="key")
    db["completion_claims"].create_index(["owner"])


@migration
def m019_capture_lineage_of_evals(db: sqlite_utils.Database) -> None:
    # Deletion follows captures into evals (flywheel/privacy/deletion.py): `capture_items` records
    # which eval item (dataset, key) a capture became (a `dataset.captures` eval); a sample records
    # the completion-cache key of its answer, so deleting the sample's item finds its cache entry.
    db["capture_items"].create({"capture_id": int, "dataset_id": str, "item_key": str},
                               pk=("capture_id", "dataset_id", "item_key"))
    db["capture_items"].create_index(["dataset_id", "item_key"])
    db["samples"].add_column("cache_key", str)


@migration
def m020_platform_imports(db: sqlite_utils.Database) -> None:
    # Prompt objects imported from the hosted platform (`pmpt_...` and a version): each version is a
    # stored prompt (`prompts`, by content id) that an eval spec names as `prompt: {id, version}`.
    db["platform_prompt_versions"].create(
        {"platform_id": str, "version": str, "prompt_id": str, "name": str, "variables_json": str,
         "model": str, "created_at": str, "imported_at": str, "source": str},
        pk=("platform_id", "version"), foreign_keys=[("prompt_id", "prompts", "id")])
    # An imported fine-tuning job's own metrics (its result file, the platform's per-step CSV), kept
    # beside the job that retrains it here, for comparison.
    db["api_fine_tuning_jobs"].add_column("platform_metrics_json", str)


@migration
def m021_service_aliases_switches_shadow(db: sqlite_utils.Database) -> None:
    # The service (flywheel.service): serving aliases (`production`, `candidate`) -> (model, system
    # prompt); every change of an alias is a row of `service_switches` naming who, why and the test
    # that decided (a rollback names the switch it reverses); `service_shadow_pairs` holds the
    # online grades of production and the other alias on the same live request (shadow before a
    # switch, canary after); `service_laps` the laps with the capture range each one consumed.
    db["service_aliases"].create({"alias": str, "model": str, "prompt": str, "switch_id": int, "updated_at": str},
                                 pk="alias")
    db["service_switches"].create(
        {"id": int, "created_at": str, "alias": str, "from_model": str, "from_prompt": str, "to_model": str,
         "to_prompt": str, "who": str, "why": str, "test": str, "kind": str, "reverts": int}, pk="id")
    db["service_switches"].create_index(["alias", "id"])
    db["service_shadow_pairs"].create(
        {"id": int, "created_at": str, "capture_id": int, "phase": str, "switch_id": int,
         "production_model": str, "other_model": str, "production_score": float, "other_score": float,
         "production_latency_s": float, "other_latency_s": float, "production_tokens": int, "other_tokens": int,
         "other_error": str}, pk="id")
    db["service_shadow_pairs"].create_index(["phase", "switch_id", "id"])
    db["service_shadow_pairs"].create_index(["capture_id", "phase", "switch_id"], unique=True)
    db["service_laps"].create(
        {"id": str, "created_at": str, "trigger": str, "status": str, "first_capture_id": int,
         "last_capture_id": int, "captures": int, "checkpoint": str, "decision": str, "reason": str,
         "finished_at": str}, pk="id")
    db["service_laps"].create_index(["created_at"])


def prompt_id_of_system(text: str) -> str:
    """`flywheel.prompt.Prompt(messages=[system text]).id`, computed here because the store sits below
    flywheel.prompt (tests/test_service.py checks the two agree)."""
    data = {"messages": [{"role": "system", "content": text}]}
    return "p-" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@migration
def m022_service_prompts_are_stored_prompts(db: sqlite_utils.Database) -> None:
    # An alias's prompt was a system text; it is now the id of a stored prompt (`prompts`), so an alias
    # can serve a whole prompted system: instructions plus fixed or nearest-neighbour demonstrations.
    # Every text held by an alias or a switch becomes a stored prompt of that one system message.
    columns = [("service_aliases", "prompt"), ("service_switches", "from_prompt"), ("service_switches", "to_prompt")]
    texts = {text for table, column in columns
             for (text,) in db.execute(f"select distinct {column} from {table} where {column} is not null")}
    known = {row[0] for row in db.execute("select id from prompts")}
    for text in texts:
        if text in known:
            continue
        pid = prompt_id_of_system(text)
        db.execute("insert or ignore into prompts (id, messages_json, origin, created_at) "
                   f"values (?, ?, 'service.yaml', strftime('{TIMESTAMP_SQL_FORMAT}', 'now'))",
                   [pid, json.dumps([{"role": "system", "content": text}], ensure_ascii=False)])
        for table, column in columns:
            db.execute(f"update {table} set {column} = ? where {column} = ?", [pid, text])


def apply_migrations(db: sqlite_utils.Database) -> list[str]:
    """Run pending migrations under one `BEGIN IMMEDIATE` write lock; return the names applied.

    Two processes opening a fresh file at once both succeed: the one that waits for the lock
    re-reads what the other applied and runs nothing twice. A database written by a newer flywheel
    (a migration name this version does not know, or a higher `user_version`) raises
    `SchemaTooNew`, before anything is written.
    """
    if not pending_migrations(db):
        return []
    conn = db.conn
    if conn.in_transaction:
        conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    try:
        pending = pending_migrations(db)  # re-check under the lock: another process may have done the work
        if "_migrations" not in db.table_names():
            db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
        applied = []
        for name, fn in pending:
            fn(db)
            conn.execute(f"insert into _migrations (name, applied_at) values (?, strftime('{TIMESTAMP_SQL_FORMAT}', 'now'))",
                         [name])
            applied.append(name)
        conn.execute(f"pragma user_version = {len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


class SchemaTooNew(Exception):
    """The database holds migrations this version of flywheel does not know, or is no flywheel store."""


def pending_migrations(db: sqlite_utils.Database) -> list[tuple[str, Callable[[sqlite_utils.Database], None]]]:
    """Migrations not yet applied; raises SchemaTooNew for a database from a newer version."""
    version = db.execute("pragma user_version").fetchone()[0]
    done: set[str] = set()
    tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
    if "_migrations" in tables:
        done = {name for (name,) in db.execute("select name from _migrations")}
    elif tables - {"sqlite_sequence"}:
        raise SchemaTooNew(f"not a flywheel store: it has tables ({', '.join(sorted(tables)[:4])}) but no "
                           "_migrations table; use another --db")
    known = [name for name, _ in MIGRATIONS]
    unknown = sorted(done - set(known))
    if unknown or version > len(MIGRATIONS):
        found = f"schema version {max(version, len(done))}" + (f" (migrations {', '.join(unknown)})" if unknown else "")
        raise SchemaTooNew(f"written by a newer flywheel: {found}; this version knows schema version "
                           f"{len(MIGRATIONS)} (up to {known[-1]}); upgrade flywheel to open it")
    return [(name, fn) for name, fn in MIGRATIONS if name not in done]


def expected_schema() -> dict[str, set[str]]:
    """Table -> columns of a fully migrated store (built once in memory from the migrations)."""
    global _EXPECTED
    if _EXPECTED is None:
        import sqlite3

        memory = sqlite_utils.Database(sqlite3.connect(":memory:"))
        apply_migrations(memory)
        _EXPECTED = {name: set(memory[name].columns_dict) for name in memory.table_names()}
        memory.conn.close()
    return _EXPECTED


def missing_schema(db: sqlite_utils.Database) -> list[str]:
    """Tables (`name`) and columns (`table.column`) a migrated store should have but lacks."""
    missing = []
    present = set(db.table_names())
    for table, columns in sorted(expected_schema().items()):
        if table not in present:
            missing.append(table)
            continue
        have = {row[1] for row in db.execute(f"pragma table_info([{table}])")}
        missing += [f"{table}.{column}" for column in sorted(columns - have)]
    return missing


_EXPECTED: dict[str, set[str]] | None = None
