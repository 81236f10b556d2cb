"""The `flywheel` command line: thin click commands over the library.

Library errors (FlywheelError) print one clean line and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click

from flywheel.errors import FlywheelError
from flywheel.store import default_db_path

db_option = click.option("--db", default=None, help="SQLite store (default ./flywheel.db or $FLYWHEEL_DB).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


class FlywheelGroup(click.Group):
    """Turns FlywheelError into `error: message` and exit 1, for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FlywheelError as exc:
            lines = str(exc).splitlines() or [type(exc).__name__]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            ctx.exit(1)


@click.group(cls=FlywheelGroup)
@click.version_option(package_name="flywheel")
def main() -> None:
    """Make an LLM task better by measurement: eval, optimise, fine-tune, report."""


@contextmanager
def _open_store(db: str | None):
    from flywheel.store import Store

    store = Store.open(db or default_db_path())
    try:
        yield store
    finally:
        store.close()


@main.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test", "all"]))
@click.option("--model", default=None, help="Override the spec's model reference.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N items.")
@click.option("--max-errors", type=click.IntRange(min=0), default=None, help="Give up after more failing samples.")
@click.option("-s", "--set", "overrides", multiple=True, help="Override a spec field: key.path=value.")
@db_option
@json_option
def eval_command(spec_path, split, model, limit, max_errors, overrides, db, as_json):
    """Evaluate SPEC on one split and store every sample and grade."""
    from flywheel.harness import run_eval
    from flywheel.models import load_model
    from flywheel.progress import progress_bar
    from flywheel.report.console import print_eval_result
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    with _open_store(db) as store, progress_bar(f"eval {spec.name}", disable=as_json) as progress:
        result = run_eval(spec, store, split=split, limit=limit, max_errors=max_errors,
                          model=load_model(model, spec.model_options) if model else None,
                          command=" ".join(sys.argv), progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_eval_result(result)


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

    with _open_store(db) as store:
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

    with _open_store(db) as store:
        detail = run_detail(store, run_id, failed_only=failed, limit=limit)
    if as_json:
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)


if __name__ == "__main__":  # pragma: no cover
    main()
