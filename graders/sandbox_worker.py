"""The python grader's worker process. Standalone: stdlib only, never imports `graders`.

Started by graders.python_sandbox as `python -I sandbox_worker.py` in a scratch folder with a
stripped environment. The parent talks to it over stdin/stdout with length-prefixed JSON; the
worker then points fds 0/1 at /dev/null so user code cannot write into the protocol.

Before any user code runs, the worker locks itself down as far as the machine allows and reports
what it got:
* namespaces (unshare): a new network namespace (no interfaces but a down loopback: no network)
  and a new mount namespace where the hidden paths (the project database) are covered by /dev/null;
* seccomp filter (Linux x86_64 / aarch64): no new processes (fork, vfork, clone without
  CLONE_THREAD; threads are fine), no sockets other than AF_UNIX, no signals to other processes,
  no ptrace, no more namespace or mount changes;
* rlimits: address space (memory), file size, no core dumps, and a process count when not root;
* Python level: socket constructors raise a clear PermissionError (the kernel layers above stop
  code that goes around Python).
"""

import ctypes
import io
import json
import math
import numbers
import os
import platform
import resource
import shutil
import struct
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout

_pack = struct.Struct(">I").pack
_unpack = struct.Struct(">I").unpack
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=repr).encode
_loads = json.JSONDecoder().decode
_exit = os._exit
_getpid = os.getpid

MAX_CAPTURE = 4000


def read_message(stream):
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = _unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return _loads(body.decode("utf-8"))


def write_message(stream, obj):
    body = _dumps(obj).encode("utf-8")
    stream.write(_pack(len(body)) + body)
    stream.flush()


# --- lockdown ----------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
AF_UNIX = 1
EPERM, EACCES, ENOSYS = 1, 13, 38

# syscall numbers: name -> (x86_64, aarch64); None where the arch has no such call
SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "socket": (41, 198), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "ptrace": (101, 117), "io_uring_setup": (425, 425), "pidfd_send_signal": (424, 424),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51),
}
AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1), "arm64": (0xC00000B7, 1)}


def _libc():
    return ctypes.CDLL(None, use_errno=True)  # the running process already has libc loaded


def isolate_namespaces(hidden):
    """New user+mount+network namespaces; cover `hidden` files with /dev/null. Returns a report."""
    report = {"netns": False, "mountns": False, "hidden": []}
    if not sys.platform.startswith("linux"):
        return report
    libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET
    for extra in (CLONE_NEWUSER, 0):  # unprivileged users need a user namespace; root may not have them
        if libc.unshare(flags | extra) == 0:
            report["netns"] = report["mountns"] = True
            break
    else:
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWNET) == 0:
            report["netns"] = True
    if report["mountns"]:
        libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
        for path in hidden:
            target = path.encode()
            if os.path.lexists(path) and libc.mount(b"/dev/null", target, None, MS_BIND, None) == 0:
                report["hidden"].append(path)
    return report


