"""`python` graders: the user's `grade(sample, item)` run in sandboxed, reused worker processes.

Each worker is `python -I graders/sandbox_worker.py` with a stripped environment (no API keys, no
FLYWHEEL_DB), in its own session and its own memory cgroup where one is writable. Before user code
runs it locks itself down (sandbox_worker.py; docs/graders.md has the whole list): new mount,
network and IPC namespaces; a private read-only root holding only what Python needs, a size-limited
scratch tmpfs (cwd, HOME, TMPDIR; emptied after every grade) and /dev/shm, and a /proc without
other users' processes; the store's database and other hidden paths are not there; root becomes
nobody; rlimits; a seccomp filter (no processes, programs, sockets, or signals to anyone else by
any route); Python-level socket guards. Each layer falls back cleanly where the kernel refuses it,
and `grade.details["sandbox"]` says what the worker got.

The parent trusts nothing the worker sends: a frame is capped (`MAX_REPLY_BYTES`), parsed with
depth and integer-length bounds (`parse_frame`) and validated (`WorkerReply`: types, finite score,
bounded texts, no extra fields), and must answer the request's random id. User code never holds
this channel: the worker runs each grade in a forked grading process that closes it first
(sandbox_worker.py), so what user code forges reaches only its own result pipe, which the worker
checks in turn. Tasks are capped by a pids cgroup (`pids.max`) where writable, else RLIMIT_NPROC
under the dropped uid (it counts every task of that uid, so the cap is approximate there; as root
without a privilege drop nothing caps threads). A worker only runs one grader's source, and is
retired when it holds unasked-for bytes or a thread. It enforces the wall-clock limit. Every
failure is a recorded `python_grader_runtime_error` grade, within the limit, and the parent keeps
working: an exception, a non-numeric return, a timeout or infinite loop (the worker is killed and
replaced), a crash, a fork bomb, 2,000 threads, a 10 GB allocation, a socket, a forged or
malformed frame. A worker that cannot be started is a `python_grader_server_error`. Workers are reused
between grades; `close()` stops them.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import secrets
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graders.base import DEFAULT_PASS_THRESHOLD, Grader
from graders.config import PythonGraderConfig
from graders.grade import Grade, passes, shorten

WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
DATABASE_PATTERNS = ("*.db", "*.db-wal", "*.db-shm", "*.sqlite", "*.sqlite3")
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of a database file
MAX_REPLY_BYTES = 1 << 20  # a real reply is a few KB (captured output is cut at 4,000 characters)
MAX_REPLY_DEPTH = 4  # a reply is flat; the ready message's isolation report holds lists
MAX_REPLY_INT_DIGITS = 20
MAX_REPLY_TEXT = 10_000  # characters of error, stdout or stderr (the worker cuts them at 8,000 / 4,000)
WORKER_TASKS = 4  # the worker's own tasks (main thread, orphan watchdog) and the grading process, plus one
_KEPT_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SYSTEMROOT")
_registered_hidden: set[str] = set()


def hide_from_sandbox(path: str | os.PathLike) -> None:
    """Hide a file (and its SQLite -wal/-shm/-journal companions) from every worker started after
    this call, wherever it is: e.g. the store calls it with its database path when it opens it."""
    _registered_hidden.add(os.path.realpath(os.fspath(path)))


@dataclass(frozen=True)
class SandboxLimits:
    """Limits and switches for python grader workers (the platform's: 120 s, 2 GB, no network)."""

    timeout_s: float = 120.0
    memory_mb: int = 2048
    file_size_mb: int = 1024
    scratch_mb: int = 256
    shm_mb: int = 64
    max_processes: int = 32
    workers: int = 2
    reuse_workers: bool = True
    hidden_paths: tuple[str, ...] = ()
    hide_databases_in_cwd: bool = True
    namespaces: bool = True
    private_root: bool = True
    drop_privileges: bool = True
    cgroup: bool = True
    seccomp: bool = True
    startup_timeout_s: float = 30.0

    def all_hidden_paths(self) -> list[str]:
        """The explicit, registered and current-folder database paths, with their SQLite companions."""
        paths = [os.path.realpath(p) for p in self.hidden_paths] + sorted(_registered_hidden)
        if self.hide_databases_in_cwd:
            for pattern in DATABASE_PATTERNS:
                paths.extend(os.path.realpath(p) for p in glob.glob(pattern))
        paths += [p + suffix for p in list(paths) for suffix in SIDE_FILES if not p.endswith(suffix)]
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
        self.kind = kind  # "timeout" | "died" | "start" | "protocol"


_FRAME = struct.Struct(">I")


def _open_status(pid: int) -> int | None:
    try:
        return os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _threads(status_fd: int | None) -> int | None:
    """The worker's thread count, read from outside it (a kept /proc/<pid>/status descriptor)."""
    if status_fd is None:
        return None
    try:
        text = os.pread(status_fd, 8192, 0)
        start = text.index(b"\nThreads:") + 9
        return int(text[start:text.index(b"\n", start)])
    except (OSError, ValueError):
        return None


class Cgroup:
    """One controller's cgroup for one worker (v2 or v1): `memory` (memory.max or
    memory.limit_in_bytes: everything the worker's pages cost, tmpfs and kernel memory included)
    or `pids` (pids.max: every task, threads included). None where not writable."""

    _swept: set[str] = set()  # cgroup folders already cleared of dead parents' groups
    LIMIT_FILES = {"memory": ("memory.max", "memory.limit_in_bytes"), "pids": ("pids.max", "pids.max")}

    def __init__(self, path: str, limit_file: str):
        self.path, self.limit_file = path, limit_file

    @classmethod
    def create(cls, controller: str, name: str, limit: int) -> "Cgroup | None":
        for base, limit_file in cls._candidates(controller):
            if base not in cls._swept:
                cls._swept.add(base)
                _sweep(base, lambda path: os.rmdir(path))
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except OSError:
                continue
            group = cls(path, limit_file)
            try:
                group._write(limit_file, str(limit))
                if controller == "memory" and os.path.exists(os.path.join(path, "memory.swap.max")):
                    group._write("memory.swap.max", "0")
                elif controller == "memory" and os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                    group._write("memory.memsw.limit_in_bytes", str(limit))
                return group
            except OSError:
                group.remove()
        return None

    @classmethod
    def _candidates(cls, controller: str) -> list[tuple[str, str]]:
        v2_file, v1_file = cls.LIMIT_FILES[controller]
        out = []
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            if line.count(":") < 2:
                continue
            _, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if controllers == "":
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    try:
                        if controller in Path(root, rel, "cgroup.subtree_control").read_text().split():
                            out.append((os.path.join(root, rel), v2_file))
                    except OSError:
                        pass
            elif controller in controllers.split(","):
                out.append((os.path.join("/sys/fs/cgroup", controller, rel), v1_file))
        return out

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid: int) -> bool:
        try:
            self._write("cgroup.procs", str(pid))
            return True
        except OSError:
            return False

    def remove(self) -> None:
        for _ in range(20):  # the kernel may release a just-reaped process's group a moment later
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _sweep(folder: str, remove: Any) -> None:
    """Remove what workers of dead parents left in `folder` (named graders-sandbox-<parent pid>-...):
    a parent killed with SIGKILL cannot clean up after itself."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if not name.startswith("graders-sandbox-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            remove(os.path.join(folder, name))
        except OSError:
            pass


class Worker:
    """One sandboxed worker process, its scratch folder, and the one grader source it may run."""

    _ids = itertools.count()
    _swept = False

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.id = next(self._ids)
        if not Worker._swept:
            Worker._swept = True
            _sweep(tempfile.gettempdir(), lambda path: shutil.rmtree(path, ignore_errors=True))
        self.base = tempfile.mkdtemp(prefix=f"graders-sandbox-{os.getpid()}-")
        self.scratch = os.path.join(self.base, "scratch")
        self.root = os.path.join(self.base, "root")
        os.mkdir(self.scratch)
        os.mkdir(self.root)
        self.isolation: dict[str, Any] = {}
        self.proc: subprocess.Popen | None = None
        self.cgroups: list[Cgroup] = []
        self.source: str | None = None  # a worker only ever runs one grader's source
        self.threads = 0
        self._status: int | None = None
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
        os.set_blocking(self.proc.stdin.fileno(), False)  # writes wait in select(), with a deadline
        limits = self.limits
        memory = pids = None
        if limits.cgroup and sys.platform.startswith("linux"):
            name = f"graders-sandbox-{os.getpid()}-{self.id}"
            memory = self._join(Cgroup.create("memory", name, limits.memory_mb * 1024 * 1024))  # heap, tmpfs, kernel
            # every task of the worker: its two, the grading process and what user code starts
            pids = self._join(Cgroup.create("pids", name, limits.max_processes + WORKER_TASKS))
        setup = {
            "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb, "scratch_mb": limits.scratch_mb,
            "shm_mb": limits.shm_mb, "max_processes": limits.max_processes, "hidden": limits.all_hidden_paths(),
            "namespaces": limits.namespaces, "private_root": limits.private_root, "root": self.root,
            "drop_privileges": limits.drop_privileges, "seccomp": limits.seccomp,
            "pids_cgroup": pids is not None,
        }
        try:
            self._send(setup, time.monotonic() + limits.startup_timeout_s)
            ready = self._receive(limits.startup_timeout_s)
        except WorkerFailed as e:
            self.kill()
            raise WorkerFailed("start", f"the python grader worker did not start: {e}") from None
        isolation = ready.get("isolation") if isinstance(ready, dict) and ready.get("ready") is True else None
        if not isinstance(isolation, dict):
            self.kill()
            raise WorkerFailed("start", "the python grader worker did not start: no ready message")
        self.isolation = isolation
        self.isolation["cgroup_mb"] = limits.memory_mb if memory else None
        if pids:
            self.isolation["pids_max"] = limits.max_processes + WORKER_TASKS
        self._status = _open_status(self.proc.pid)
        self.threads = _threads(self._status) or 0

    def _join(self, group: Cgroup | None) -> Cgroup | None:
        if group is not None and not group.add(self.proc.pid):
            group.remove()
            return None
        if group is not None:
            self.cgroups.append(group)
        return group

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def usable(self) -> bool:
        """Alive, nothing unasked-for waiting on its pipe, and no thread left behind by user code."""
        if not self.alive:
            return False
        if select.select([self.proc.stdout.fileno()], [], [], 0)[0]:
            return False  # bytes the parent did not ask for: forged frames or a worker out of step
        threads = _threads(self._status)
        return threads is None or threads <= self.threads

    def _send(self, obj: Any, deadline: float) -> None:
        """Write one frame by `deadline`: a worker that stops reading cannot block the parent."""
        body = json.dumps(obj, ensure_ascii=False, default=repr).encode("utf-8")
        data = memoryview(_FRAME.pack(len(body)) + body)
        fd = self.proc.stdin.fileno()
        try:
            while data:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                    raise WorkerFailed("timeout", "timed out")
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    continue
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
            chunk = os.read(fd, min(n - got, 1 << 16))
            if not chunk:
                raise WorkerFailed("died", self._death())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        (size,) = _FRAME.unpack(self._read_exact(4, deadline))
        if size > MAX_REPLY_BYTES:
            raise WorkerFailed("protocol", f"the worker announced a {size:,}-byte reply (limit {MAX_REPLY_BYTES:,})")
        try:
            return parse_frame(self._read_exact(size, deadline))
        except ValueError as e:
            raise WorkerFailed("protocol", f"the worker sent a reply that is not bounded JSON ({shorten(str(e), 200)})") from None

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

    def call(self, source: str, sample: Any, item: Any, timeout: float) -> WorkerReply:
        """One grade; the reply must answer this request (its nonce) and have the reply's shape.
        User code runs in a process of its own that cannot reach this channel (sandbox_worker.py)."""
        nonce = secrets.token_hex(16)
        self.source = source
        deadline = time.monotonic() + timeout
        self._send({"id": nonce, "source": source, "sample": sample, "item": item}, deadline)
        return check_reply(self._receive(max(0.0, deadline - time.monotonic())), nonce)

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
        if self._status is not None:
            os.close(self._status)
            self._status = None
        for group in self.cgroups:
            group.remove()
        shutil.rmtree(self.base, ignore_errors=True)


_JSON_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_REPLY_INT_DIGITS:
        raise ValueError(f"an integer of {len(text):,} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_frame(body: bytes, max_depth: int = MAX_REPLY_DEPTH) -> Any:
    """One frame's JSON, refused (ValueError) when nested deeper than `max_depth`, holding an
    integer longer than MAX_REPLY_INT_DIGITS digits, NaN/Infinity or bytes that are not UTF-8."""
    depth = 0
    for match in _JSON_NESTING.finditer(body):
        char = match.group()
        if char in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
        elif char in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(body.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:  # the scan above already stops real nesting; this is the backstop
        raise ValueError("nested too deeply") from None


class WorkerReply(BaseModel):
    """The worker's answer to one request, checked before anything in it is used."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    id: str = Field(max_length=64, description="The request's random id, echoed.")
    ok: bool = Field(description="Whether grade() returned a number.")
    score: float | None = Field(None, description="grade()'s value (finite) when ok.")
    error: str | None = Field(None, max_length=MAX_REPLY_TEXT, description="Why grade() failed when not ok.")
    stdout: str = Field("", max_length=MAX_REPLY_TEXT, description="The tail of what grade() printed.")
    stderr: str = Field("", max_length=MAX_REPLY_TEXT, description="The tail of what grade() wrote to stderr.")
    dirty: bool = Field(False, description="The grade left processes behind: retire the worker.")

    @model_validator(mode="after")
    def _outcome(self) -> WorkerReply:
        if self.ok and self.score is None:
            raise ValueError("ok without a score")
        if not self.ok and self.error is None:
            raise ValueError("no error message")
        return self


