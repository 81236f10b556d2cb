"""Settings read from the environment (`$FLYWHEEL_...`), each parsed one way.

    >>> env_seconds("FLYWHEEL_UNSET_EXAMPLE", 5.0)
    5.0
"""

from __future__ import annotations

import math
import os

from flywheel.errors import FlywheelError


def env_seconds(name: str, default: float, *, zero_ok: bool = False,
                error: type[FlywheelError] = FlywheelError) -> float:
    """`$name` as a finite number of seconds (> 0, or >= 0 with `zero_ok`), `default` when unset or
    empty; anything else is one `error` line naming the variable and its value."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        expected = "a finite number of seconds >= 0" if zero_ok else "a positive number of seconds"
        raise error(f"${name}={raw!r}: expected {expected}")
    return value