def install_seccomp(pid):
    """Kernel-enforced: no new processes, no network sockets, no signals to others. True if active."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in AUDIT_ARCH:
        return False
    audit_arch, column = AUDIT_ARCH[machine]
    nr = {name: numbers_[column] for name, numbers_ in SYSCALLS.items() if numbers_[column] is not None}

    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000

    def errno(e):
        return 0x00050000 | e

    prog = []  # (code, jt, jf, k) with jt/jf as labels or 0

    def op(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    labels = {}
    op(LD_ABS, 4)  # seccomp_data.arch
    op(JEQ, audit_arch, 0, "bad_arch")
    op(LD_ABS, 0)  # seccomp_data.nr
    if column == 0:
        op(JGE, 0x40000000, "deny", 0)  # x32 ABI numbers
    dispatch = [
        ("fork", "deny"), ("vfork", "deny"), ("clone", "clone"), ("clone3", "nosys"),
        ("socket", "socket"), ("kill", "own_pid"), ("tgkill", "own_pid"),
        ("tkill", "deny"), ("ptrace", "deny"), ("io_uring_setup", "deny"), ("pidfd_send_signal", "deny"),
        ("process_vm_readv", "deny"), ("process_vm_writev", "deny"), ("unshare", "deny"),
        ("setns", "deny"), ("mount", "deny"), ("umount2", "deny"), ("pivot_root", "deny"), ("chroot", "deny"),
    ]
    for name, target in dispatch:
        if name in nr:
            op(JEQ, nr[name], target, 0)
    op(RET, ALLOW)
    labels["clone"] = len(prog)
    op(LD_ABS, 16)  # args[0] low word: clone flags
    op(JSET, CLONE_THREAD, "allow", 0)
    op(RET, errno(EPERM))
    labels["socket"] = len(prog)
    op(LD_ABS, 16)  # args[0]: address family
    op(JEQ, AF_UNIX, "allow", 0)
    op(RET, errno(EACCES))
    labels["own_pid"] = len(prog)
    op(LD_ABS, 16)  # args[0]: target pid / tgid
    op(JEQ, pid, "allow", 0)
    op(RET, errno(EPERM))
    labels["deny"] = len(prog)
    op(RET, errno(EPERM))
    labels["nosys"] = len(prog)
    op(RET, errno(ENOSYS))  # clone3: glibc falls back to clone, which we can inspect
    labels["allow"] = len(prog)
    op(RET, ALLOW)
    labels["bad_arch"] = len(prog)
    op(RET, KILL)

    raw = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        raw += struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def set_limits(memory_mb, file_size_mb, max_processes, is_root):
    report = {}

    def limit(which, value):
        try:
            soft, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
            return value
        except (ValueError, OSError):
            return None

    report["memory_mb"] = memory_mb if limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024) else None
    limit(resource.RLIMIT_FSIZE, file_size_mb * 1024 * 1024)
    limit(resource.RLIMIT_CORE, 0)
    if hasattr(resource, "RLIMIT_NPROC") and not is_root:
        # counts every process of this user, so allow what already runs plus a small margin
        running = _count_user_processes(os.getuid())
        report["max_processes"] = limit(resource.RLIMIT_NPROC, running + max_processes)
    return report


def _count_user_processes(uid):
    count = 0
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        count += 1
                except OSError:
                    pass
    except OSError:
        return 64
    return count


class _NoNetwork:
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the python grader sandbox")


def block_python_sockets():
    import socket

    import _socket

    for module in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(module, name):
                setattr(module, name, _NoNetwork)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        if hasattr(socket, name):
            setattr(socket, name, _NoNetwork)


def start_orphan_watchdog(parent):
    """Exit when the parent goes away, even while user code loops (a thread, so after unshare)."""
    import threading
    import time

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                _exit(1)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


# --- grading -------------------------------------------------------------------------------------

_compiled = {}


def load_grade(source):
    code = _compiled.get(source)
    if code is None:
        code = compile(source, "<grader>", "exec", dont_inherit=True)
        if len(_compiled) > 64:
            _compiled.clear()
        _compiled[source] = code
    namespace = {"__name__": "grader", "__builtins__": __builtins__}
    exec(code, namespace)  # noqa: S102 - this is the sandbox whose job is to run user code
    fn = namespace.get("grade")
    if not callable(fn):
        raise NameError("the source does not define grade(sample, item)")
    return fn


def check_score(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"grade() returned {type(value).__name__} {value!r:.80}, not a number; return a float"
    value = float(value)
    if not math.isfinite(value):
        return None, f"grade() returned {value}, not a finite number"
    return value, None


def _user_traceback(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<grader>"]
    where = "".join(f"  line {f.lineno}, in {f.name}\n" for f in frames[-5:])
    return f"{type(exc).__name__}: {exc}" + (f"\n{where.rstrip()}" if where else "")


def clean_scratch(scratch):
    try:
        entries = os.listdir(scratch)
    except OSError:
        return
    for name in entries:
        path = os.path.join(scratch, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


def has_children(pid):
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                if f.read().strip():
                    return True
    except OSError:
        pass
    return False


def main():
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    proto_in = io.BufferedReader(proto_in)

    setup = read_message(proto_in)
    if setup is None:
        return
    me = _getpid()
    is_root = os.geteuid() == 0  # before unshare: in a new user namespace root shows as 65534
    report = {"pid": me}
    report.update(isolate_namespaces(setup.get("hidden", [])) if setup.get("namespaces", True) else {})
    report["seccomp"] = install_seccomp(me) if setup.get("seccomp", True) else False
    if report["seccomp"] is False and hasattr(ctypes, "CDLL") and sys.platform.startswith("linux"):
        _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of user code stay ours to see
    report.update(set_limits(setup["memory_mb"], setup["file_size_mb"], setup["max_processes"], is_root))
    start_orphan_watchdog(os.getppid())
    block_python_sockets()
    scratch = os.getcwd()
    write_message(proto_out, {"ready": True, "isolation": report})

    while True:
        request = read_message(proto_in)
        if request is None:
            return
        out, err = io.StringIO(), io.StringIO()
        reply = {"id": request.get("id")}
        try:
            with redirect_stdout(out), redirect_stderr(err):
                fn = load_grade(request["source"])
                value = fn(request["sample"], request["item"])
            score, problem = check_score(value)
            if problem:
                reply.update(ok=False, error=problem)
            else:
                reply.update(ok=True, score=score)
        except MemoryError:
            reply.update(ok=False, error="MemoryError: the grader exceeded its memory limit")
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from user code too
            reply.update(ok=False, error=_user_traceback(exc))
        finally:
            if _getpid() != me:
                _exit(0)  # a forked copy of the worker (only possible without seccomp): never answer
        reply["stdout"] = out.getvalue()[-MAX_CAPTURE:]
        reply["stderr"] = err.getvalue()[-MAX_CAPTURE:]
        reply["dirty"] = has_children(me)
        clean_scratch(scratch)
        try:
            write_message(proto_out, reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    main()
