"""The hosted platform's definitions and our models, in and out: `flywheel import`, `flywheel export`."""

from __future__ import annotations

import json

import click

from flywheel.cli.common import db_option, echo, json_option, main, store_at
from flywheel.store import default_db_path


@main.group("import")
def import_group() -> None:
    """Turn the hosted platform's exported definitions into Flywheel specs."""


@import_group.command("openai-eval")
@click.argument("eval_path", metavar="EVAL.json", type=click.Path(dir_okay=False))
@click.argument("items", metavar="[ITEMS.jsonl]...", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--run", "run_path", type=click.Path(dir_okay=False), help="A run definition (model, input_messages).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for eval.yaml + data.jsonl.")
def import_openai_eval_command(eval_path, items, run_path, out_dir):
    """Write an eval spec from a platform eval (its testing_criteria), a run and {"item": ...} JSONL files."""
    from flywheel.api.convert import import_openai_eval

    result = import_openai_eval(eval_path, list(items), out_dir=out_dir, run_path=run_path)
    echo(f"wrote {result.spec_path} ({result.graders} graders) and {result.data_path} ({result.items} items)")


@import_group.command("openai-job")
@click.argument("job_path", metavar="JOB.json", type=click.Path(dir_okay=False))
@click.option("--training-file", "training_path", required=True, type=click.Path(dir_okay=False),
              help="The local copy of the job's training_file (platform JSONL).")
@click.option("--validation-file", "validation_path", type=click.Path(dir_okay=False),
              help="The local copy of its validation_file.")
@click.option("--model", default=None, help="Local base to train (the platform's model names none here).")
@click.option("--project", default="default", show_default=True, help="The API project the job belongs to.")
@click.option("--config-out", type=click.Path(dir_okay=False), help="Also write our training config (YAML) here.")
@click.option("--result-file", "result_path", type=click.Path(dir_okay=False),
              help="The job's result file (its per-step metrics CSV), kept with the job for comparison.")
@db_option
@json_option
def import_openai_job_command(job_path, training_path, validation_path, model, project, config_out, result_path, db,
                              as_json):
    """Queue a platform fine-tuning job (its JSON and files) in the store; `serve --api` runs it."""
    from flywheel.api.convert import import_openai_job

    with store_at(db) as store:
        result = import_openai_job(store, job_path, training_path, validation_path=validation_path, model=model,
                                   project=project, config_out=config_out, result_path=result_path)
    job = result.job
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    echo(f"queued {job['id']} ({job['method']['type']} on {job['model']}, project {project!r}); "
               "`flywheel serve --api` runs it" + (f"; training config: {result.config_path}" if config_out else "")
          + (f"; platform metrics kept ({len(result.metrics.steps)} steps, final "
             + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.final.items() if k != "step") + ")"
             if result.metrics else ""))


@main.group("export")
def export_group() -> None:
    """Export models (merged, quantised HF folders) and specs (the hosted platform's definitions)."""


@export_group.command("model")
@click.argument("model_ref", metavar="MODEL_REF")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--merge", is_flag=True, help="Merge the reference's LoRA adapters into the weights (needed when it "
              "has adapters).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Store int8 weights (torchao; the "
              "quantize extra).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="dtype of the saved (unquantised) weights.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@db_option
@json_option
def export_model_command(model_ref, output, merge, quantize, dtype, force, db, as_json):
    """Write MODEL_REF (local:BASE[+ADAPTER...]) as one HF folder with a model card (lineage, and the eval,
    prompt and scores it was measured with in the store); evaluate it as local:OUTPUT."""
    from pathlib import Path

    from flywheel.export import export_model
    from flywheel.models import parse_model_ref

    if parse_model_ref(model_ref)[2] and not merge:
        raise click.UsageError(f"{model_ref} has adapters: pass --merge to merge them into the weights")
    if not Path(db or default_db_path()).is_file():  # no store here: a card without measurements, no new file
        result = export_model(model_ref, output, quantize=quantize, dtype=dtype, overwrite=force)
    else:
        with store_at(db) as store:
            result = export_model(model_ref, output, quantize=quantize, dtype=dtype, overwrite=force, store=store)
    echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))


@export_group.command("prompt")
@click.argument("prompt_ref", metavar="PROMPT")
@click.option("--eval", "spec_path", type=click.Path(dir_okay=False), default=None,
              help="With PROMPT `best`: the eval whose best prompt on valid (for its model) is exported.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (JSON).")
@db_option
def export_prompt_command(prompt_ref, spec_path, output, db):
    """Write a stored prompt (p-..., or `best` with --eval) as a JSON file: its messages, demonstrations
    and `nearest`, as service.yaml's `prompt: {file: ...}` reads it."""
    from pathlib import Path

    from flywheel.distill import best_prompt
    from flywheel.prompt import Prompt
    from flywheel.spec import load_eval_spec

    with store_at(db) as store:
        if prompt_ref == "best":
            if not spec_path:
                raise click.UsageError("PROMPT best needs --eval SPEC")
            prompt, origin = best_prompt(store, load_eval_spec(spec_path))
        elif store.prompt_row(prompt_ref) is None:
            raise click.UsageError(f"no prompt {prompt_ref} in {store.path}")
        else:
            prompt, origin = Prompt.from_json(store.get_prompt(prompt_ref)), f"stored {prompt_ref}"
    Path(output).write_text(json.dumps(prompt.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    echo(f"wrote {prompt.id} ({origin}; {len(prompt.messages)} messages, {len(prompt.demos)} demos"
         + (f", nearest {prompt.nearest}" if prompt.nearest else "") + f") to {output}")


@export_group.command("openai-eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["train", "valid", "test", "all"]), default="all", show_default=True,
              help="The items the run carries.")
@click.option("--items-out", type=click.Path(dir_okay=False), default=None,
              help="Write the items here (JSONL to upload, purpose evals) and name them by file id, not inline.")
@click.option("--file-id", default=None, help="The uploaded items file's id, for the run's `file_id` source.")
def export_openai_eval_command(spec_path, split, items_out, file_id):
    """Print the platform's eval and run create bodies for an eval spec, as JSON: items inline when
    small, else (or with --items-out) written to a file the run names by `file_id`."""
    from pathlib import Path

    from flywheel.api.convert import export_openai_eval
    from flywheel.spec import load_eval_spec

    exported = export_openai_eval(load_eval_spec(spec_path), split=None if split == "all" else split,
                                  file_id=file_id, **({"inline_limit": -1} if items_out else {}))
    if exported.items_jsonl is not None:
        if not items_out:
            raise click.UsageError(f"{exported.items} items are too large to send inline: give --items-out "
                                   "FILE to write them for upload (and --file-id once uploaded)")
        Path(items_out).write_text(exported.items_jsonl, encoding="utf-8")
        click.echo(f"wrote {exported.items} items to {items_out}"
                   + ("" if file_id else ": upload it (POST /v1/files, purpose evals) and put its id in "
                      "run.data_source.source.id, or rerun with --file-id"), err=True)
    click.echo(json.dumps(exported.bodies, indent=2, ensure_ascii=False))
