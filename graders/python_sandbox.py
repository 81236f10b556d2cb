"""`python` graders: the user's `grade(sample, item)` run in sandboxed, reused worker processes.

Each worker is `python -I graders/sandbox_worker.py` started in its own scratch folder (also its
HOME and TMPDIR, emptied after every grade) with a stripped environment (no API keys, no
FLYWHEEL_DB), in its own session. Before user code runs it locks itself down (see
sandbox_worker.py): no network (a new network namespace where the kernel allows, plus a seccomp
filter and Python-level socket guards), no new processes (seccomp; RLIMIT_NPROC when not root),
a memory limit (RLIMIT_AS), a file size limit, and the hidden paths (by default the SQLite files
in the current folder, i.e. the project database) covered by /dev/null in a private mount
namespace.

The parent enforces the wall-clock limit. Every failure is a recorded `python_grader_runtime_error`
grade, within the limit, and the parent keeps working: an exception, a non-numeric return, a
timeout or infinite loop (the worker is killed and replaced), a crash, a fork bomb (fork fails),
a 10 GB allocation (MemoryError), a socket (PermissionError). A worker that cannot be started is a
`python_grader_server_error`. Workers are reused between grades; `close()` stops them.

What it does not do: it is a guard against accidents and runaway code, not a security boundary
for hostile code run as root (that belongs in a container or a separate user).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import select
import signal
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graders.base import DEFAULT_PASS_THRESHOLD, Grader
from graders.config import PythonGraderConfig
from graders.grade import Grade, passes, shorten

WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
DATABASE_PATTERNS = ("*.db", "*.db-wal", "*.db-shm", "*.sqlite", "*.sqlite3")
_KEPT_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SYSTEMROOT")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits and switches for python grader workers (the platform's: 120 s, 2 GB, no network)."""

    timeout_s: float = 120.0
    memory_mb: int = 2048
    file_size_mb: int = 1024
    max_processes: int = 32
    workers: int = 2
    reuse_workers: bool = True
    hidden_paths: tuple[str, ...] = ()
    hide_databases_in_cwd: bool = True
    namespaces: bool = True
    seccomp: bool = True
    startup_timeout_s: float = 30.0

    def all_hidden_paths(self) -> list[str]:
        paths = [os.path.abspath(p) for p in self.hidden_paths]
        if self.hide_databases_in_cwd:
            for pattern in DATABASE_PATTERNS:
                paths.extend(os.path.abspath(p) for p in glob.glob(pattern))
        return sorted(set(paths))


@dataclass
class SandboxResult:
    """What one call of the user's grade() came to."""

    score: float | None
    error: str | None = None  # error kind when score is None
    message: str = ""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)


class WorkerFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "timeout" | "died" | "start"


_FRAME = struct.Struct(">I")


