"""What every command shares: the `flywheel` group, its error rule, the --db and --json options, the
store, and terminal-safe echo."""

from __future__ import annotations

from contextlib import contextmanager

import click

from flywheel.errors import FlywheelError
from flywheel.store import Store, default_db_path
from flywheel.terminal import safe_terminal_text

db_option = click.option("--db", default=None, help="SQLite store (default ./flywheel.db or $FLYWHEEL_DB).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


class FlywheelGroup(click.Group):
    """Turns FlywheelError into `error: message` and exit 1, for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FlywheelError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                echo(f"error: {line}", err=True)
            ctx.exit(1)


def echo(text: str, err: bool = False) -> None:
    """click.echo for lines people read: text from files, stores, models or callers in them shows
    its control characters escaped (safe_terminal_text) instead of driving the terminal."""
    click.echo(safe_terminal_text(text, markup=False), err=err)


@click.group(cls=FlywheelGroup)
@click.version_option(package_name="flywheel")
def main() -> None:
    """Make an LLM task better by measurement: eval, optimise, fine-tune, report."""


@contextmanager
def store_at(db: str | None):
    """The store at --db (default ./flywheel.db or $FLYWHEEL_DB), closed when the block ends."""
    store = Store.open(db or default_db_path())
    try:
        yield store
    finally:
        store.close()


def parse_options(pairs) -> dict:
    """`-o key=value` pairs as a dict, each value read as YAML (`-o dtype=fp32 -o max_tokens=64`)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="-o/--option")
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options
