"""python graders in the sandbox (reference §2.5): each failure mode is a recorded error within the
limit, the parent keeps working, and workers are reused."""

import os
import socket
import threading

import pytest

import graders
from graders import SandboxLimits, SandboxPool

FAST = SandboxLimits(timeout_s=3, memory_mb=1024, workers=1)


def grader(source, limits=FAST, **extra):
    return graders.build_grader({"type": "python", "name": "py", "source": source, **extra}, sandbox=limits)


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(FAST)
    yield p
    p.close()


def run(pool, source, sample="out", item=None):
    g = graders.build_grader({"type": "python", "name": "py", "source": source}, sandbox=pool)
    return g.grade(sample, item or {})


OK = "def grade(sample, item):\n    return len(sample['output_text']) / item['n']\n"


def assert_parent_still_works(pool):
    assert run(pool, OK, "abcd", {"n": 8}).score == 0.5


def test_grade_and_reuse(pool):
    before = pool.started
    g = graders.build_grader({"type": "python", "name": "py", "source": OK, "pass_threshold": 0.4}, sandbox=pool)
    grades = g.grade_batch(["ab", "abcd", "abcdefgh"], [{"n": 8}] * 3)
    assert [x.score for x in grades] == [0.25, 0.5, 1.0]
    assert [x.passed for x in grades] == [False, True, True]
    assert grades[1].feedback == "grade() returned 0.5 (threshold 0.4): pass"
    for _ in range(20):
        g.grade("abcd", {"n": 4})
    assert pool.started - before <= 1  # one worker served all 23 grades


def test_sample_namespace_reaches_user_code(pool):
    src = "def grade(sample, item):\n    return float(sample['output_json']['x'] + len(sample['choices']) + len(sample['output_tools']))\n"
    assert run(pool, src, graders.make_sample('{"x": 2}')).score == 3.0


def test_exception_is_recorded(pool):
    g = run(pool, "def grade(sample, item):\n    raise ValueError('bad output')\n")
    assert g.error == "python_grader_runtime_error" and g.score == 0.0 and not g.passed
    assert g.error_details.startswith("ValueError: bad output\n  line 2, in grade")
    assert_parent_still_works(pool)


@pytest.mark.parametrize("value, shown", [("'high'", "str 'high'"), ("None", "NoneType"), ("True", "bool"),
                                          ("[1.0]", "list"), ("float('nan')", "nan, not a finite number")])
def test_non_numeric_return_is_recorded(pool, value, shown):
    g = run(pool, f"def grade(sample, item):\n    return {value}\n")
    assert g.error == "python_grader_runtime_error"
    assert shown in g.error_details


def test_numpy_numbers_are_fine(pool):
    assert run(pool, "import numpy as np\ndef grade(s, i):\n    return np.float32(0.5) + np.int64(1)\n").score == 1.5


def test_missing_grade_function(pool):
    # Validation refuses a source without a top-level grade; this one hides it from the static check.
    g = run(pool, "if False:\n    def grade(sample, item):\n        return 1.0\n")
    assert g.error == "python_grader_runtime_error" and "does not define grade(sample, item)" in g.error_details


def test_infinite_loop_times_out_and_worker_is_replaced():
    limits = SandboxLimits(timeout_s=1, memory_mb=1024, workers=1)
    with grader("def grade(sample, item):\n    while True:\n        pass\n", limits) as g:
        result = g.grade("x", {})
        assert result.error == "python_grader_runtime_error"
        assert result.error_details == "grade() did not finish within the time limit of 1 s"
        started = g.pool.started
    with grader("import time\ndef grade(sample, item):\n    time.sleep(30)\n    return 1.0\n", limits) as g:
        assert "time limit" in g.grade("x", {}).error_details
        g.config = g.config.model_copy(update={"source": OK})
        assert g.grade("abcd", {"n": 4}).score == 1.0  # a fresh worker took over
        assert g.pool.started == 2
    assert started == 1


