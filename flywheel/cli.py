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
            for line in str(exc).splitlines() or [type(exc).__name__]:
                _echo(f"error: {line}", err=True)
            ctx.exit(1)


def _echo(text: str, err: bool = False) -> None:
    """click.echo for lines people read: text from files, stores, models or callers in them shows
    its control characters escaped (safe_terminal_text) instead of driving the terminal."""
    from flywheel.report.console import safe_terminal_text

    click.echo(safe_terminal_text(text, markup=False), err=err)


@click.group(cls=FlywheelGroup)
@click.version_option(package_name="flywheel")
def main() -> None:
    """Make an LLM task better by measurement: eval, optimise, fine-tune, report."""


@contextmanager
def _store_at(db: str | None):
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
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="ray: generate and grade in Ray tasks (pip install 'flywheel[ray]'); the store stays here. "
              "Default: the spec's `executor:`, else local.")
@click.option("--ray-address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: "
              "$RAY_ADDRESS, else a cluster started here.")
@db_option
@json_option
def eval_command(spec_path, split, model, limit, max_errors, overrides, executor, ray_address, db, as_json):
    """Evaluate SPEC on one split and store every sample and grade."""
    from flywheel.executors import ExecutorSpec
    from flywheel.harness import run_eval
    from flywheel.models import load_model
    from flywheel.progress import progress_bar
    from flywheel.report.console import print_eval_result
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(spec_path, list(overrides))
    chosen = spec.executor or ExecutorSpec()
    if executor or ray_address:  # the command line wins over the spec's executor block
        chosen = chosen.model_copy(update={"kind": executor or chosen.kind, "address": ray_address or chosen.address})
    fan_out = chosen.build()
    with _store_at(db) as store, progress_bar(f"eval {spec.name}", disable=as_json) as progress:
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
    log = None if as_json else _echo
    with _store_at(db) as store:
        result = optimize_prompt(spec, store, command=" ".join(sys.argv), log=log)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_optimize_result(result)


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

    with _store_at(db) as store:
        if spec_path is None:
            if not resume:
                raise click.UsageError("give a run SPEC, or --resume RUN")
            spec_path = store.run_state(store.get_run(resume)["id"], WheelState).run_spec
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

    with _store_at(db) as store:
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

    with _store_at(db) as store:
        detail = run_detail(store, run_id, failed_only=failed, limit=limit)
        if detail["run"]["kind"] == "wheel":  # the typed state: older stored shapes read the same way
            detail["run"]["summary"] = store.run_state(detail["run"]["id"], WheelState).model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)


def _options(pairs) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="-o/--option")
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


@main.command("serve-model")
@click.argument("model_ref", metavar="MODEL")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it local).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--name", default=None, help="Model id clients send (default: derived from MODEL).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most sequences per generate call.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch waits for more requests.")
@click.option("-o", "--option", "options", multiple=True, help="Model option key=value (e.g. dtype=fp32).")
def serve_model_command(model_ref, host, port, name, batch_size, max_wait_ms, options):
    """Serve MODEL (e.g. local:smollm2+ckpt/sft-3) on an OpenAI-compatible API."""
    from flywheel.model_server import serve_model

    def ready(served, url):
        _echo(f"serving {model_ref} as model {served!r} at {url}  (Ctrl-C stops)", err=True)

    serve_model(model_ref, options=_options(options), host=host, port=port, name=name,
                batch_size=batch_size, max_wait_ms=max_wait_ms, on_ready=ready)


