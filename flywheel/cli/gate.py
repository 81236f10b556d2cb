"""`flywheel gate SPEC --baseline RUN|main.db`: the CI gate (flywheel.gate), a thin command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flywheel.cli.common import echo, main, store_at

from flywheel.errors import FlywheelError


@click.command("gate")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--baseline", required=True, help="A run id in the store, or another store file (main.db): "
              "the newest completed run of the same eval there.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N items.")
@click.option("--max-tokens", type=click.FloatRange(min=0), default=None, help="Token budget (prompt + completion); "
              "samples without a token count fail it.")
@click.option("--max-cost", type=click.FloatRange(min=0), default=None, help="Money budget.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None, help="Time budget (the eval's wall time).")
@click.option("--per", type=click.Choice(["item", "total"]), default="item", show_default=True,
              help="Budgets per item (mean) or for the whole eval.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Significance level of the paired regression test.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), default=None,
              help="Write a Markdown summary (for a pull-request comment) here.")
@click.option("-s", "--set", "overrides", multiple=True, help="Override a spec field: key.path=value.")
@click.option("--db", default=None, help="SQLite store (default ./flywheel.db or $FLYWHEEL_DB).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def gate_command(spec_path, baseline, split, limit, max_tokens, max_cost, max_seconds, per, alpha, summary_path,
                 overrides, db, as_json):
    """Evaluate SPEC and compare it with a baseline; exit 1 on a significant regression or a blown budget."""
    from flywheel.gate import GateBudget, run_gate
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    budget = GateBudget(max_tokens=max_tokens, max_cost=max_cost, max_seconds=max_seconds, per=per)
    with store_at(db) as store:
        result = run_gate(spec, store, baseline, split=split, limit=limit, budget=budget, alpha=alpha,
                          command=" ".join(sys.argv))
    if summary_path:
        try:
            Path(summary_path).write_text(result.markdown(), encoding="utf-8")
        except OSError as exc:
            raise FlywheelError(f"{summary_path}: cannot write the summary: {exc.strerror or exc}") from None
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        echo(f"gate {'passed' if result.passed else 'FAILED'}: {spec.name} on {result.paired} paired {split} items; "
              f"{result.test}")
        for line in result.failures:
            echo(f"  {line}")
    if not result.passed:
        sys.exit(1)


main.add_command(gate_command)