def require_process_guard(pool):
    """Without seccomp only RLIMIT_NPROC stops a fork bomb, and root ignores it: never run one then."""
    isolation = run(pool, OK, "abcd", {"n": 8}).details["sandbox"]
    if not isolation.get("seccomp") and os.geteuid() == 0:
        pytest.skip(f"no seccomp filter here and running as root ({isolation}): nothing would stop the fork bomb")
    return isolation


def test_fork_bomb_is_stopped(pool):
    require_process_guard(pool)
    src = "import os\ndef grade(sample, item):\n    while True:\n        os.fork()\n"
    g = run(pool, src)
    assert g.error == "python_grader_runtime_error"
    assert "Operation not permitted" in g.error_details or "Resource temporarily unavailable" in g.error_details
    assert_parent_still_works(pool)


def test_subprocess_is_refused(pool):
    if not require_process_guard(pool).get("seccomp"):
        pytest.skip("without seccomp, starting a process is limited (RLIMIT_NPROC), not refused")
    g = run(pool, "import subprocess\ndef grade(s, i):\n    return float(subprocess.check_output(['echo', '1']))\n")
    assert g.error == "python_grader_runtime_error"
    assert_parent_still_works(pool)


def test_each_grading_process_may_signal_itself_and_only_itself(pool):
    """The seccomp program is compiled once per worker and each grading process writes its own pid
    into it: a process signals itself (raise, os.kill of its own pid) in every grade, never the
    worker that forked it."""
    if not require_process_guard(pool).get("seccomp"):
        pytest.skip("no seccomp filter here: signals are limited by uid, not by pid")
    src = ("import os, signal\n"
           "def grade(sample, item):\n"
           "    signal.signal(signal.SIGUSR1, lambda *a: None)\n"
           "    signal.raise_signal(signal.SIGUSR1)\n"
           "    os.kill(os.getpid(), 0)\n"
           "    try:\n"
           "        os.kill(os.getppid(), 0)\n"
           "    except PermissionError:\n"
           "        return 1.0\n"
           "    return 0.0\n")
    for _ in range(3):  # a new grading process, with a new pid, each time
        g = run(pool, src)
        assert g.error is None and g.score == 1.0, (g.error, g.error_details)


def test_ten_gigabyte_allocation_is_a_memory_error(pool):
    g = run(pool, "def grade(sample, item):\n    block = bytearray(10 * 1024 ** 3)\n    return 1.0\n")
    assert g.error == "python_grader_runtime_error"
    assert g.error_details == "MemoryError: the grader exceeded its memory limit"
    assert_parent_still_works(pool)


def test_socket_is_refused_and_nothing_connects(pool):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        g = run(pool, f"import socket\ndef grade(s, i):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return 1.0\n")
        assert g.error == "python_grader_runtime_error"
        assert "network access is disabled in the python grader sandbox" in g.error_details
        raw = run(pool, "import ctypes\ndef grade(s, i):\n    return float(ctypes.CDLL(None).socket(2, 1, 0))\n")
    finally:
        t.join()
        server.close()
    assert accepted == []
    sandbox = raw.details["sandbox"]
    if sandbox["seccomp"]:
        assert raw.score == -1.0  # the kernel refused socket(AF_INET) even around Python's guard
    else:
        pytest.skip(f"no seccomp on this machine ({sandbox}); only the Python-level guard applies")


def test_crash_is_recorded(pool):
    g = run(pool, "import os\ndef grade(sample, item):\n    os._exit(3)\n")
    assert g.error == "python_grader_runtime_error"
    assert g.error_details == "grade() crashed the worker: the worker process exited with status 3"
    assert_parent_still_works(pool)


def test_cannot_signal_the_parent(pool):
    g = run(pool, "import os, signal\ndef grade(s, i):\n    os.kill(os.getppid(), signal.SIGTERM)\n    return 1.0\n")
    assert g.error == "python_grader_runtime_error" and "Operation not permitted" in g.error_details
    assert_parent_still_works(pool)


