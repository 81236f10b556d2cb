"""Servers: `flywheel serve` (reports, review, the /v1 API), `serve-model`, `proxy`."""

from __future__ import annotations

import click

from flywheel.cli.common import db_option, echo, main, parse_options
from flywheel.store import default_db_path


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
@click.option("--flywheel", "service_yaml", default=None, type=click.Path(dir_okay=False),
              help="Run the service of this service.yaml (proxy, alias models, API + dashboard, laps; docs/service.md).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="With --api: a Host name clients use (repeatable; default: loopback names, or the bind address).")
@db_option
def serve_command(host, port, review, reviewer, api, workers, rate_limit, rate_burst, worker_processes,
                  loopback_role, providers, allowed_hosts, db, service_yaml=None):
    """Browse runs, compare iterations and (with --review) record reviews in a local web app; with --api
    also serve the platform's Files/Evals/Fine-tuning API under /v1 (docs/api.md); with --flywheel run
    the service that turns the wheel by itself (docs/service.md)."""
    import os

    if service_yaml:
        from flywheel.service.run import serve_flywheel
        from flywheel.service.spec import load_service_spec

        serve_flywheel(load_service_spec(service_yaml), on_ready=lambda urls: echo(
            "service: " + ", ".join(f"{k} {v}" for k, v in urls.items()) + " (Ctrl-C stops)", err=True))
        return

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
                  on_ready=lambda url: echo(f"serving the API at {url}v1 and reports at {url} "
                                                  f"({workers} workers; Ctrl-C stops)", err=True))
        return
    if not is_loopback(host):
        echo(f"warning: listening on {host}: anyone who can reach it can read this store"
                   + (" and write reviews" if review else ""), err=True)

    def ready(url):
        echo(f"serving {db_path} at {url} ({'reviewing' if review else 'read-only'}; Ctrl-C stops)", err=True)

    serve_reports(db_path, host=host, port=port, review=review,
                  reviewer=reviewer or (os.environ.get("USER") if review else None), on_ready=ready)




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
        echo(f"serving {model_ref} as model {served!r} at {url}  (Ctrl-C stops)", err=True)

    serve_model(model_ref, options=parse_options(options), host=host, port=port, name=name,
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
        echo(f"proxying {url} -> {upstream_url}, recording into {db_path}  (Ctrl-C stops)", err=True)

    run_proxy(upstream, db_path=db_path, host=host, port=port, timeout=timeout,
              max_body_bytes=int(max_body_mb * 1024 * 1024), max_concurrency=max_concurrency,
              max_buffered_bytes=int(max_buffered_mb * 1024 * 1024), on_ready=ready,
              privacy=proxy_privacy(redact, block_output_pii, retention_days))
