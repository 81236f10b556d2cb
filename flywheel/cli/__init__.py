"""The `flywheel` command line: thin click commands over the library, one module per command group.

A command parses, builds a spec, calls one library function and prints. Library errors (FlywheelError)
print one clean line and exit 1; usage errors exit 2 (flywheel.cli.common).
"""

from __future__ import annotations

# Importing a command module registers its commands on `main`.
from flywheel.cli.common import main
from flywheel.cli import captures, exchange, gate, graders, keys, optimize, rescue, runs, serve, service, train, wheel  # noqa: F401

__all__ = ["main"]