def test_scratch_cwd_stripped_env_and_output_capture(pool):
    src = ("import os\n"
           "def grade(sample, item):\n"
           "    open('note.txt', 'w').write('x')\n"
           "    print('cwd', os.getcwd())\n"
           "    return float(len(os.listdir('.')))\n")
    first = run(pool, src)
    assert first.score == 1.0
    assert "graders-sandbox-" in first.details["stdout"]
    assert run(pool, src).score == 1.0  # the scratch folder was emptied between grades
    os.environ["FLYWHEEL_SECRET_FOR_TEST"] = "s3cret"
    try:
        env = run(pool, "import os\ndef grade(s, i):\n    print(sorted(os.environ))\n    return float('FLYWHEEL_SECRET_FOR_TEST' in os.environ)\n")
    finally:
        del os.environ["FLYWHEEL_SECRET_FOR_TEST"]
    assert env.score == 0.0 and "FLYWHEEL_DB" not in env.details["stdout"]


def test_project_database_is_hidden(tmp_path, monkeypatch):
    db = tmp_path / "flywheel.db"
    db.write_bytes(b"SQLite format 3\x00 secret rows")
    monkeypatch.chdir(tmp_path)
    src = f"def grade(s, i):\n    return float(len(open({str(db)!r}, 'rb').read()))\n"
    with grader(src, SandboxLimits(timeout_s=5, memory_mb=1024, workers=1)) as g:
        result = g.grade("x", {})
    if not result.details["sandbox"].get("mountns"):
        pytest.skip(f"no mount namespace on this machine ({result.details['sandbox']}); cwd and env isolation only")
    assert result.score == 0.0  # reads /dev/null instead of the database
    assert str(db) in result.details["sandbox"]["hidden"]


def test_unserialisable_item_is_a_sample_error(pool):
    g = graders.build_grader({"type": "python", "name": "py", "source": OK}, sandbox=pool)
    assert g.grade("x", {"n": object()}).error == "sample_parse_error"


def test_parallel_workers_and_close():
    limits = SandboxLimits(timeout_s=5, memory_mb=1024, workers=2)
    g = grader(OK, limits)
    grades = g.grade_batch(["a" * k for k in range(1, 9)], [{"n": 8}] * 8)
    assert [x.score for x in grades] == [k / 8 for k in range(1, 9)]
    assert 1 <= g.pool.started <= 2
    workers = list(g.pool._idle)
    g.close()
    assert all(not w.alive for w in workers)


def test_worker_exits_when_its_parent_dies():
    import subprocess
    import sys
    import time

    code = (
        "import os, threading, time, graders\n"
        "g = graders.build_grader({'type': 'python', 'name': 'p', 'source': 'def grade(s, i):\\n    while True: pass\\n'},\n"
        "                         sandbox=graders.SandboxLimits(timeout_s=300))\n"
        "threading.Thread(target=lambda: g.grade('x', {}), daemon=True).start()\n"
        "def kids():\n"
        "    return [k for t in os.listdir('/proc/self/task') for k in open(f'/proc/self/task/{t}/children').read().split()]\n"
        "while not kids(): time.sleep(0.05)\n"
        "time.sleep(0.5)\n"
        "print(kids()[0], flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}"), "the orphaned worker is still running its infinite loop"


def test_without_kernel_layers_forked_children_are_cleaned_up():
    """Where seccomp is unavailable, a grade that leaves a child behind gets its worker replaced."""
    limits = SandboxLimits(timeout_s=5, memory_mb=1024, workers=1, seccomp=False, namespaces=False)
    src = ("import os, time\n"
           "def grade(sample, item):\n"
           "    if os.fork() == 0:\n"
           "        time.sleep(60)\n"
           "        os._exit(0)\n"
           "    return 1.0\n")
    with grader(src, limits) as g:
        result = g.grade("x", {})
        assert result.score == 1.0
        assert result.details["sandbox"]["seccomp"] is False
        assert g.pool._idle == []  # the dirty worker was not put back
        assert g.grade("x", {}).score == 1.0
        assert g.pool.started == 2
        blocked = run_with(g.pool, "import socket\ndef grade(s, i):\n    socket.socket()\n    return 1.0\n")
        assert "network access is disabled" in blocked.error_details