@main.command("proxy")
@click.option("--upstream", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it local).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the upstream before answering 504.")
@click.option("--max-body-mb", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Larger request bodies are refused with 413.")
@click.option("--max-concurrency", default=64, show_default=True, type=click.IntRange(min=1),
              help="Chat calls in flight at once; more are refused with 429 (and recorded).")
@click.option("--max-buffered-mb", default=256.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Request-body megabytes held at once; past it calls are refused with 429 (and recorded).")
@click.option("--redact", "redact", is_flag=False, flag_value="replace", default=None,
              type=click.Choice(["replace", "mask", "hash"]), help="Store captures with PII anonymised (docs/privacy.md).")
@click.option("--block-output-pii", is_flag=False, flag_value="reject", default=None,
              type=click.Choice(["reject", "redact"]), help="Screen replies: PII the request lacked -> 422 or <KIND>.")
@click.option("--retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Delete captures older than this (at start, then hourly), with their copies.")
@db_option
def proxy_command(upstream, host, port, timeout, max_body_mb, max_concurrency, max_buffered_mb, redact,
                  block_output_pii, retention_days, db):
    """Forward chat calls to --upstream and record each one in the captures table."""
    from flywheel.privacy.policy import proxy_privacy
    from flywheel.proxy.server import run_proxy

    db_path = db or default_db_path()

    def ready(upstream_url, url):
        _echo(f"proxying {url} -> {upstream_url}, recording into {db_path}  (Ctrl-C stops)", err=True)

    run_proxy(upstream, db_path=db_path, host=host, port=port, timeout=timeout,
              max_body_bytes=int(max_body_mb * 1024 * 1024), max_concurrency=max_concurrency,
              max_buffered_bytes=int(max_buffered_mb * 1024 * 1024), on_ready=ready,
              privacy=proxy_privacy(redact, block_output_pii, retention_days))


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
    from flywheel.proxy.captures import list_captures, parse_metadata_filters, print_captures

    with _store_at(db) as store:
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
    from flywheel.proxy.captures import parse_metadata_filters
    from flywheel.privacy.exports import export_captures
    from flywheel.privacy.redact import parse_redact

    with _store_at(db) as store:
        result = export_captures(store, output, metadata=parse_metadata_filters(metadata), since=since,
                                 until=until, model=model, redact=parse_redact(redact != "none" and redact),
                                 record_set=record_set)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        replaced = f", {result.redaction['replaced']} PII entities replaced" if result.redaction else " (not redacted)"
        _echo(f"wrote {result.written} examples to {result.path}{replaced}"
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
    from flywheel.proxy.captures import parse_metadata_filters, parse_when
    from flywheel.privacy.deletion import delete_captures

    with _store_at(db) as store:
        result = delete_captures(store, ids=ids, metadata=parse_metadata_filters(metadata),
                                 before=parse_when(before, option="--before"), dry_run=dry_run)
    _echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))


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
        with _store_at(db) as store:
            path = write_search_report(store, run_ids[0], output)
        _echo(json.dumps({"path": str(path)}) if as_json else f"wrote {path}")
        return
    from flywheel.report.compare import resolve_run_ids

    with _store_at(db) as store:
        result = write_report(store, resolve_run_ids(store, run_ids), output, a=a, b=b)
    if as_json:
        click.echo(json.dumps(asdict(result)))
    else:
        _echo(f"wrote {result.path} ({result.bytes / 1e6:.2f} MB, {result.iterations} iterations, "
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

    with _store_at(db) as store:
        result = export_tracking(store, run_id, to, folder=folder, mlflow_uri=mlflow_uri, experiment=experiment)
    click.echo(result.model_dump_json(indent=2)) if as_json else _echo("\n".join(result.summary_lines()))


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it local).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--review", is_flag=True, help="Allow recording reviews (read-only without it).")
@click.option("--reviewer", default=None, help="Name stored with each review (default: $USER).")
@click.option("--api", is_flag=True, help="Also serve the platform's Files/Evals API under /v1 (keys off loopback).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0, 64), help="Job workers (with --api).")
@click.option("--rate-limit", "rate_limit", default=None, type=click.IntRange(1), metavar="RPM",
              help="With --api: requests per minute per key (429 beyond; a key's own --rpm overrides).")
@click.option("--rate-burst", default=None, type=click.IntRange(1), metavar="N",
              help="With --rate-limit: requests allowed at once (default: the whole minute's).")
@click.option("--worker-processes", is_flag=True, help="With --api: run the workers as processes, not threads.")
@click.option("--loopback-role", type=click.Choice(["admin", "member", "reader", "none"]), default="admin",
              show_default=True, help="With --api: what a keyless client on this machine may do (docs/security.md).")
@click.option("--providers", default=None, type=click.Path(dir_okay=False, exists=True),
              help="With --api: the models API callers may name (local bases, openai: providers; docs/security.md).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="With --api: a Host name clients use (repeatable; default: loopback names, or the bind address).")
@db_option
def serve_command(host, port, review, reviewer, api, workers, rate_limit, rate_burst, worker_processes,
                  loopback_role, providers, allowed_hosts, db):
    """Browse runs, compare iterations and (with --review) record reviews in a local web app; with --api
    also serve the platform's Files/Evals/Fine-tuning API under /v1 (docs/api.md)."""
    import os

    from flywheel.report.review_app import serve_reports
    from flywheel.web import is_loopback

    if rate_burst is not None and rate_limit is None:
        raise click.UsageError("--rate-burst needs --rate-limit (a burst of a limit that is not set limits nothing)")
    if not api and (rate_limit is not None or worker_processes):
        raise click.UsageError(f"{'--rate-limit' if rate_limit is not None else '--worker-processes'} needs --api")
    if not api and (providers or allowed_hosts or loopback_role != "admin"):
        raise click.UsageError("--providers, --allowed-host and --loopback-role need --api")
    db_path = db or default_db_path()
    if api:
        from flywheel.api.app import serve_api

        serve_api(db_path, host=host, port=port, workers=workers, review=review, rate_limit_rpm=rate_limit,
                  rate_limit_burst=rate_burst, worker_processes=worker_processes, loopback_role=loopback_role,
                  providers=providers, allowed_hosts=list(allowed_hosts) or None,
                  reviewer=reviewer or (os.environ.get("USER") if review else None),
                  on_ready=lambda url: _echo(f"serving the API at {url}v1 and reports at {url} "
                                                  f"({workers} workers; Ctrl-C stops)", err=True))
        return
    if not is_loopback(host):
        _echo(f"warning: listening on {host}: anyone who can reach it can read this store"
                   + (" and write reviews" if review else ""), err=True)

    def ready(url):
        _echo(f"serving {db_path} at {url} ({'reviewing' if review else 'read-only'}; Ctrl-C stops)", err=True)

    serve_reports(db_path, host=host, port=port, review=review,
                  reviewer=reviewer or (os.environ.get("USER") if review else None), on_ready=ready)


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
    with _store_at(db) as store, progress_bar(f"capture {spec.name}", disable=as_json) as progress:
        if inputs_path:
            result = capture_unlabelled_file(spec, store, teacher, inputs_path, id_field=id_field, n=n,
                                             temperature=temperature, min_agreement=min_agreement, prompt=prompt,
                                             limit=limit, teacher_options=_options(options),
                                             command=" ".join(sys.argv), progress=progress)
        else:
            result = capture(spec, store, teacher, n=n, temperature=temperature, prompt=prompt, limit=limit,
                             teacher_options=_options(options), command=" ".join(sys.argv), progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        where, check = ("unlabelled inputs", "agree with their majority") if inputs_path else ("train items",
                                                                                              "pass every grader")
        _echo(f"capture {result.id}: {result.n_samples} samples from {teacher} ({result.n} per item, "
                   f"{result.n_items} {where}): {result.n_passed} {check} ({result.pass_rate:.1%}), "
                   f"{result.items_with_pass} items have an accepted output, {result.n_errors} errors")


class _TrainGroup(FlywheelGroup):
    """`flywheel train`: one subcommand per training method, built from the methods table when asked
    for (so `flywheel --help` does not import the training stack), plus `export`."""

    def list_commands(self, ctx):
        from flywheel.train.methods import METHODS

        return [*METHODS, *super().list_commands(ctx)]

    def get_command(self, ctx, name):
        from flywheel.train.methods import METHODS

        return _train_command(METHODS[name]) if name in METHODS else super().get_command(ctx, name)


@main.group("train", cls=_TrainGroup)
def train_group() -> None:
    """Fine-tune on captured data: sft, dpo or rft (GRPO); locally with TRL, or hosted."""


# Options of each method's set builder (flywheel.train.methods: TrainingMethod.set_options).
_SET_OPTIONS = {
    "min_score": click.option("--min-score", type=float, default=None, help="Keep captures scoring at least this on "
                              "the objective (default: those that pass every grader)."),
    "max_per_item": click.option("--max-per-item", default=1, show_default=True, type=click.IntRange(min=1),
                                 help="Distinct passing outputs kept per item."),
    "min_margin": click.option("--min-margin", default=0.5, show_default=True, type=click.FloatRange(min=0),
                               help="Least objective-score gap between the preferred and the rejected output."),
}


def _train_command(method):
    """`flywheel train <method>`: one command per row of the methods table."""

    def command(spec_paths, weights, base, config_path, settings, data, splits, no_eval, options, db, as_json,
                launcher, num_processes, accelerate_config, cpu, resume, search_path, trials, sampler, wall_s,
                **set_options):
        from pathlib import Path

        from pydantic import ValidationError

        from flywheel.spec import load_eval_spec
        from flywheel.train import TrainRequest, load_train_config, run
        from flywheel.train.launch import LaunchSpec
        from flywheel.train.run import check_launch

        try:  # the launcher rules live with LaunchSpec (a weight stage's `launcher` too)
            launch = LaunchSpec(kind=launcher, num_processes=num_processes, config_file=accelerate_config, cpu=cpu)
        except ValidationError as exc:
            raise click.UsageError(_launch_flags(exc.errors()[0]["msg"].removeprefix("Value error, "))) from None
        if not search_path and (trials or sampler or wall_s):
            raise click.UsageError("--trials, --sampler and --wall-s need --search")
        if search_path and no_eval:
            raise click.UsageError("--search scores every trial on valid: drop --no-eval")
        if resume and (base or data or settings or config_path or len(spec_paths) > 1):
            raise click.UsageError("--resume continues one job with its own base, data and config: give its SPEC "
                                   "alone, without --base, --data, -s and -c")
        if not resume and not base:
            raise click.UsageError("give --base (or --resume JOB)")
        launch = launch.resolved(Path.cwd())  # a missing config file is one clean error before anything starts
        check_launch(launch, searching=search_path is not None)
        specs = [load_eval_spec(path) for path in spec_paths]
        weight_list = _weights(weights, len(specs))
        if weight_list and len(specs) == 1:
            raise click.UsageError("--weights weighs several SPECs against each other; give two or more")
        if len(specs) > 1 and data:
            raise click.UsageError("--data trains on one file; drop it to build and combine each eval's set")
        if len(specs) > 1 and search_path:
            raise click.UsageError("--search tunes one eval's training; give one SPEC")
        if resume and search_path:
            raise click.UsageError("--resume continues one job; --search starts new ones: give one of them")
        config = None if resume else load_train_config(method.name, config_path, list(settings))
        search = None
        if search_path:  # checked against the method's config before anything trains
            from flywheel.train.search import load_search_spec

            search = load_search_spec(method.name, search_path, base=config, trials=trials, sampler=sampler,
                                      wall_s=wall_s)
        with _store_at(db) as store:
            if len(specs) > 1:  # one adapter on the weighted union of the evals' sets (flywheel.train.multi)
                from flywheel.train.multi import train_multi

                result = train_multi(method.name, specs, store, base=base, weights=weight_list, config=config,
                                     evaluate=not no_eval, splits=splits, quiet=as_json, launch=launch,
                                     **set_options)
            else:
                result = run(TrainRequest(
                    method=method.name, spec=specs[0], store=store, base=base, config=config, data=data,
                    set_options=set_options, evaluate=not no_eval, splits=splits, resume=resume, search=search,
                    launch=launch, hosted_options=_options(options), quiet=as_json,
                    log=None if as_json else lambda line: _echo(line, err=True)))
        if result is None:  # a non-main process under accelerate launch
            return
        _echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))

    options = [
        click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--weights", default=None, help="With several SPECs: how many times an epoch goes over each "
                     "eval's rows, comma-separated (default 1 each), e.g. 2,1 or 1,0.5."),
        click.option("--base", default=None, help="local:MODEL[+ADAPTER], a checkpoint id, or openai:MODEL (hosted)."),
        click.option("--resume", default=None, metavar="JOB", help="Continue a killed local job from its last saved "
                     "step (it must have trained with save_steps); a re-run of the same command resumes too."),
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Training config YAML."),
        click.option("-s", "--set", "settings", multiple=True, help="Override a training setting: key.path=value."),
        click.option("--data", default=None, help="Train on a platform JSONL file or a recorded set id (ts-...)."),
        click.option("--split", "splits", multiple=True, default=("valid", "test"), show_default=True,
                     type=click.Choice(["valid", "test"]), help="Evaluate the checkpoint on these splits."),
        click.option("--no-eval", is_flag=True, help="Register the checkpoint without evaluating it."),
        click.option("-o", "--option", "options", multiple=True, help="Hosted backend option key=value."),
        *(_SET_OPTIONS[name] for name in method.set_options), db_option, json_option,
        click.option("--launcher", type=click.Choice(["local", "accelerate"]), default="local", show_default=True,
                     help="local: train here; accelerate: run this command under `accelerate launch`."),
        click.option("--num-processes", type=click.IntRange(min=1), default=None,
                     help="Processes for --launcher accelerate (default: the accelerate config's)."),
        click.option("--accelerate-config", default=None, help="accelerate config file, or a shipped template: "
                     "ddp, deepspeed_zero2, deepspeed_zero3, fsdp (flywheel/train/accelerate_configs)."),
        click.option("--cpu", is_flag=True, help="With --launcher accelerate: CPU processes over gloo."),
        click.option("--search", "search_path", type=click.Path(dir_okay=False), default=None,
                     help="Hyper-parameter search over a YAML space of config keys (docs/training.md, Hyper-parameter search)."),
        click.option("--trials", type=click.IntRange(min=1), default=None, help="--search: most trials (default 10)."),
        click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default=None,
                     help="--search: tpe (Bayesian, the default), random or grid."),
        click.option("--wall-s", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="--search: wall-clock budget; no trial starts once it is spent."),
    ]
    for option in reversed(options):
        command = option(command)
    command.__doc__ = method.summary[0].upper() + method.summary[1:] + "."
    return click.command(method.name)(command)




