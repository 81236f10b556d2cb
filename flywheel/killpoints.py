"""Named points where a test may SIGKILL this process, to land a kill in an exact window.

    FLYWHEEL_KILL_AT=checkpoint-registered flywheel run ...   # dies right after a checkpoint's row commits

Resume tests use it instead of racing a poller against the process (tests/test_wheel.py). Unset,
`reached` costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "FLYWHEEL_KILL_AT"


def reached(name: str) -> None:
    """Kill this process with SIGKILL when `$FLYWHEEL_KILL_AT` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