class Worker:
    """One sandboxed worker process and its scratch folder."""

    _ids = itertools.count()

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.id = next(self._ids)
        self.scratch = tempfile.mkdtemp(prefix="graders-sandbox-")
        self.isolation: dict[str, Any] = {}
        self.proc: subprocess.Popen | None = None
        self._start()

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": self.scratch, "TMPDIR": self.scratch, "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        env.update({k: os.environ[k] for k in _KEPT_ENV if k in os.environ})
        return env

    def _start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=self.scratch, env=self._env(), start_new_session=True, close_fds=True,
            )
        except OSError as e:
            raise WorkerFailed("start", f"cannot start a python grader worker: {e}") from None
        setup = {
            "memory_mb": self.limits.memory_mb, "file_size_mb": self.limits.file_size_mb,
            "max_processes": self.limits.max_processes, "hidden": self.limits.all_hidden_paths(),
            "namespaces": self.limits.namespaces, "seccomp": self.limits.seccomp,
        }
        try:
            self._send(setup)
            ready = self._receive(self.limits.startup_timeout_s)
        except WorkerFailed as e:
            self.kill()
            raise WorkerFailed("start", f"the python grader worker did not start: {e}") from None
        self.isolation = ready.get("isolation", {})

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _send(self, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False, default=repr).encode("utf-8")
        try:
            self.proc.stdin.write(_FRAME.pack(len(body)) + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise WorkerFailed("died", self._death()) from None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailed("timeout", "timed out")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise WorkerFailed("timeout", "timed out")
            chunk = os.read(fd, n - got)
            if not chunk:
                raise WorkerFailed("died", self._death())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _receive(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        (size,) = _FRAME.unpack(self._read_exact(4, deadline))
        return json.loads(self._read_exact(size, deadline).decode("utf-8"))

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the worker stopped answering"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (likely out of memory)" if -code == signal.SIGKILL else ""
            return f"the worker process was killed by {name}{hint}"
        return f"the worker process exited with status {code}"

    def call(self, source: str, sample: Any, item: Any, timeout: float) -> dict[str, Any]:
        self._send({"id": 0, "source": source, "sample": sample, "item": item})
        return self._receive(timeout)

    def kill(self) -> None:
        """Kill the worker and everything it started (its process group)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.kill()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        shutil.rmtree(self.scratch, ignore_errors=True)


class SandboxPool:
    """Up to `limits.workers` workers, reused between grades, replaced after a crash or timeout."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._idle: list[Worker] = []
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self.started = 0  # workers started so far (for tests and benchmarks)

    def _acquire(self) -> Worker:
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive:
                        return worker
                    worker.kill()
                    self._count -= 1
                if self._count < max(1, self.limits.workers):
                    self._count += 1
                    break
                self._cond.wait()
        try:
            worker = Worker(self.limits)
        except WorkerFailed:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self.started += 1
        return worker

    def _release(self, worker: Worker, healthy: bool) -> None:
        if not healthy or not self.limits.reuse_workers or self._closed:
            worker.kill()
            with self._cond:
                self._count -= 1
                self._cond.notify()
            return
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def run(self, source: str, sample: Any, item: Any) -> SandboxResult:
        """Call grade(sample, item) from `source` in a worker; never raises for user-code problems."""
        started = time.monotonic()
        try:
            worker = self._acquire()
        except WorkerFailed as e:
            return SandboxResult(None, "python_grader_server_error", str(e))
        healthy = False
        try:
            reply = worker.call(source, sample, item, self.limits.timeout_s)
            healthy = not reply.get("dirty")
            seconds = time.monotonic() - started
            common = dict(stdout=reply.get("stdout", ""), stderr=reply.get("stderr", ""), seconds=seconds,
                          isolation=worker.isolation)
            if reply.get("ok"):
                return SandboxResult(float(reply["score"]), **common)
            return SandboxResult(None, "python_grader_runtime_error", reply.get("error", "unknown error"), **common)
        except WorkerFailed as e:
            seconds = time.monotonic() - started
            if e.kind == "timeout":
                message = f"grade() did not finish within the time limit of {self.limits.timeout_s:g} s"
            else:
                message = f"grade() crashed the worker: {e}"
            return SandboxResult(None, "python_grader_runtime_error", message, seconds=seconds,
                                 isolation=worker.isolation)
        finally:
            self._release(worker, healthy)

    def run_many(self, calls: Sequence[tuple[str, Any, Any]]) -> list[SandboxResult]:
        """Many calls spread over the pool's workers."""
        if len(calls) <= 1 or self.limits.workers <= 1:
            return [self.run(*c) for c in calls]
        with ThreadPoolExecutor(max_workers=min(self.limits.workers, len(calls))) as pool:
            return list(pool.map(lambda c: self.run(*c), calls))

    def close(self) -> None:
        """Stop every idle worker; busy ones stop when they finish."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class PythonGrader(Grader):
    type = "python"

    def __init__(self, config: PythonGraderConfig, *, sandbox: SandboxLimits | SandboxPool | None = None):
        super().__init__(config)
        self.pool = sandbox if isinstance(sandbox, SandboxPool) else SandboxPool(sandbox)
        self._owns_pool = not isinstance(sandbox, SandboxPool)
        self.threshold = config.pass_threshold if config.pass_threshold is not None else DEFAULT_PASS_THRESHOLD

    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        out: list[Grade | None] = [None] * len(samples)
        calls, where = [], []
        for i, (sample, item) in enumerate(zip(samples, items)):
            if isinstance(sample, Exception):
                out[i] = self._failure("sample_parse_error", str(sample))
                continue
            try:
                json.dumps([sample, item], allow_nan=False)
            except (TypeError, ValueError) as e:
                out[i] = self._failure("sample_parse_error", f"the sample or item is not JSON data: {e}")
                continue
            calls.append((self.config.source, sample, item))
            where.append(i)
        for i, result in zip(where, self.pool.run_many(calls)):
            out[i] = self._make(result)
        return out  # type: ignore[return-value]

    def _make(self, result: SandboxResult) -> Grade:
        details: dict[str, Any] = {"name": self.name, "type": self.type, "seconds": round(result.seconds, 4)}
        if result.stdout:
            details["stdout"] = result.stdout
        if result.stderr:
            details["stderr"] = result.stderr
        if result.isolation:
            details["sandbox"] = {k: v for k, v in result.isolation.items() if k != "pid"}
        if result.score is None:
            return Grade.failure(result.error or "python_grader_runtime_error", result.message,
                                 feedback=f"python grader failed: {shorten(result.message, 200)}", details=details)
        ok = passes(result.score, self.threshold)
        details["pass_threshold"] = self.threshold
        feedback = f"grade() returned {result.score:g} (threshold {self.threshold:g}): {'pass' if ok else 'fail'}"
        return Grade(score=result.score, passed=ok, feedback=feedback, details=details)

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()