def _launch_flags(message: str) -> str:
    """A LaunchSpec rule in the words of `flywheel train`'s options."""
    for field, flag in (("num_processes", "--num-processes"), ("config_file", "--accelerate-config"),
                        ("cpu", "--cpu"), ("kind: accelerate", "--launcher accelerate")):
        message = message.replace(field, flag)
    return message.replace(", --cpu and main_process_port", " and --cpu")


def _weights(text: str | None, n_specs: int) -> list[float] | None:
    """`--weights 2,1` as floats, one per SPEC (a usage error otherwise)."""
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise click.UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 2,1") from None
    if len(weights) != n_specs:
        raise click.UsageError(f"--weights {text!r}: {len(weights)} weight(s) for {n_specs} SPEC(s); give one per SPEC")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise click.UsageError(f"--weights {text!r}: weights must be positive numbers")
    return weights


@train_group.command("export")
@click.argument("kind", metavar="METHOD")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Platform-format JSONL to write.")
@click.option("--hf", "hf_dir", default=None, type=click.Path(file_okay=False), help="Also save a HF dataset here.")
@click.option("--min-score", type=float, default=None, help="SFT: objective score a capture must reach.")
@click.option("--min-margin", default=0.5, show_default=True, type=click.FloatRange(min=0), help="DPO: least gap.")
@db_option
@json_option
def train_export_command(kind, spec_path, output, hf_dir, min_score, min_margin, db, as_json):
    """Build a training set from the store, record it, and write it as platform JSONL (and HF)."""
    from flywheel.spec import load_eval_spec
    from flywheel.train import record_training_set, to_hf_dataset, training_method

    spec = load_eval_spec(spec_path)
    with _store_at(db) as store:
        options = {"min_score": min_score, "min_margin": min_margin, "max_per_item": 1}
        method = training_method(kind)
        training_set = record_training_set(store, method.build_set(
            spec, store, **{k: options[k] for k in method.set_options}))
    path = training_set.to_jsonl(output)
    with _store_at(db) as store:  # recorded, so that `captures delete` finds copies in it
        from flywheel.privacy.lineage import record_export

        record_export(store, path, kind, training_set.rows, source={"training_set": training_set.id})
    if hf_dir:
        to_hf_dataset(training_set).save_to_disk(hf_dir)
    summary = {"id": training_set.id, "kind": kind, "rows": len(training_set), "path": str(path),
               "content_hash": training_set.content_hash, "hf": hf_dir, "source": training_set.source}
    _echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {len(training_set)} {kind} rows to {path} (set {training_set.id})")


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
            _echo(f"ok  {grader.get('type')}  {grader.get('name')}")


