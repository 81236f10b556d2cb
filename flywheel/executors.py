"""Where an eval's samples are generated and graded: here (the default), or on a Ray cluster.

    result = run_eval(spec, store, executor=RayExecutor(address=None, num_cpus=2))  # a local Ray
    flywheel eval evals/banking77/eval.yaml --executor ray --ray-address ray://head:10001

With `RayExecutor`, the harness's chunks of pending samples become Ray tasks; each task loads the
model and the graders once per worker process (kept between tasks), generates the chunk's
completions and grades them, and sends both back. The driver stays the only writer of the store:
it commits each chunk as its task finishes (in finishing order), so a run killed half way
resumes like a local one, skipping what is stored. A task that fails (a worker died, a model
that raised) becomes error rows for its samples, as a failing request does locally; a
FlywheelError raised in a task (a missing API key, say) stops the run with its message, as it
does locally.

Workers need flywheel importable (a local cluster started here inherits this process's
environment; on a real cluster install flywheel on every node or pass a `runtime_env`), the
model's weights or server reachable, and the eval's item fields (sent with each task).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import graders
from flywheel.errors import FlywheelError
from flywheel.grading import GraderSet
from flywheel.models import ChatRequest, Completion, load_model
from flywheel.spec import ExecutorSpec


class ExecutorError(FlywheelError):
    """The executor could not start (Ray missing, cluster unreachable)."""


@dataclass
class ChunkResult:
    """What one task sends back: a completion per request and, per completion without an
    error, the grades (store-ready dicts, one per grader)."""

    completions: list[Completion]
    grades: list[list[dict[str, Any]]]
    wall_s: float = 0.0


# -- the work of one task (runs in a Ray worker; plain Python, testable here) ---------------------
_WORKER_CACHE: dict[str, Any] = {}


def _cached(key: str, build):
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build()
    return _WORKER_CACHE[key]


def generate_and_grade(model_ref: str, model_options: dict[str, Any], grader_configs: list[Any],
                       requests: Sequence[ChatRequest], items: Sequence[dict[str, Any]]) -> ChunkResult:
    """Generate `requests` with the model, then grade the completions against `items`.

    The model and the grader set are built once per process and reused by later calls."""
    started = time.perf_counter()
    model = _cached("model:" + json.dumps([model_ref, model_options], sort_keys=True, default=str),
                    lambda: load_model(model_ref, model_options))
    grader_set = _cached("graders:" + json.dumps([g.model_dump() if hasattr(g, "model_dump") else g
                                                  for g in grader_configs], sort_keys=True, default=str),
                         lambda: GraderSet(grader_configs))
    completions = model.generate(list(requests))
    gradable = [i for i, c in enumerate(completions) if not c.error]
    grades = grader_set.grade([graders.make_sample(completions[i].text) for i in gradable],
                              [items[i] for i in gradable])
    return ChunkResult(completions=completions, grades=grades, wall_s=time.perf_counter() - started)


def build_executor(spec: ExecutorSpec | None, *, kind: str | None = None, address: str | None = None
                   ) -> "RayExecutor | None":
    """The executor to hand the harness for an `executor:` block (None: the local one). `kind` and
    `address` (the command line's --executor, --ray-address) win over the block's."""
    spec = spec or ExecutorSpec()
    if kind or address:
        spec = spec.model_copy(update={"kind": kind or spec.kind, "address": address or spec.address})
    if spec.kind == "local":
        return None
    return RayExecutor(address=spec.address, num_cpus=spec.num_cpus, chunk_size=spec.chunk_size)


# -- the executors --------------------------------------------------------------------------------
@dataclass
class RayExecutor:
    """Fans chunks out as Ray tasks; yields results in finishing order for the driver to store.

    `address`: None starts (or joins, with $RAY_ADDRESS) a cluster here; "auto" joins the local
    node's; "ray://host:10001" a remote one. `num_cpus` sizes a cluster started here. At most
    `max_in_flight` tasks (default: twice the cluster's CPUs) are queued at once; a task is
    `chunk_size` samples (default: the harness's chunk, 4 model batches)."""

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: float = 1.0
    max_in_flight: int | None = None
    chunk_size: int | None = None
    runtime_env: dict[str, Any] | None = None
    _started_here: bool = field(default=False, repr=False)

    def start(self):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'flywheel[ray]'") from None
        if not ray.is_initialized():
            options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                           runtime_env=self.runtime_env)
            if self.address is None and self.num_cpus is not None:
                options["num_cpus"] = self.num_cpus
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(f"ray: cannot start or reach a cluster at {self.address or 'this machine'}: "
                                    f"{str(exc).splitlines()[0]}") from None
            self._started_here = True
        return ray

    def map(self, model_ref: str, model_options: dict[str, Any], grader_configs: list[Any],
            chunks: Sequence[tuple[Sequence[ChatRequest], Sequence[dict[str, Any]]]]) -> Iterator[tuple[int, ChunkResult]]:
        """Run every chunk as a task; yield (chunk index, result) as tasks finish. A task that
        raised yields error completions for its chunk."""
        ray = self.start()
        task = ray.remote(num_cpus=self.cpus_per_task, max_retries=1)(generate_and_grade)
        limit = self.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / self.cpus_per_task))
        waiting: dict[Any, int] = {}
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or waiting:
                while next_chunk < len(chunks) and len(waiting) < limit:
                    requests, items = chunks[next_chunk]
                    ref = task.remote(model_ref, model_options, grader_configs, list(requests), list(items))
                    waiting[ref] = next_chunk
                    next_chunk += 1
                done, _ = ray.wait(list(waiting), num_returns=1)
                index = waiting.pop(done[0])
                try:
                    result = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - a failed task is error rows, not a crash
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, FlywheelError):  # as locally: a usage error stops the run
                        raise cause from None
                    message = f"executor_error: ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                    result = ChunkResult([Completion(text="", error=message, finish_reason="error")
                                          for _ in chunks[index][0]], [])
                yield index, result
        finally:
            for ref in waiting:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False
