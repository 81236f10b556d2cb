"""Turn the wheel: `flywheel run`."""

from __future__ import annotations

import json
import sys

import click

from flywheel.cli.common import db_option, json_option, main, store_at
from flywheel.errors import FlywheelError


@main.command("run")
@click.argument("spec_path", metavar="SPEC", required=False, type=click.Path(dir_okay=False))
@click.option("--target", type=float, default=None, help="Override the run spec's target (valid objective).")
@click.option("--resume", "resume", default=None, metavar="RUN", help="Continue a stopped or killed run.")
@click.option("--report-dir", default=None, help="Where the HTML report goes (default .flywheel/reports).")
@click.option("-s", "--set", "overrides", multiple=True, help="Override a run spec field: key.path=value.")
@db_option
@json_option
def run_command(spec_path, target, resume, report_dir, overrides, db, as_json):
    """Turn the wheel on SPEC (a run spec) toward --target: prompts, capture, SFT, DPO, RFT."""
    from flywheel.report.console import print_wheel_result
    from flywheel.report.live import wheel_view
    from flywheel.run_spec import load_run_spec
    from flywheel.wheel import WheelState, run_wheel

    with store_at(db) as store:
        if spec_path is None:
            if not resume:
                raise click.UsageError("give a run SPEC, or --resume RUN")
            spec_path = store.run_state(store.get_run(resume).id, WheelState).run_spec
            if not spec_path:
                raise FlywheelError(f"{resume}: the run does not record its run spec; pass SPEC")
        run_spec = load_run_spec(spec_path, list(overrides) + ([f"target={target}"] if target is not None else []))
        with wheel_view(quiet=as_json) as on_event:
            result = run_wheel(run_spec, store, resume=resume, report_dir=report_dir, command=" ".join(sys.argv),
                               on_event=on_event)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_wheel_result(result)