@graders_group.command("run")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--item", "item_json", default="{}", help="The item, as a JSON object.")
@click.option("--sample", "model_sample", required=True, help="The model output to grade.")
@click.option("--judge", default=None, help="Model reference for judge graders (default: their `model`).")
@click.option("--json", "as_json", is_flag=True, help="Print the platform's run response (a list for several).")
def graders_run(path, item_json, model_sample, judge, as_json):
    """Grade one --sample against --item with every grader in FILE: one line per grader (score, passed,
    error); exit 1 when a grader errors."""
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
        with _store_at(db) as store:
            save_calibrations(store, results, configs, data_path=data_path, judge=judge)
    _echo(json.dumps([r.to_dict() for r in results], indent=2) if as_json
               else "\n".join(format_calibration(r) for r in results))


@main.group("keys")
def keys_group() -> None:
    """API keys for `flywheel serve --api` off loopback."""


@keys_group.command("create")
@click.option("--name", default="", help="A label for the key.")
@click.option("--project", default="default", show_default=True, help="The project whose objects the key sees.")
@click.option("--role", type=click.Choice(["admin", "member", "reader"]), default="member", show_default=True,
              help="reader: read only; admin: also server-side paths.")
@click.option("--rpm", type=click.IntRange(1), default=None, help="This key's requests per minute (else the server's).")
@db_option
def keys_create_command(name, project, role, rpm, db):
    """Create an API key and print it (only its hash is stored: it is shown this once)."""
    from flywheel.api.access import create_key

    with _store_at(db) as store:
        key, key_id = create_key(store, name, project=project, role=role, rpm=rpm)
    _echo(f"created {key_id} ({role} of project {project!r}); the key (shown once):", err=True)
    click.echo(key)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def keys_list_command(as_json, db):
    """List API keys (id, prefix, project, role, rpm, revoked); never the keys themselves."""
    from flywheel.api.access import list_keys

    with _store_at(db) as store:
        keys = list_keys(store)
    _echo(json.dumps(keys, indent=2) if as_json else "\n".join(
        f"{k['id']}  {k['prefix']}…  {k['project']:<12} {k['role']:<7} rpm={k['rpm'] or '-'}"
        + ("  REVOKED" if k["revoked"] else "") + (f"  {k['name']}" if k["name"] else "") for k in keys))