def check_reply(reply: Any, nonce: str) -> WorkerReply:
    """`reply` as the answer to request `nonce`; WorkerFailed("protocol") says why it is not."""
    if not isinstance(reply, dict):
        problem = f"a {type(reply).__name__}, not an object"
    elif reply.get("id") != nonce:
        problem = "it does not answer the request that was sent (wrong or missing request id)"
    else:
        try:
            return WorkerReply.model_validate(reply)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "reply"
            problem = f"{where}: {first['msg']}"
    raise WorkerFailed("protocol", f"the worker sent an invalid reply: {shorten(problem, 200)}")


class SandboxPool:
    """Up to `limits.workers` workers, reused between grades, replaced after a crash or timeout."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._idle: list[Worker] = []
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self.started = 0  # workers started so far (for tests and benchmarks)

    def _acquire(self, source: str) -> Worker:
        """An idle worker that ran this source (or none yet) and is still clean, else a new one."""
        while True:
            stale: Worker | None = None
            with self._cond:
                while True:
                    match = next((w for w in self._idle if w.source in (source, None)), None)
                    if match is not None:
                        self._idle.remove(match)
                        break
                    if self._count < max(1, self.limits.workers):
                        self._count += 1
                        break
                    if self._idle:  # only workers of other sources are free: replace the oldest
                        stale = self._idle.pop(0)
                        break
                    self._cond.wait()
            if stale is not None:
                self._discard(stale)
                continue
            if match is not None:
                if match.usable():
                    return match
                self._discard(match)
                continue
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

    def _discard(self, worker: Worker) -> None:
        worker.kill()
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def _release(self, worker: Worker, healthy: bool) -> None:
        if not healthy or not self.limits.reuse_workers or self._closed:
            self._discard(worker)
            return
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def run(self, source: str, sample: Any, item: Any) -> SandboxResult:
        """Call grade(sample, item) from `source` in a worker; never raises for user-code problems."""
        started = time.monotonic()
        try:
            worker = self._acquire(source)
        except WorkerFailed as e:
            return SandboxResult(None, "python_grader_server_error", str(e))
        healthy = False
        try:
            reply = worker.call(source, sample, item, self.limits.timeout_s)
            healthy = not reply.dirty
            seconds = time.monotonic() - started
            common = dict(stdout=reply.stdout, stderr=reply.stderr, seconds=seconds, isolation=worker.isolation)
            if reply.ok:
                return SandboxResult(reply.score, **common)
            return SandboxResult(None, "python_grader_runtime_error", reply.error or "", **common)
        except WorkerFailed as e:
            seconds = time.monotonic() - started
            if e.kind == "timeout":
                message = f"grade() did not finish within the time limit of {self.limits.timeout_s:g} s"
            elif e.kind == "protocol":
                message = f"grade() broke the worker protocol, reply refused: {e}"
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
