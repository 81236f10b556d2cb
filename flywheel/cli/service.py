"""`flywheel service ...`: the service's commands (status, lap, rollback); `flywheel serve --flywheel`
starts it. Each command reads the service.yaml to find its store, calls one library function, prints."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from flywheel.cli.common import echo, main


def _store(spec):
    from flywheel.store import Store

    return Store.open(spec.path(spec.db))


spec_argument = click.argument("spec_path", metavar="SERVICE_YAML", type=click.Path(dir_okay=False))


@click.group("service")
def service_group() -> None:
    """The running service: its aliases, laps and switches."""


@service_group.command("status")
@spec_argument
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status_command(spec_path, as_json):
    """Aliases, online scores, laps and switches."""
    from flywheel.report.service_view import service_summary
    from flywheel.service.spec import load_service_spec

    store = _store(load_service_spec(spec_path))
    try:
        summary = service_summary(store)
    finally:
        store.close()
    echo(json.dumps(asdict(summary), indent=2, default=str) if as_json else "\n".join(summary.lines()))


@service_group.command("lap")
@spec_argument
def lap_command(spec_path):
    """Queue a lap over the new captures now (the running service's queue runs it)."""
    from flywheel.api.routes.service import NO_LAP_QUEUED
    from flywheel.service.laps import queue_lap
    from flywheel.service.spec import load_service_spec

    store = _store(load_service_spec(spec_path))
    try:
        lap = queue_lap(store, load_service_spec(spec_path), trigger="on_demand")
    finally:
        store.close()
    if lap is None:
        echo(NO_LAP_QUEUED)  # the API's 409 says the same
    else:
        echo(f"lap {lap.id}: {lap.status} ({lap.captures} captures)" + (f": {lap.reason}" if lap.reason else ""))


@service_group.command("rollback")
@spec_argument
@click.option("--why", required=True, help="Why (recorded with the switch).")
@click.option("--who", default=None, help="Who (default: $USER).")
@click.option("--alias", default="production", show_default=True, type=click.Choice(["production", "candidate"]))
def rollback_command(spec_path, why, who, alias):
    """Reverse the newest switch of an alias (recorded, and itself reversible)."""
    import os

    from flywheel.service.aliases import rollback
    from flywheel.service.spec import load_service_spec

    store = _store(load_service_spec(spec_path))
    try:
        switch = rollback(store, who=who or os.environ.get("USER") or "cli", why=why, alias=alias)
    finally:
        store.close()
    echo(f"{alias} -> {switch.to_target.model} (switch {switch.id} reverts {switch.reverts})")


main.add_command(service_group)
