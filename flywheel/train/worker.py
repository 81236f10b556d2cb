"""One process of `accelerate launch`: `python -m flywheel.train.worker REQUEST.json RESULT.json`.

flywheel.train.run writes REQUEST.json (method, eval spec file, database, base, recorded set id,
config; or a job to resume) and starts this module on every process; each runs the same
`flywheel.train.run` in its own process (the trainers join over torch.distributed) and rank 0,
which registers the checkpoint, writes the TrainResult to RESULT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from flywheel.errors import FlywheelError
from flywheel.spec import load_eval_spec
from flywheel.store import Store
from flywheel.train.methods import training_method
from flywheel.train.run import TrainRequest, run


def run_worker(request_path: str | Path, result_path: str | Path) -> None:
    """Run the request of `request_path` in this process; the main process writes `result_path`."""
    data: dict[str, Any] = json.loads(Path(request_path).read_text(encoding="utf-8"))
    method = training_method(data["method"])
    config = method.config.model_validate(data["config"]) if data.get("config") is not None else None
    store = Store.open(data["db"])
    try:
        result = run(TrainRequest(method=method.name, spec=load_eval_spec(data["spec"]), store=store,
                                  base=data.get("base"), config=config, data=data.get("data"),
                                  resume=data.get("resume"), evaluate=False, check_data=False,
                                  quiet=bool(data.get("quiet", True))))
    finally:
        store.close()
    if result is not None:  # the main process
        Path(result_path).write_text(json.dumps(result.to_dict()), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m flywheel.train.worker REQUEST.json RESULT.json", file=sys.stderr)
        return 2

    try:
        run_worker(args[0], args[1])
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
