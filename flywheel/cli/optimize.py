"""Prompts and teachers: `flywheel optimize`, `capture`."""

from __future__ import annotations

import json
import sys

import click

from flywheel.cli.common import db_option, echo, json_option, main, parse_options, store_at


@main.command("optimize")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("-s", "--set", "overrides", multiple=True, help="Override a spec field: key.path=value.")
@db_option
@json_option
def optimize_command(spec_path, overrides, db, as_json):
    """Search prompts for SPEC (its `optimize:` block): variants, few-shot, rewrites; paired tests."""
    from flywheel.optimize import optimize_prompt
    from flywheel.report.console import print_optimize_result
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    log = None if as_json else echo
    with store_at(db) as store:
        result = optimize_prompt(spec, store, command=" ".join(sys.argv), log=log)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_optimize_result(result)


@main.command("capture")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True,
              help="Model reference (openai:..., local:...), or reference:FIELD to use the labelled answers.")
@click.option("--n", "n", default=4, show_default=True, type=click.IntRange(min=1), help="Samples per train item.")
@click.option("--temperature", default=None, type=click.FloatRange(0, 2), help="Default: 1.0 when --n > 1.")
@click.option("--prompt", default="best", show_default=True, help="best (top valid score), spec, or a prompt id.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Capture the first N train items.")
@click.option("-o", "--option", "options", multiple=True, help="Teacher model option key=value (e.g. base_url=...).")
@click.option("--inputs", "inputs_path", default=None, type=click.Path(dir_okay=False),
              help="Unlabelled inputs (JSONL/CSV of items) instead of train: kept by self-consistency of the --n "
              "samples.")
@click.option("--id-field", default=None, help="With --inputs: the field holding each input's id.")
@click.option("--min-agreement", default=0.6, show_default=True, type=click.FloatRange(0.5, 1, min_open=True),
              help="With --inputs: share of the --n samples that must agree on the answer.")
@click.option("-s", "--set", "overrides", multiple=True, help="Override a spec field: key.path=value.")
@db_option
@json_option
def capture_command(spec_path, teacher, n, temperature, prompt, limit, options, inputs_path, id_field, min_agreement,
                    overrides, db, as_json):
    """Sample K teacher outputs per train item with the best prompt, grade and store them (or, with
    --inputs, per unlabelled input, accepted by self-consistency)."""
    from flywheel.distill import capture, capture_unlabelled_file
    from flywheel.progress import progress_bar
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    with store_at(db) as store, progress_bar(f"capture {spec.name}", disable=as_json) as progress:
        if inputs_path:
            result = capture_unlabelled_file(spec, store, teacher, inputs_path, id_field=id_field, n=n,
                                             temperature=temperature, min_agreement=min_agreement, prompt=prompt,
                                             limit=limit, teacher_options=parse_options(options),
                                             command=" ".join(sys.argv), progress=progress)
        else:
            result = capture(spec, store, teacher, n=n, temperature=temperature, prompt=prompt, limit=limit,
                             teacher_options=parse_options(options), command=" ".join(sys.argv), progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        where, check = ("unlabelled inputs", "agree with their majority") if inputs_path else ("train items",
                                                                                              "pass every grader")
        echo(f"capture {result.id}: {result.n_samples} samples from {teacher} ({result.n} per item, "
                   f"{result.n_items} {where}): {result.n_passed} {check} ({result.pass_rate:.1%}), "
                   f"{result.items_with_pass} items have an accepted output, {result.n_errors} errors")