def run_with(pool, source):
    return graders.build_grader({"type": "python", "name": "py", "source": source}, sandbox=pool).grade("x", {})


def test_numpy_grades_keep_their_worker(pool):
    """numpy's thread pools stay at one thread in a worker, so the thread check does not retire it."""
    src = "import numpy as np\ndef grade(s, i):\n    return float(np.arange(4).mean())\n"
    assert run(pool, src).score == 1.5
    started = pool.started
    assert [run(pool, src).score for _ in range(5)] == [1.5] * 5
    assert pool.started == started


def test_without_a_private_root_hidden_paths_are_covered(tmp_path, monkeypatch):
    """Where the private root cannot be built (here its mount point is gone), the worker falls back
    to covering the hidden paths, SQLite companions included, with /dev/null, and to a read-only
    host tree where only scratch is writable; it says why."""
    from graders.python_sandbox import Worker

    db = tmp_path / "elsewhere.db"
    for path in (db, tmp_path / "elsewhere.db-wal", tmp_path / "elsewhere.db-shm"):
        path.write_bytes(b"SQLite format 3\x00 secret rows")
    start = Worker._start

    def start_without_root(self):
        os.rmdir(self.root)
        start(self)

    monkeypatch.setattr(Worker, "_start", start_without_root)
    src = ("def grade(s, i):\n"
           f"    read = sum(len(open({str(db)!r} + x, 'rb').read()) for x in ('', '-wal', '-shm'))\n"
           "    open('in-scratch.txt', 'w').write('fine')\n"
           "    try:\n"
           f"        open({str(tmp_path / 'outside.txt')!r}, 'w').write('escaped')\n"
           "    except OSError:\n"
           "        return float(read)\n"
           "    return 1000.0\n")
    with grader(src, SandboxLimits(timeout_s=5, memory_mb=1024, workers=1, hidden_paths=(str(db),))) as g:
        result = g.grade("x", {})
    sandbox = result.details["sandbox"]
    if not sandbox.get("mountns"):
        pytest.skip(f"no mount namespace on this machine ({sandbox})")
    assert sandbox["private_root"] is False and "no private root" in sandbox["why"]
    assert result.error is None and result.score == 0.0  # nothing read, scratch writable, the rest not
    assert sandbox["read_only"] is True and not (tmp_path / "outside.txt").exists()
    assert {str(db), f"{db}-wal", f"{db}-shm"} <= set(sandbox["hidden"])


def test_store_hides_its_database_from_workers(tmp_path):
    from flywheel.store import Store

    (tmp_path / "far").mkdir()
    store = Store.open(tmp_path / "far" / "away.db")  # not in the current folder: only registration hides it
    try:
        paths = SandboxLimits(hide_databases_in_cwd=False).all_hidden_paths()
        real = os.path.realpath(store.path)
        assert {real, real + "-wal", real + "-shm", real + "-journal"} <= set(paths)
    finally:
        store.close()


UNPRIVILEGED = """
set -e
if [ -n "$PYENV_UNDER_ROOT" ]; then  # the interpreter lives under /root (0700): lend it to the user
  mkdir -p "$KEEP" && mount --bind /root "$KEEP"
  mount -t tmpfs -o mode=755 tmpfs /root
  mkdir -p "/root/$PYENV_UNDER_ROOT" && mount --bind "$KEEP/$PYENV_UNDER_ROOT" "/root/$PYENV_UNDER_ROOT"
fi
cd /tmp
exec setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/tmp PYTHONPATH="$PYTHONPATH" "$@"
"""


