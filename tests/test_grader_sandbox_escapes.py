"""Adversarial probes of the python grader sandbox: one per escape route we know of (issue 13's and
the ones contained before it), each a real grader run in a real worker, judged from OUTSIDE the
sandbox (is the victim process alive, did a file appear on the host, what did the parent accept).

The platform promises no network, 2 GB and 2 minutes; the probes also hold the isolation that
makes those promises mean something (no signals out, no host files, an honest protocol).
`benchmarks/sandbox_probes.py` replays this same catalogue and prints the table.

A probe that needs a kernel layer this machine does not give (seccomp, a private mount namespace)
is skipped with the layer named, never passed: see `Probe.requires`.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sqlite3
import subprocess
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import graders
from graders import SandboxLimits, SandboxPool

FILL_MB = 3000  # what the fill probes try to write (the benchmark's layers-off baseline writes less)
PLATFORM = dict(timeout_s=5, memory_mb=2048)  # 2 GB as on the platform; a short wall clock for tests
OK = "def grade(sample, item):\n    return 0.5\n"

# user-code preamble: raw syscalls through ctypes (what a hostile grader uses to go around Python)
PRE = textwrap.dedent("""
    import ctypes, errno, fcntl, os, platform, signal, socket, struct, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    COL = 0 if platform.machine() == "x86_64" else 1
    NR = {"kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
          "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
          "socket": (41, 198), "connect": (42, 203), "memfd_create": (319, 279), "shmget": (29, 194),
          "ptrace": (101, 117), "unshare": (272, 97), "execve": (59, 221)}

    def sc(name, *args):
        ctypes.set_errno(0)
        r = libc.syscall(NR[name][COL], *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
        return r, errno.errorcode.get(ctypes.get_errno(), "0")

    def attempt(log, what, fn):
        try:
            log.append(f"{what}: {fn()}")
        except OSError as e:
            log.append(f"{what}: {type(e).__name__} {e.errno}")

    def proto():
        f = sys._getframe()
        while f is not None and "proto_out" not in f.f_locals:
            f = f.f_back
        return f.f_locals["proto_out"], f.f_locals["request"]["id"]

    def forge(data):
        # write `data` wherever a reply could travel: the protocol stream found in memory, every fd
        wrote = []
        try:
            out, _ = proto()
            out.write(data)
            wrote.append("protocol stream")
        except Exception:
            pass
        for fd in range(3, 256):
            try:
                os.write(fd, data)
                wrote.append(fd)
            except OSError:
                pass
        print("forged into", wrote)
        return wrote

    def frame(obj):
        import json
        body = json.dumps(obj).encode()
        return struct.pack(">I", len(body)) + body
""")


@dataclass
class Ctx:
    """What a probe's setup prepared and its verdict inspects."""

    tmp: Path
    pool: SandboxPool
    item: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class Probe:
    name: str
    limit: str  # the promise it tests: "no network", "2 GB", "2 minutes", "isolation", "protocol", "errors"
    source: str  # the body of grade(sample, item); PRE is prepended
    verdict: Callable[[graders.Grade, Ctx], str | None]  # None when contained, else what escaped
    setup: Callable[[Ctx], None] | None = None
    requires: tuple[str, ...] = ()  # isolation keys of which at least one must be on, else skip
    limits: dict[str, Any] = field(default_factory=dict)
    unsafe_without_layers: bool = False  # the benchmark's layers-off baseline must never run it

    def program(self) -> str:
        return PRE + "\ndef grade(sample, item):\n" + textwrap.indent(textwrap.dedent(self.source), "    ")


LAYERS = {"seccomp": "a seccomp filter (kernel seccomp-bpf)",
          "private_root": "a private mount namespace (unshare CLONE_NEWNS + pivot_root)",
          "uid": "a privilege drop to nobody", "netns": "a network namespace (unshare CLONE_NEWNET)",
          "cgroup_mb": "a writable memory cgroup (v2 memory.max or v1 memory.limit_in_bytes)",
          "pids_max": "a writable pids cgroup (pids.max)",
          "max_processes": "RLIMIT_NPROC under a dropped uid"}


def run_probe(probe: Probe, tmp: Path, *, override: dict[str, Any] | None = None, force: bool = False) -> str | None:
    """Run one probe; None when contained, else a description of the escape. Skips (pytest.skip)
    when the machine lacks every layer the probe relies on, unless `force` (the benchmark's
    layers-off baseline, which `override`s the limits)."""
    limits = SandboxLimits(**{**PLATFORM, "workers": 1, **probe.limits, **(override or {})})
    pool = SandboxPool(limits)
    ctx = Ctx(tmp, pool)
    try:
        isolation = _grade(pool, OK, {}).details.get("sandbox", {})
        missing = [k for k in probe.requires if not (isolation.get(k) if k != "uid" else isolation.get(k) == 65534)]
        if probe.requires and len(missing) == len(probe.requires) and not force:
            gave = {k: isolation.get(k) for k in ("userns", "private_root", "uid", "seccomp", "cgroup_mb", "why")}
            pytest.skip(f"needs {' or '.join(LAYERS.get(k, k) for k in missing)}; this machine gave {gave}")
        if probe.setup:
            probe.setup(ctx)
        grade = _grade(pool, probe.program(), ctx.item)
        escaped = probe.verdict(grade, ctx)
        if escaped is None and _grade(pool, OK, {}).score != 0.5:
            escaped = "the parent could not grade after the probe"
        return escaped
    finally:
        pool.close()
        for fn in reversed(ctx.cleanup):
            fn()


def _grade(pool: SandboxPool, source: str, item: dict[str, Any]) -> graders.Grade:
    return graders.build_grader({"type": "python", "name": "probe", "source": source}, sandbox=pool).grade("x", item)


def error_with(*needles: str) -> Callable[[graders.Grade, Ctx], str | None]:
    def verdict(g: graders.Grade, ctx: Ctx) -> str | None:
        if g.error and all(n in (g.error_details or "") for n in needles):
            return None
        return f"expected an error with {needles}, got score {g.score} / {g.error_details!r:.200}"
    return verdict


def stdout_has_no(*forbidden: str, need: str = "") -> Callable[[graders.Grade, Ctx], str | None]:
    def verdict(g: graders.Grade, ctx: Ctx) -> str | None:
        out = g.details.get("stdout", "")
        if g.error or need not in out:
            return f"the probe did not run to the end: {g.error_details or out!r:.300}"
        leaked = [f for f in forbidden if f in out]
        return f"{leaked} in {out!r:.300}" if leaked else None
    return verdict


# --- signals --------------------------------------------------------------------------------------

def start_victims(ctx: Ctx) -> None:
    victim = subprocess.Popen(["sleep", "120"])
    ctx.cleanup.append(lambda: (victim.kill(), victim.wait()))
    ctx.host["victim"] = victim
    ctx.item = {"targets": [victim.pid, os.getpid()]}  # another process of this user, and the parent


def victims_alive(g: graders.Grade, ctx: Ctx) -> str | None:
    victim = ctx.host["victim"]
    if victim.poll() is not None:  # (had the parent been killed, this line would never run)
        return f"the other process was killed ({victim.returncode}); grader said {g.details.get('stdout')!r:.300}"
    return None if g.error is None else f"the probe did not run: {g.error_details}"


SIGINFO = "struct.pack('iii', 9, 0, -1) + bytes(116)"  # si_code SI_QUEUE, as sigqueue() sends
SIGNAL_PROBES = {
    "kill() the parent and another process": "attempt(log, 'kill', lambda: os.kill(t, 9))",
    "tkill / tgkill": "log.append(sc('tkill', t, 9)); log.append(sc('tgkill', t, t, 9))",
    "rt_sigqueueinfo": f"buf = ctypes.create_string_buffer({SIGINFO}, 128); log.append(sc('rt_sigqueueinfo', t, 9, buf))",
    "rt_tgsigqueueinfo": f"buf = ctypes.create_string_buffer({SIGINFO}, 128); log.append(sc('rt_tgsigqueueinfo', t, t, 9, buf))",
    "pidfd_open + pidfd_send_signal": "fd, e = sc('pidfd_open', t, 0); log.append((fd, e, sc('pidfd_send_signal', fd, 9, 0, 0) if fd >= 0 else None))",
    "fcntl F_SETOWN + F_SETSIG + O_ASYNC": textwrap.dedent("""\
        r, w = os.pipe()
        attempt(log, 'F_SETOWN', lambda: fcntl.fcntl(r, fcntl.F_SETOWN, t))
        attempt(log, 'F_SETSIG', lambda: fcntl.fcntl(r, 10, 9))
        attempt(log, 'O_ASYNC', lambda: fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC))
        os.write(w, b'x')"""),
    "fcntl F_SETOWN_EX + O_ASYNC": textwrap.dedent("""\
        r, w = os.pipe()
        attempt(log, 'F_SETOWN_EX', lambda: fcntl.fcntl(r, 15, struct.pack('ii', 1, t)))
        attempt(log, 'F_SETSIG', lambda: fcntl.fcntl(r, 10, 9))
        attempt(log, 'O_ASYNC', lambda: fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC))
        os.write(w, b'x')"""),
    "ioctl FIOSETOWN / SIOCSPGRP + O_ASYNC": textwrap.dedent("""\
        pair = (ctypes.c_int * 2)()
        log.append(('socketpair', libc.socketpair(1, 1, 0, pair)))  # allowed: it reaches nothing
        r, w = pair[0], pair[1]
        attempt(log, 'FIOSETOWN', lambda: fcntl.ioctl(r, 0x8901, struct.pack('i', t)))
        attempt(log, 'SIOCSPGRP', lambda: fcntl.ioctl(r, 0x8902, struct.pack('i', t)))
        attempt(log, 'F_SETSIG', lambda: fcntl.fcntl(r, 10, 9))
        attempt(log, 'O_ASYNC', lambda: fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC))
        os.write(w, b'x')"""),
}


def signal_probe(name: str, body: str, limits: dict[str, Any] | None = None, suffix: str = "") -> Probe:
    source = "log = []\nfor t in item['targets']:\n" + textwrap.indent(body, "    ") + "\n    time.sleep(0.2)\nprint(log)\nreturn 0.0\n"
    return Probe(f"signal: {name}{suffix}", "isolation", source, victims_alive, start_victims,
                 requires=("seccomp", "uid") if not limits else ("seccomp",), limits=limits or {})


# --- files ----------------------------------------------------------------------------------------

def make_database(ctx: Ctx, register: bool) -> None:
    folder = Path(tempfile.mkdtemp(prefix="graders-probe-db-", dir=ctx.tmp))
    db = folder / "store.db"
    conn = sqlite3.connect(db)
    conn.execute("pragma journal_mode=wal")
    conn.execute("create table secrets (v text)")
    conn.execute("insert into secrets values ('SECRET-ROW-7F3A')")
    conn.commit()
    ctx.cleanup.append(conn.close)  # kept open: -wal and -shm exist while the probe runs
    if register:
        graders.hide_from_sandbox(db)
    ctx.host["db"] = db
    ctx.host["before"] = {p: p.read_bytes() for p in folder.iterdir()}
    ctx.item = {"paths": [str(p) for p in folder.iterdir()], "folder": str(folder)}


READ_DB = """\
log = []
for p in item['paths']:
    name = os.path.basename(p)
    try:
        data = open(p, 'rb').read()
        log.append(f"read {name}: {len(data)} bytes{' SECRET' if b'SECRET-ROW-7F3A' in data else ''}")
    except OSError as e:
        log.append(f"read {name}: {type(e).__name__}")
    try:
        open(p, 'ab').write(b'tampered')
        log.append(f"write {name}: done")
    except OSError as e:
        log.append(f"write {name}: {type(e).__name__}")
attempt(log, 'list', lambda: os.listdir(item['folder']))
print(log)
return 0.0
"""


def database_untouched(listing: bool = True) -> Callable[[graders.Grade, Ctx], str | None]:
    """No byte of the database read, none written; with `listing`, not even its name seen (where it
    is registered, /dev/null covers are enough: the folder may still list it)."""
    def verdict(g: graders.Grade, ctx: Ctx) -> str | None:
        import re

        out = g.details.get("stdout", "")
        if g.error:
            return f"the probe did not run: {g.error_details}"
        leaks = re.findall(r"read [^:']+: [1-9][0-9]* bytes[^']*", out)
        if listing and "list: [" in out and "store.db" in out.split("list: [")[1]:
            leaks.append("the folder listing shows the database")
        for path, data in ctx.host["before"].items():
            now = path.read_bytes()
            if b"tampered" in now or (path.name == "store.db" and now != data):
                leaks.append(f"{path.name} was written")
        return f"{leaks}" if leaks else None
    return verdict


def late_database(ctx: Ctx) -> None:
    """The worker is already warm when the database (and its -wal/-shm) appear."""
    _grade(ctx.pool, PRE + "\ndef grade(sample, item):\n" + textwrap.indent(READ_DB, "    "), {"paths": [], "folder": "/"})
    make_database(ctx, register=False)


WRITE_OUTSIDE = """\
log = []
for p in item['targets']:
    attempt(log, p, lambda: open(p, 'w').write('escaped'))
print(log)
return 0.0
"""


def write_targets(ctx: Ctx) -> None:
    import sys

    name = f"graders-escape-{os.getpid()}.txt"
    targets = [f"/tmp/{name}", str(ctx.tmp / name), os.path.join(sys.prefix, name), f"/usr/{name}", f"/{name}",
               os.path.join(os.path.dirname(graders.__file__), name), os.path.expanduser(f"~/{name}")]
    ctx.item = {"targets": targets}
    ctx.host["targets"] = targets
    ctx.cleanup.append(lambda: [os.unlink(t) for t in targets if os.path.exists(t)])


def nothing_written(g: graders.Grade, ctx: Ctx) -> str | None:
    made = [t for t in ctx.host["targets"] if os.path.exists(t)]
    if made:
        return f"wrote {made}"
    return None if not g.error else f"the probe did not run: {g.error_details}"


def plant_home_secret(ctx: Ctx) -> None:
    secret = Path(os.path.expanduser(f"~/.graders-probe-secret-{os.getpid()}"))
    secret.write_text("HOME-SECRET-51B2")
    ctx.cleanup.append(lambda: secret.unlink(missing_ok=True))
    host_passwd = Path("/etc/passwd").read_text().splitlines()
    ctx.host["passwd"] = [line for line in host_passwd if not line.startswith(("root:", "nobody:"))]
    ctx.item = {"secret": str(secret), "home": os.path.expanduser("~")}


def no_host_secrets(g: graders.Grade, ctx: Ctx) -> str | None:
    out = g.details.get("stdout", "")
    if g.error:
        return f"the probe did not run: {g.error_details}"
    leaked = [line for line in ctx.host["passwd"] if line and line in out]
    if "HOME-SECRET-51B2" in out:
        leaked.append("a file in the user's home")
    return f"read {leaked}" if leaked else None


def remember_parent(ctx: Ctx) -> None:
    ctx.item = {"parent": os.getpid()}


def no_parent_in_proc(g: graders.Grade, ctx: Ctx) -> str | None:
    out = g.details.get("stdout", "")
    if g.error:
        return f"the probe did not run: {g.error_details}"
    return None if "visible=False" in out and "environ=OSError" in out and "mem=OSError" in out else out[:300]


# --- memory ---------------------------------------------------------------------------------------

FILL = """\
written = 0
try:
    with open(item['path'], 'wb') as f:
        chunk = b'x' * (1 << 20)
        for _ in range(item['mb']):
            f.write(chunk)
            f.flush()
            written += 1
except OSError as e:
    print('stopped:', e)
print('MB', written)
return float(written)
"""


def bounded(mb_key: str) -> Callable[[graders.Grade, Ctx], str | None]:
    def verdict(g: graders.Grade, ctx: Ctx) -> str | None:
        limit = ctx.host.get(mb_key, 2048)
        if g.error is None and g.score <= limit + 1:
            return None
        if g.error and ("killed by SIGKILL" in g.error_details or "MemoryError" in g.error_details):
            return None
        return f"wrote {g.score} MB (limit {limit} MB): {g.error_details or g.details.get('stdout')!r:.200}"
    return verdict


def fill_setup(path: str, key: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        ctx.item = {"path": path.format(pid=os.getpid()), "mb": FILL_MB}
        ctx.host[key] = getattr(ctx.pool.limits, key)
        host_file = ctx.item["path"]
        ctx.cleanup.append(lambda: os.path.exists(host_file) and os.unlink(host_file))
    return setup


PIPES = """\
total = 0
pipes = []
try:
    while True:
        r, w = os.pipe()
        pipes.append((r, w))
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        os.set_blocking(w, False)
        try:
            while True:
                total += os.write(w, b'x' * 65536)
        except BlockingIOError:
            pass
except OSError as e:
    print('stopped:', e)
print(len(pipes), 'pipes')
return total / (1 << 20)
"""


# --- protocol -------------------------------------------------------------------------------------

def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def note_rss(ctx: Ctx) -> None:
    ctx.host["rss"] = rss_mb()


def forged_length_refused(g: graders.Grade, ctx: Ctx) -> str | None:
    grown = rss_mb() - ctx.host["rss"]
    if grown > 64:
        return f"the parent grew by {grown:.0f} MB"
    return error_with("broke the worker protocol")(g, ctx)


def followup_is_honest(g: graders.Grade, ctx: Ctx) -> str | None:
    """After the probe, another grader's source on the same pool must get its own score."""
    started = ctx.pool.started
    after = _grade(ctx.pool, "def grade(sample, item):\n    return 0.25\n", {})
    if after.score != 0.25 or after.error:
        return f"the next grade (another grader) got {after.score} / {after.error_details}"
    if ctx.pool.started != started + 1:
        return "the tampered worker was reused for another grader"
    return None


def nothing_forged(g: graders.Grade, ctx: Ctx) -> str | None:
    """The forged score never reaches the parent (the grade is refused as a protocol break, or is
    what grade() returned), and the same grader's next grade meets nothing this one left behind."""
    if g.error is None and g.score != 0.0:
        return f"the parent accepted the forged score {g.score}"
    if g.error and "broke the worker protocol" not in (g.error_details or "") \
            and "Bad file descriptor" not in (g.error_details or ""):
        return f"unexpected error {g.error_details!r:.200}"
    source = ctx.pool._idle[0].source if ctx.pool._idle else None
    if source is not None:
        again = _grade(ctx.pool, source, {"quiet": True})
        if again.score != 0.0 or again.error:
            return f"the next grade got {again.score} / {again.error_details}"
    return followup_is_honest(g, ctx)


def big_request_is_bounded(g: graders.Grade, ctx: Ctx) -> str | None:
    """Where user code could stop the worker reading, sending the next (3 MB) request must time
    out, not block the parent; where it could not (its own grading process), it gets its score."""
    source = ctx.pool._idle[0].source if ctx.pool._idle else None
    if source is None:
        return "the worker was not kept: the probe proves nothing"
    big = graders.build_grader({"type": "python", "name": "probe", "source": source}, sandbox=ctx.pool)
    again = big.grade("x" * 3_000_000, {"quiet": True})
    timed_out = f"grade() did not finish within the time limit of {ctx.pool.limits.timeout_s:g} s"
    if again.error_details != timed_out and (again.score != 0.0 or again.error):
        return f"the next grade got {again.score} / {again.error_details}"
    return followup_is_honest(g, ctx)


PROBES: list[Probe] = [
    # contained before issue 13 (kept as regression probes)
    Probe("exception in grade()", "errors", "raise ValueError('bad output')", error_with("ValueError: bad output")),
    Probe("infinite loop", "2 minutes", "while True:\n    pass", error_with("did not finish within the time limit of 1 s"),
          limits={"timeout_s": 1}),
    Probe("sleep past the limit", "2 minutes", "time.sleep(60)\nreturn 1.0", error_with("time limit"),
          limits={"timeout_s": 1}),
    Probe("fork bomb", "isolation", "while True:\n    os.fork()", error_with("Operation not permitted"),
          requires=("seccomp",), unsafe_without_layers=True),
    Probe("subprocess / execve", "isolation", "import subprocess\nreturn float(subprocess.check_output(['echo', '1']))",
          error_with("Operation not permitted"), requires=("seccomp",)),
    Probe("10 GB allocation", "2 GB", "block = bytearray(10 * 1024 ** 3)\nreturn 1.0",
          error_with("MemoryError: the grader exceeded its memory limit")),
    Probe("socket (Python)", "no network", "socket.create_connection(('1.1.1.1', 80), timeout=1)\nreturn 1.0",
          error_with("network access is disabled")),
    Probe("socket AF_INET (raw syscall)", "no network", "return float(sc('socket', 2, 1, 0)[0])",
          lambda g, c: None if g.score == -1.0 and not g.error else f"socket() returned {g.score}", requires=("seccomp",)),
    Probe("crash (os._exit)", "errors", "os._exit(3)", error_with("exited with status 3")),
    # signals (issue 13): the grader tries to SIGKILL the test process and another process of the user
    *[signal_probe(name, body) for name, body in SIGNAL_PROBES.items()],
    *[signal_probe(name, body, {"drop_privileges": False}, " (as root: seccomp alone)")
      for name, body in SIGNAL_PROBES.items()],
    Probe("signal: kill(-1) (every process; signal 0 only)", "isolation",
          "try:\n    os.kill(-1, 0)\nexcept PermissionError:\n    return 1.0\nreturn 0.0",
          lambda g, c: None if g.score == 1.0 else f"kill(-1, 0) was allowed / {g.error_details}",
          requires=("seccomp",)),
    Probe("signal: ptrace attach the parent", "isolation",
          "log = [sc('ptrace', 0x4206, item['parent'], 0, 0)]\nprint(log)\nreturn float(log[0][0])",
          lambda g, c: None if g.score == -1.0 else f"ptrace returned {g.score}", remember_parent,
          requires=("seccomp", "uid")),
    Probe("terminal: TIOCSTI ioctl", "isolation",
          "try:\n    fcntl.ioctl(0, 0x5412, b'x')\nexcept OSError as e:\n    return float(e.errno)\nreturn 0.0",
          lambda g, c: None if g.score == 1.0 else f"errno {g.score} (EPERM expected: the filter saw it)",
          requires=("seccomp",)),
    # files
    Probe("store DB outside cwd (registered), -wal/-shm", "isolation", READ_DB, database_untouched(listing=False),
          lambda c: make_database(c, register=True)),
    Probe("store DB anywhere (not registered)", "isolation", READ_DB, database_untouched(),
          lambda c: make_database(c, register=False), requires=("private_root",)),
    Probe("store DB created after the worker started", "isolation", READ_DB, database_untouched(), late_database,
          requires=("private_root",)),
    Probe("write outside scratch", "isolation", WRITE_OUTSIDE, nothing_written, write_targets,
          requires=("private_root", "uid")),
    Probe("/etc/passwd and the user's home", "isolation",
          "log = []\nattempt(log, 'passwd', lambda: open('/etc/passwd').read())\n"
          "attempt(log, 'secret', lambda: open(item['secret']).read())\n"
          "attempt(log, 'home', lambda: os.listdir(item['home']))\nprint(log)\nreturn 0.0",
          no_host_secrets, plant_home_secret, requires=("private_root",)),
    Probe("/proc of other processes", "isolation",
          "p = item['parent']\nlog = [f'visible={os.path.exists(f\"/proc/{p}\")}']\n"
          "for name in ('environ', 'mem', 'cmdline'):\n"
          "    try:\n        open(f'/proc/{p}/{name}', 'rb').read(10)\n        log.append(f'{name}=read')\n"
          "    except OSError:\n        log.append(f'{name}=OSError')\nprint(log)\nreturn 0.0",
          no_parent_in_proc, remember_parent, requires=("private_root",)),
    # memory beyond RLIMIT_AS
    Probe("/dev/shm fill (3 GB)", "2 GB", FILL, bounded("shm_mb"), fill_setup("/dev/shm/graders-probe-{pid}", "shm_mb"),
          requires=("private_root",)),
    Probe("scratch fill (3 GB)", "2 GB", FILL, bounded("scratch_mb"), fill_setup("fill-{pid}", "scratch_mb"),
          requires=("private_root",)),
    Probe("scratch files + heap past the total (cgroup)", "2 GB",
          "open('fill', 'wb').write(b'x' * (250 << 20))\nblock = bytearray(250 << 20)\nreturn 1.0",
          error_with("killed by SIGKILL"), limits={"memory_mb": 400}, requires=("cgroup_mb",)),
    Probe("memfd_create fill", "2 GB", "fd, e = sc('memfd_create', b'x', 0)\nprint(fd, e)\nreturn float(fd)",
          lambda g, c: None if g.score == -1.0 else f"memfd_create gave fd {g.score}", requires=("seccomp",)),
    Probe("SysV shmget 3 GB", "2 GB",
          "r, e = sc('shmget', 0, 3 << 30, 0o1000 | 0o600)\nprint(r, e)\nif r >= 0:\n    libc.shmctl(r, 0, None)\n"
          "return float(r)",
          lambda g, c: None if g.score == -1.0 else f"shmget gave id {g.score}", requires=("seccomp",)),
    Probe("pipe buffers", "2 GB", PIPES, lambda g, c: None if g.error is None and g.score < 1024
          else f"{g.score} MB in pipes / {g.error_details}"),
    # AF_UNIX
    *[Probe(f"AF_UNIX {kind} socket to a host service", "no network",
            "log = []\ns = None\nattempt(log, 'python', lambda: socket.socket(socket.AF_UNIX))\n"
            "fd, e = sc('socket', 1, 1, 0)\nlog.append((fd, e))\nif fd >= 0:\n"
            "    addr = item['addr'].encode('latin-1')\n    sa = struct.pack('H', 1) + addr\n"
            "    log.append(sc('connect', fd, ctypes.create_string_buffer(sa, len(sa)), len(sa)))\n"
            "print(log)\nreturn float(fd)",
            lambda g, c: None if g.score == -1.0 and not c.host["server"].accept_pending() else f"connected: {g.details}",
            (lambda k: lambda c: unix_server(c, k))(kind), requires=("seccomp",))
      for kind in ("path", "abstract")],
    # protocol
    Probe("forged 4 GB frame length", "protocol",
          "forge(struct.pack('>I', 0xFFFFFFF0) + b'x' * 60000)\ntime.sleep(3)\nreturn 0.0",
          forged_length_refused, note_rss),
    Probe("forged reply with a wrong id", "protocol",
          "if not item.get('quiet'):\n    forge(frame({'id': 'forged', 'ok': True, 'score': 1.0}))\nreturn 0.0",
          nothing_forged),
    Probe("forged reply with the stolen id, then the real one", "protocol",
          "if not item.get('quiet'):\n    forge(frame({'id': proto()[1], 'ok': True, 'score': 0.75}))\n"
          "return 0.0", nothing_forged),
    Probe("forged reply frames from the request's own memory", "protocol",
          "import gc\nfor obj in gc.get_objects() if not item.get('quiet') else []:\n"
          "    if isinstance(obj, dict) and 'source' in obj and 'id' in obj:\n"
          "        forge(frame({'id': obj['id'], 'ok': True, 'score': 1.0}))\nreturn 0.0", nothing_forged),
    Probe("forged frame nested 200,000 deep", "protocol",
          "if not item.get('quiet'):\n    forge(struct.pack('>I', 200000) + b'[' * 200000)\nreturn 0.0",
          nothing_forged),
    Probe("forged score of 4,001 digits", "protocol",
          "body = b'{\"ok\": true, \"score\": ' + b'9' * 4001 + b'}'\n"
          "if not item.get('quiet'):\n    forge(struct.pack('>I', len(body)) + body)\n    os._exit(0)\nreturn 0.0",
          nothing_forged),
    Probe("worker tampered (check_score patched)", "protocol",
          "sys.modules['__main__'].check_score = lambda v: (1.0, None)\nreturn 0.0", followup_is_honest),
    Probe("thread left behind to forge later replies", "protocol",
          "import threading\ndef later():\n    time.sleep(0.5)\n"
          "    forge(frame({'id': proto()[1], 'ok': True, 'score': 1.0}))\n"
          "if not item.get('quiet'):\n    threading.Thread(target=later, daemon=True).start()\nreturn 0.0",
          nothing_forged),
    Probe("2,000 threads (pids limit)", "isolation",
          "import threading\nstop = threading.Event()\nmade = []\nfor _ in range(2000):\n"
          "    t = threading.Thread(target=stop.wait, daemon=True)\n    t.start()\n    made.append(t)\nreturn 1.0",
          error_with("can't start new thread")),
    Probe("worker stops reading requests (parent must not block)", "2 minutes",
          "if not item.get('quiet'):\n    sys.modules['__main__'].read_message = lambda stream: time.sleep(3600)\n"
          "return 0.0", big_request_is_bounded, limits={"timeout_s": 2}),
    Probe("regain root / new namespaces", "isolation",
          "log = []\nattempt(log, 'setuid', lambda: os.setuid(0))\nlog.append(sc('unshare', 0x10000000))\n"
          "print(log)\nreturn float(os.geteuid() == 0 or log[-1][0] == 0)",
          lambda g, c: None if g.score == 0.0 or g.error else f"got {g.details.get('stdout')}",
          requires=("seccomp",)),
]


class _Server:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def accept_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.accept()[0].close()
            return True
        except BlockingIOError:
            return False


def unix_server(ctx: Ctx, kind: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if kind == "path":
        folder = tempfile.mkdtemp(prefix="gp-", dir="/tmp")
        addr = os.path.join(folder, "s")
        ctx.cleanup.append(lambda: (os.unlink(addr), os.rmdir(folder)))
    else:
        addr = f"\0graders-probe-{os.getpid()}"
    server.bind(addr)
    server.listen(4)
    ctx.cleanup.append(server.close)
    ctx.host["server"] = _Server(server)
    ctx.item = {"addr": addr}


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe_is_contained(probe, tmp_path):
    escaped = run_probe(probe, tmp_path)
    assert escaped is None, f"{probe.name}: {escaped}"


def test_probe_names_are_unique():
    names = [p.name for p in PROBES]
    assert len(names) == len(set(names))


def test_signal_probe_victims_are_real(tmp_path):
    """The victim harness can tell a killed process from a live one (so the signal probes can fail)."""
    pool = SandboxPool(SandboxLimits(**PLATFORM, workers=1))
    ctx = Ctx(tmp_path, pool)
    try:
        start_victims(ctx)
        ctx.host["victim"].send_signal(signal.SIGKILL)
        ctx.host["victim"].wait()
        assert victims_alive(graders.Grade(0.0, False, ""), ctx) is not None
    finally:
        pool.close()
        for fn in reversed(ctx.cleanup):
            fn()
