"""Graders locally: `flywheel graders validate|run|calibrate`."""

from __future__ import annotations

import json

import click

from flywheel.cli.common import db_option, echo, json_option, main, store_at
from flywheel.errors import FlywheelError


@main.group("graders")
def graders_group() -> None:
    """Validate and run graders locally (the platform's /graders/validate and /graders/run)."""


def _grader_objects(path: str) -> list:
    import graders

    try:
        return graders.load_graders(path)
    except (graders.GraderConfigError, OSError, ValueError) as exc:
        raise FlywheelError(str(exc)) from None


@graders_group.command("validate")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@json_option
def graders_validate(path, as_json):
    """Check every grader in FILE (JSON or YAML) and print it normalised."""
    import graders

    out = [graders.validate_grader(cfg.model_dump(by_alias=True, exclude_none=True))["grader"]
           for cfg in _grader_objects(path)]
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for grader in out:
            echo(f"ok  {grader.get('type')}  {grader.get('name')}")


@graders_group.command("run")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--item", "item_json", default="{}", help="The item, as a JSON object.")
@click.option("--sample", "model_sample", required=True, help="The model output to grade.")
@click.option("--judge", default=None, help="Model reference for judge graders (default: their `model`).")
@json_option
def graders_run(path, item_json, model_sample, judge, as_json):
    """Grade one --sample against --item with every grader in FILE: one row per grader (score, passed,
    error); --json prints the platform's run response. Exit 1 when a grader errors."""
    import graders
    from graders.endpoints import response_error

    from flywheel.report.console import print_grader_runs

    from flywheel.grading import GraderSet

    try:
        item = json.loads(item_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--item") from None
    if not isinstance(item, dict):
        raise click.BadParameter(f"must be a JSON object, got {type(item).__name__}", param_hint="--item")
    resolver = GraderSet([])
    results = []
    for cfg in _grader_objects(path):
        judge_fn = (lambda ref: resolver.judge_model(judge)) if judge else resolver.judge_model
        results.append(graders.run_grader(cfg.model_dump(by_alias=True, exclude_none=True), model_sample, item,
                                          judge=judge_fn))
    resolver.close()
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2, default=str))
    else:
        print_grader_runs(results)
    if any(response_error(r) for r in results):
        raise SystemExit(1)


@graders_group.command("calibrate")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="Labelled JSONL/CSV: per row the output to grade and its reference.")
@click.option("--output-field", default="output", show_default=True, help="Field holding the output to grade.")
@click.option("--label-field", default="label", show_default=True,
              help="Field holding the reference: a label, a number, or true/false.")
@click.option("--passing", multiple=True, help="Reference values that count as a pass (repeatable).")
@click.option("--judge", default=None, help="Model reference for judge graders (default: their `model`).")
@click.option("--free-text", is_flag=True, help="Read judges' free-text replies even when they can score choices.")
@click.option("--no-save", is_flag=True, help="Do not store the result (reports show the newest per grader).")
@db_option
@json_option
def graders_calibrate(path, data_path, output_field, label_field, passing, judge, free_text, no_save, db, as_json):
    """Agreement of each grader in FILE with the reference labels of --data (accuracy, kappa, calibration)."""
    from graders.constrained import FreeText

    from flywheel.calibration import calibrate, format_calibration, save_calibrations
    from flywheel.data import read_rows
    from flywheel.grading import GraderSet

    resolver, configs = GraderSet([]), _grader_objects(path)

    def resolve(ref):
        model = resolver.judge_model(judge or ref)
        return FreeText(model) if free_text else model

    try:
        results = calibrate(configs, read_rows(data_path), output_field=output_field,
                            label_field=label_field, passing=list(passing), source=data_path, judge=resolve)
    finally:
        resolver.close()
    if not no_save:
        with store_at(db) as store:
            save_calibrations(store, results, configs, data_path=data_path, judge=judge)
    echo(json.dumps([r.to_dict() for r in results], indent=2) if as_json
               else "\n".join(format_calibration(r) for r in results))
