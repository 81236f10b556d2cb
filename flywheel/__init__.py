"""Flywheel: make an LLM task better by measurement.

    from flywheel import load_eval_spec, run_eval, Store
    result = run_eval(load_eval_spec("evals/banking77/eval.yaml"), Store.open("flywheel.db"))
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# torchao (the `quantize` extra; peft and transformers import it whenever it is installed) logs at
# import every optional GPU kernel it cannot load, and torch warns about its pytree registrations:
# noise on every command of a CPU machine. Its real errors still raise.
logging.getLogger("torchao").addHandler(logging.NullHandler())
logging.getLogger("torchao").propagate = False
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__all__ = ["load_eval_spec", "run_eval", "run", "Store", "load_model", "FlywheelError"]


def __getattr__(name: str):
    # Lazy, so `import flywheel` (and `flywheel --help`) stays fast.
    if name == "load_eval_spec":
        from flywheel.spec import load_eval_spec
        return load_eval_spec
    if name == "run_eval":
        from flywheel.harness import run_eval
        return run_eval
    if name == "run":
        from flywheel.wheel import run
        return run
    if name == "Store":
        from flywheel.store import Store
        return Store
    if name == "load_model":
        from flywheel.models import load_model
        return load_model
    if name == "FlywheelError":
        from flywheel.errors import FlywheelError
        return FlywheelError
    raise AttributeError(name)
