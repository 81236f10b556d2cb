"""`flywheel rescue` and `flywheel import openai-completions` (thin: parse, call one library function, print)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from flywheel.cli.common import main
from flywheel.cli.exchange import import_group


@click.command("openai-completions")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--from-api", is_flag=True, help="Read the list endpoint through the openai SDK ($OPENAI_BASE_URL).")
@click.option("--base-url", default=None, help="With --from-api: the server (default $OPENAI_BASE_URL).")
@click.option("--metadata", "metadata", multiple=True, help="With --from-api: only completions with key=value.")
@click.option("--model", default=None, help="With --from-api: only completions of this model.")
@click.option("--save", default=None, type=click.Path(dir_okay=False), help="With --from-api: also write the download.")
@click.option("--redact", default="none", show_default=True, type=click.Choice(["replace", "mask", "hash", "none"]),
              help="PII redaction before anything is stored (flywheel.privacy).")
@click.option("--db", default=None, help="Store path (default ./flywheel.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_openai_completions_command(path, from_api, base_url, metadata, model, save, redact, db, as_json):
    """Import stored chat completions (a download FILE, or --from-api) as captures."""
    from flywheel.importers.completions import import_completions_api, import_completions_file
    from flywheel.privacy.redact import parse_redact
    from flywheel.capture_rows import parse_metadata_filters
    from flywheel.store import Store

    if bool(path) == from_api:
        raise click.UsageError("give a FILE or --from-api (one of them)")
    policy = None if redact == "none" else parse_redact(redact, where="--redact")
    with_store = Store.open(db)
    try:
        if from_api:
            result = import_completions_api(with_store, base_url=base_url, metadata=parse_metadata_filters(metadata),
                                            model=model, redact=policy, save=save)
        else:
            result = import_completions_file(with_store, path, redact=policy)
    finally:
        with_store.close()
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else
               f"imported {result.imported} stored completions from {result.source} "
               f"({result.first_created} .. {result.last_created}; models {', '.join(result.models)})")


@click.command("openai-prompts")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--from-api", is_flag=True, help="List /v1/prompts and their versions through the openai SDK.")
@click.option("--base-url", default=None, help="With --from-api: the server (default $OPENAI_BASE_URL).")
@click.option("--save", default=None, type=click.Path(dir_okay=False), help="With --from-api: also write the download.")
@click.option("--db", default=None, help="Store path (default ./flywheel.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_openai_prompts_command(path, from_api, base_url, save, db, as_json):
    """Import prompt objects' versions (a download FILE, or --from-api); specs name them as `prompt: {id, version}`."""
    from flywheel.importers.prompts import import_prompts_api, import_prompts_file
    from flywheel.store import Store

    if bool(path) == from_api:
        raise click.UsageError("give a FILE or --from-api (one of them)")
    store = Store.open(db)
    try:
        result = import_prompts_api(store, base_url=base_url, save=save) if from_api else import_prompts_file(store, path)
    finally:
        store.close()
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else
               f"imported {result.imported} prompt versions from {result.source}: "
               + ", ".join(f"{v['id']}@{v['version']}" for v in result.versions[:10])
               + (" ..." if result.imported > 10 else ""))


@click.group("rescue", invoke_without_command=True)
@click.option("--spec", "spec_path", default=None, type=click.Path(dir_okay=False), help="A rescue spec (YAML).")
@click.option("--eval", "eval_path", default=None, type=click.Path(dir_okay=False), help="The eval spec.")
@click.option("--teacher", default=None, help="The platform fine-tune, openai:ft:...")
@click.option("--student", default=None, help="The local student (default local:smollm2).")
@click.option("--margin", default=None, type=float, help="Non-inferiority margin (default 0.05).")
@click.option("--budget-usd", default=None, type=float, help="Most USD the teacher's calls may cost.")
@click.option("--traffic-metadata", multiple=True, help="Only stored completions with key=value.")
@click.option("-o", "--out", "out_dir", default="rescue-out", show_default=True, help="Folder for the certificate.")
@click.option("--dry-run", is_flag=True, help="Show the teacher calls and their price; spend nothing.")
@click.option("--db", default=None, help="Store path (default ./flywheel.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def rescue_group(ctx, spec_path, eval_path, teacher, student, margin, budget_usd, traffic_metadata, out_dir, dry_run,
                 db, as_json):
    """Rescue a platform fine-tune into a local model, with a parity certificate (docs/rescue.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from flywheel.capture_rows import parse_metadata_filters
    from flywheel.rescue import RescueSpec, load_rescue_spec, plan_rescue, run_rescue
    from flywheel.store import Store

    given = {k: v for k, v in {"eval": eval_path, "teacher": teacher, "student": student, "margin": margin,
                               "budget_usd": budget_usd}.items() if v is not None}
    if traffic_metadata:
        given["traffic"] = {"metadata": parse_metadata_filters(traffic_metadata)}
    if spec_path:
        rescue, base = load_rescue_spec(spec_path, given), Path(spec_path).resolve().parent
    elif "eval" in given and "teacher" in given:
        rescue, base = RescueSpec(**given), None
    else:
        raise click.UsageError("give --spec RESCUE.yaml, or --eval EVAL.yaml and --teacher openai:ft:...")
    store = Store.open(db)
    try:
        if dry_run:
            plan = plan_rescue(rescue, store, base_dir=base)
            click.echo(json.dumps(plan.to_dict(), indent=2) if as_json else "\n".join(plan.summary_lines()))
            return
        result = run_rescue(rescue, store, out_dir=out_dir, base_dir=base, log=lambda line: click.echo(line, err=True))
    finally:
        store.close()
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))
    ctx.exit(0 if result.parity_shown else 3)


@rescue_group.command("verify")
@click.argument("cert_path", metavar="CERT.json", type=click.Path(dir_okay=False))
def rescue_verify_command(cert_path):
    """Recompute a certificate's hashes (its body, the data, the adapter, the spec)."""
    from flywheel.certificate import verify_certificate

    check = verify_certificate(cert_path)
    click.echo("\n".join(check.summary_lines()))
    raise SystemExit(0 if check.ok else 1)


import_group.add_command(import_openai_completions_command)
import_group.add_command(import_openai_prompts_command)
main.add_command(rescue_group)
