"""Evaluate and browse: `flywheel eval`, `runs list|show`, `report`, `export-tracking`."""

from __future__ import annotations

import json
import sys

import click

from flywheel.cli.common import db_option, echo, json_option, main, store_at
from flywheel.errors import FlywheelError


@main.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test", "all"]))
@click.option("--model", default=None, help="Override the spec's model reference.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N items.")
@click.option("--max-errors", type=click.IntRange(min=0), default=None, help="Give up after more failing samples.")
@click.option("-s", "--set", "overrides", multiple=True, help="Override a spec field: key.path=value.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="ray: generate and grade in Ray tasks (pip install 'flywheel[ray]'); the store stays here. "
              "Default: the spec's `executor:`, else local.")
@click.option("--ray-address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: "
              "$RAY_ADDRESS, else a cluster started here.")
@db_option
@json_option
def eval_command(spec_path, split, model, limit, max_errors, overrides, executor, ray_address, db, as_json):
    """Evaluate SPEC on one split and store every sample and grade."""
    from flywheel.executors import build_executor
    from flywheel.harness import run_eval
    from flywheel.models import load_model
    from flywheel.progress import progress_bar
    from flywheel.report.console import print_eval_result
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    fan_out = build_executor(spec.executor, kind=executor, address=ray_address)
    with store_at(db) as store, progress_bar(f"eval {spec.name}", disable=as_json) as progress:
        try:
            result = run_eval(spec, store, split=split, limit=limit, max_errors=max_errors,
                              model=load_model(model, spec.model_options) if model else None,
                              command=" ".join(sys.argv), progress=progress, executor=fan_out)
        finally:
            if fan_out is not None:
                fan_out.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_eval_result(result)
    if result.error:  # nothing was measured: not a 0% pass rate
        raise FlywheelError(f"{result.run_id}: {result.error}")


@main.group()
def runs() -> None:
    """Browse stored runs."""


@runs.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@db_option
@json_option
def runs_list(limit, db, as_json):
    """List recent runs, newest first."""
    from flywheel.report.console import print_runs

    with store_at(db) as store:
        rows = store.list_runs(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_runs(rows)


@runs.command("show")
@click.argument("run_id", metavar="RUN")
@click.option("--failed", is_flag=True, help="Only samples that failed a grader or errored.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Show at most N samples.")
@db_option
@json_option
def runs_show(run_id, failed, limit, db, as_json):
    """Show a run: per-item input, output and grades."""
    from flywheel.report.console import print_run_detail, run_detail

    from flywheel.wheel import WheelState

    with store_at(db) as store:
        detail = run_detail(store, run_id, failed_only=failed, limit=limit)
        if detail["run"]["kind"] == "wheel":  # the typed state: older stored shapes read the same way
            detail["run"]["summary"] = store.run_state(detail["run"]["id"], WheelState).model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)


@main.command("report")
@click.argument("run_ids", metavar="RUN...", nargs=-1, required=True)
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write.")
@click.option("--a", "a", default=None, help="Iteration shown as A when the page opens (default: parent of the best).")
@click.option("--b", "b", default=None, help="Iteration shown as B when the page opens (default: the best).")
@db_option
@json_option
def report_command(run_ids, output, a, b, db, as_json):
    """Write one self-contained HTML report of RUN (several RUNs: their iterations side by side), of a
    trained checkpoint (its id or its `job-...` id: the runs that evaluated it, with the loss curves),
    or of a hyper-parameter search (`search-...` id from `flywheel train --search`)."""
    from dataclasses import asdict

    from pathlib import Path

    from flywheel.report.html import write_report

    folder = Path(output).resolve().parent
    if not folder.is_dir():
        raise FlywheelError(f"{output}: cannot write the report: folder {folder} does not exist")
    if run_ids[0].startswith("search-"):
        from flywheel.report.search_view import write_search_report

        if len(run_ids) > 1:
            raise click.UsageError("a search report takes one search id")
        with store_at(db) as store:
            path = write_search_report(store, run_ids[0], output)
        echo(json.dumps({"path": str(path)}) if as_json else f"wrote {path}")
        return
    from flywheel.report.compare import resolve_run_ids

    with store_at(db) as store:
        result = write_report(store, resolve_run_ids(store, run_ids), output, a=a, b=b)
    if as_json:
        click.echo(json.dumps(asdict(result)))
    else:
        echo(f"wrote {result.path} ({result.bytes / 1e6:.2f} MB, {result.iterations} iterations, "
                   f"{result.samples} samples) in {result.seconds:.1f}s")


@main.command("export-tracking")
@click.argument("run_id", metavar="RUN")
@click.option("--to", "to", required=True, type=click.Choice(["mlflow", "tensorboard", "wandb"]),
              help="Tracker to write the wheel run's iterations to (flywheel.tracking).")
@click.option("--dir", "folder", default=None, type=click.Path(file_okay=False),
              help="TensorBoard/W&B folder (default .flywheel/tracking/ beside the store).")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI or folder (default mlruns/ beside the store).")
@click.option("--experiment", default=None, help="MLflow experiment / W&B project (default flywheel-<eval>).")
@db_option
@json_option
def export_tracking_command(run_id, to, folder, mlflow_uri, experiment, db, as_json):
    """Write a wheel run's iterations (score, cost, lap, stage) to MLflow or TensorBoard."""
    from flywheel.tracking import export_tracking

    with store_at(db) as store:
        result = export_tracking(store, run_id, to, folder=folder, mlflow_uri=mlflow_uri, experiment=experiment)
    click.echo(result.model_dump_json(indent=2)) if as_json else echo("\n".join(result.summary_lines()))