@keys_group.command("revoke")
@click.argument("key_id")
@db_option
def keys_revoke_command(key_id, db):
    """Revoke an API key by id: requests with it get 401 from now on."""
    from flywheel.api.access import revoke_key

    with _store_at(db) as store:
        revoke_key(store, key_id)
    _echo(f"revoked {key_id}")


@main.group("import")
def import_group() -> None:
    """Turn the hosted platform's exported definitions into Flywheel specs."""


from flywheel.rescue_cli import import_openai_completions_command, import_openai_prompts_command, rescue_group  # noqa: E402

import_group.add_command(import_openai_completions_command)
import_group.add_command(import_openai_prompts_command)
main.add_command(rescue_group)


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
    _echo(f"wrote {result.spec_path} ({result.graders} graders) and {result.data_path} ({result.items} items)")


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

    with _store_at(db) as store:
        result = import_openai_job(store, job_path, training_path, validation_path=validation_path, model=model,
                                   project=project, config_out=config_out, result_path=result_path)
    job = result.job
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    _echo(f"queued {job['id']} ({job['method']['type']} on {job['model']}, project {project!r}); "
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
        with _store_at(db) as store:
            result = export_model(model_ref, output, quantize=quantize, dtype=dtype, overwrite=force, store=store)
    _echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))


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


from flywheel.gate_cli import gate_command  # noqa: E402 - the lead moves it into flywheel/cli/

main.add_command(gate_command)


if __name__ == "__main__":  # pragma: no cover
    main()