def test_unprivileged_user_gets_the_private_root_and_seccomp(tmp_path):
    """The path a non-root user takes (a user namespace; no /proc, no privilege drop): run the pool
    as uid 1000 in a private mount namespace of this (root) test."""
    import json
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root and util-linux unshare/setpriv to become an unprivileged user")
    base = os.path.realpath(sys.base_prefix)
    under_root = os.path.relpath(base, "/root").split(os.sep)[0] if base.startswith("/root/") else ""
    code = ("import graders, json, os\n"
            "src = 'import os\\ndef grade(s, i):\\n    os.kill(os.getppid(), 0)\\n    return 1.0\\n'\n"
            "g = graders.build_grader({'type': 'python', 'name': 'p', 'source': src}, sandbox=graders.SandboxLimits(workers=1))\n"
            "r = g.grade('x', {})\n"
            "print(json.dumps({'error': r.error_details, 'sandbox': r.details['sandbox'], 'uid': os.getuid()}))\n")
    script = tmp_path / "unprivileged.sh"
    script.write_text(UNPRIVILEGED)
    env = {**os.environ, "PYENV_UNDER_ROOT": under_root, "KEEP": str(tmp_path / "keep"),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", str(script), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "setpriv" in out.stderr):
        pytest.skip(f"cannot become an unprivileged user here: {out.stderr.strip()[-200:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    sandbox = report["sandbox"]
    if not sandbox.get("userns"):
        pytest.skip(f"no unprivileged user namespaces on this kernel ({sandbox.get('why')})")
    assert report["uid"] == 1000 and sandbox["uid"] == 1000
    assert sandbox["private_root"] is True and sandbox["proc"] is False  # no /proc without a PID namespace
    assert sandbox["seccomp"] is True
    assert "PermissionError" in report["error"]  # signalling the parent: seccomp alone refuses it


HOSTILE_WORKER = '''
import json, struct, sys
def send(body):
    sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
    sys.stdout.buffer.flush()
def read():
    (n,) = struct.unpack(">I", sys.stdin.buffer.read(4))
    return json.loads(sys.stdin.buffer.read(n))
read()
send(json.dumps({"ready": True, "isolation": {}}).encode())
request = read()
send(REPLY.replace(b"NONCE", request["id"].encode()))
sys.stdin.buffer.read()
'''


@pytest.mark.parametrize("reply", [
    b"[" * 200_000,
    b'{"id": "NONCE", "ok": true, "score": ' + b"9" * 4001 + b"}",
    b'{"id": "NONCE", "ok": true, "score": NaN}',
    b'{"id": "NONCE", "ok": true, "score": true}',
    b'{"id": "NONCE", "ok": true}',
    b'{"id": "NONCE", "ok": false, "error": "' + b"e" * 20_000 + b'"}',
    b'{"id": "NONCE", "ok": true, "score": 1.0, "stdout": ["x"]}',
    b'{"id": "NONCE", "ok": true, "score": 1.0, "extra": 1}',
    b'{"id": "other", "ok": true, "score": 1.0}',
    b'{"id": "NONCE", "ok": true, "score": 1.0' + b', "a": {"b": [[[[[1]]]]]}' + b"}",
    b"\xff\xfe not utf-8",
], ids=["deep", "4001-digits", "nan", "bool", "no-score", "long-error", "stdout-list", "extra", "wrong-id",
        "nested", "bytes"])
def test_the_parent_refuses_a_hostile_workers_reply(tmp_path, monkeypatch, reply):
    """Whatever a (compromised) worker writes, the parent records a protocol error and goes on."""
    import graders.python_sandbox as sandbox

    script = tmp_path / "hostile_worker.py"
    script.write_text(f"REPLY = {reply!r}\n" + HOSTILE_WORKER)
    monkeypatch.setattr(sandbox, "WORKER_SCRIPT", script)
    with grader(OK, SandboxLimits(timeout_s=10, workers=1, cgroup=False)) as g:
        result = g.grade("x", {})
    assert result.error == "python_grader_runtime_error"
    assert result.error_details.startswith("grade() broke the worker protocol, reply refused"), result.error_details
