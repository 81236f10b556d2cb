"""API keys: `flywheel keys create|list|revoke`."""

from __future__ import annotations

import json

import click

from flywheel.cli.common import db_option, echo, main, store_at


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

    with store_at(db) as store:
        key, key_id = create_key(store, name, project=project, role=role, rpm=rpm)
    echo(f"created {key_id} ({role} of project {project!r}); the key (shown once):", err=True)
    click.echo(key)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def keys_list_command(as_json, db):
    """List API keys (id, prefix, project, role, rpm, revoked); never the keys themselves."""
    from flywheel.api.access import list_keys

    with store_at(db) as store:
        keys = list_keys(store)
    echo(json.dumps(keys, indent=2) if as_json else "\n".join(
        f"{k['id']}  {k['prefix']}…  {k['project']:<12} {k['role']:<7} rpm={k['rpm'] or '-'}"
        + ("  REVOKED" if k["revoked"] else "") + (f"  {k['name']}" if k["name"] else "") for k in keys))


@keys_group.command("revoke")
@click.argument("key_id")
@db_option
def keys_revoke_command(key_id, db):
    """Revoke an API key by id: requests with it get 401 from now on."""
    from flywheel.api.access import revoke_key

    with store_at(db) as store:
        revoke_key(store, key_id)
    echo(f"revoked {key_id}")
