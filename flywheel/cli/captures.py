"""Recorded traffic: `flywheel captures list|export|delete`."""

from __future__ import annotations

import json

import click

from flywheel.cli.common import db_option, echo, json_option, main, store_at


@main.group()
def captures() -> None:
    """Browse and export traffic recorded by `flywheel proxy`."""


capture_filters = [
    click.option("--metadata", "metadata", multiple=True, help="Keep captures whose metadata has key=value."),
    click.option("--since", default=None, help="From a date, timestamp or age (2026-11-05, 7d, 12h)."),
    click.option("--until", default=None, help="Up to a date (inclusive) or timestamp."),
    click.option("--model", default=None, help="Only calls to this model."),
]


def _capture_filters(fn):
    for option in reversed(capture_filters):
        fn = option(fn)
    return fn


@captures.command("list")
@_capture_filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--failed", is_flag=True, help="Only failed calls.")
@db_option
@json_option
def captures_list(metadata, since, until, model, limit, failed, db, as_json):
    """List recorded calls, newest first."""
    from flywheel.capture_rows import parse_metadata_filters
    from flywheel.proxy.captures import list_captures, print_captures

    with store_at(db) as store:
        rows = list_captures(store, metadata=parse_metadata_filters(metadata), since=since, until=until,
                             model=model, limit=limit, outcome="failed" if failed else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print_captures(rows)


@captures.command("export")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@_capture_filters
@click.option("--redact", "redact", default="replace", show_default=True,
              type=click.Choice(["replace", "mask", "hash", "none"]), help="PII anonymisation (none: verbatim).")
@click.option("--record-set", is_flag=True, help="Also record the rows as an SFT training set (ts-sft-...).")
@db_option
@json_option
def captures_export(output, metadata, since, until, model, redact, record_set, db, as_json):
    """Write successful captures as SFT JSONL ({"messages": [...]} per line), PII redacted."""
    from flywheel.capture_rows import parse_metadata_filters
    from flywheel.privacy.exports import export_captures
    from flywheel.privacy.redact import parse_redact

    with store_at(db) as store:
        result = export_captures(store, output, metadata=parse_metadata_filters(metadata), since=since,
                                 until=until, model=model, redact=parse_redact(redact != "none" and redact),
                                 record_set=record_set)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        replaced = f", {result.redaction['replaced']} PII entities replaced" if result.redaction else " (not redacted)"
        echo(f"wrote {result.written} examples to {result.path}{replaced}"
                   + (f"; training set {result.training_set_id}" if result.training_set_id else ""))


@captures.command("delete")
@click.option("--id", "ids", multiple=True, type=int, help="A capture id (repeatable).")
@click.option("--metadata", "metadata", multiple=True, help="Captures whose metadata has key=value.")
@click.option("--before", default=None, help="Captures created before a date, timestamp or age (2026-11-05, 90d).")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@db_option
@json_option
def captures_delete(ids, metadata, before, dry_run, db, as_json):
    """Delete captures and every copy in training sets and exports; mark checkpoints trained on them."""
    from flywheel.capture_rows import parse_metadata_filters, parse_when
    from flywheel.privacy.deletion import delete_captures

    with store_at(db) as store:
        result = delete_captures(store, ids=ids, metadata=parse_metadata_filters(metadata),
                                 before=parse_when(before, option="--before"), dry_run=dry_run)
    echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))
