"""The python grader's worker process. Standalone: stdlib only, never imports `graders`.

Started by graders.python_sandbox as `python -I sandbox_worker.py` in a scratch folder with a
stripped environment. The parent talks to it over stdin/stdout with length-prefixed JSON; the
worker then points fds 0/1 at /dev/null. Each request runs in a forked grading process that closes
the protocol descriptors before user code runs (so user code cannot write a reply to the parent,
whatever it finds in memory), installs the seccomp filter with its own pid, dies with the worker
(PR_SET_PDEATHSIG), and sends one result frame over a pipe of its own; the worker refuses a result
that is not exactly one valid frame.

Before any user code runs, the worker locks itself down as far as the machine allows and reports
what it got:
* namespaces (unshare): new mount, network and IPC namespaces (inside a user namespace when not
  root): no network, no host abstract sockets, no host SysV IPC;
* a private root (pivot_root into a tmpfs): read-only binds of what Python needs, a synthetic
  /etc/passwd, a size-limited scratch tmpfs and /dev/shm, /proc with hidepid=invisible (as root);
  hidden paths inside the exposed trees covered by /dev/null. Where that fails: /dev/null covers;
* root drops to nobody (uid/gid 65534, no groups, no capabilities);
* rlimits: address space, file size, open files, no core dumps; non-dumpable;
* seccomp filter (Linux x86_64 / aarch64): no new processes or programs, no socket(), no signal to
  any other process by any route (kill family, sigqueue family, pidfd, fcntl/ioctl owners), no
  ptrace, no memfd/SysV shm, no namespace or mount changes (see install_seccomp);
* Python level: socket constructors raise a clear PermissionError.
"""

import ctypes
import gc
import io
import json
import math
import numbers
import os
import platform
import resource
import shutil
import signal
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
MAX_ERROR = 8000  # characters; a reply always stays far below the parent's frame limit
MAX_RESULT_BYTES = 1 << 20  # the grading process's result frame (a few KB when honest)


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
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
EPERM, EACCES, ENOSYS = 1, 13, 38
NOBODY = 65534

# syscall numbers: name -> (x86_64, aarch64); None where the arch has no such call
SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "execve": (59, 221), "execveat": (322, 281),
    "socket": (41, 198), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "pidfd_send_signal": (424, 424), "pidfd_open": (434, 434), "pidfd_getfd": (438, 438),
    "fcntl": (72, 25), "ioctl": (16, 29),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "process_madvise": (440, 440), "kcmp": (312, 272), "migrate_pages": (256, 238), "move_pages": (279, 239),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "memfd_create": (319, 279), "shmget": (29, 194), "userfaultfd": (323, 282),
    "perf_event_open": (298, 241), "bpf": (321, 280), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225), "iopl": (172, None),
    "ioperm": (173, None), "setsid": (112, 157), "setpgid": (109, 154),
}
AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1), "arm64": (0xC00000B7, 1)}
# fcntl commands that route signals: F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY
SIGNAL_FCNTL = (8, 10, 15, 1024, 1026)
# ioctls that set a signal owner or reach a terminal: FIOSETOWN, SIOCSPGRP, TIOCSPGRP, TIOCSTI,
# TIOCSCTTY, TIOCLINUX, TIOCCONS
DENIED_IOCTL = (0x8901, 0x8902, 0x5410, 0x5412, 0x540E, 0x541C, 0x541D)
# where the worker's own pid is the only allowed first argument
OWN_PID_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
ALWAYS_DENIED = ("fork", "vfork", "execve", "execveat", "tkill", "pidfd_send_signal", "pidfd_open", "pidfd_getfd",
                 "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "migrate_pages",
                 "move_pages", "io_uring_setup", "io_uring_enter", "io_uring_register", "memfd_create", "shmget",
                 "userfaultfd", "perf_event_open", "bpf", "keyctl", "add_key", "request_key", "open_by_handle_at",
                 "name_to_handle_at", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree",
                 "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "init_module",
                 "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
                 "iopl", "ioperm", "setsid", "setpgid")


_LIBC = []


def _libc():
    """The C library the running process already has loaded (looked up once per process)."""
    if not _LIBC:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _LIBC.append(lib)
    return _LIBC[0]


class _Mounter:
    def __init__(self):
        self.libc = _libc()

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
        if self.libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")

    def set_attr(self, target, set_=0, clear=0, recursive=True):
        """Change mount attributes of the tree at `target`, every submount included unless not
        `recursive` (mount_setattr, Linux 5.12+; the same number on every architecture)."""

        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        attr = MountAttr(set_, clear, 0, 0)
        if self.libc.syscall(442, AT_FDCWD, target.encode(), AT_RECURSIVE if recursive else 0,
                             ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
            return
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr {target}: {os.strerror(err)}")

    def read_only(self, target):
        self.set_attr(target, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)


def read_only_host(scratch):
    """The fallback without a private root: the whole host tree read-only (and nosuid), scratch
    (bound onto itself) the only writable place. Returns True if done."""
    m = _Mounter()
    try:
        m.mount(scratch, scratch, None, MS_BIND)
        m.set_attr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        m.set_attr(scratch, clear=MOUNT_ATTR_RDONLY, recursive=False)
        os.chdir(scratch)  # the cwd still pointed into the folder under the new bind mount
    except OSError:
        return False
    return True


def exposed_paths():
    """What Python and its packages need: the system library trees and this interpreter's paths."""
    wanted = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache",
              "/etc/localtime", sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(sys.executable)]
    wanted += [p for p in sys.path if p and os.path.isabs(p)]
    out = []
    for path in wanted:
        path = os.path.abspath(path)
        if path != "/" and os.path.lexists(path):
            out.append(path)
    return sorted(set(out), key=lambda p: (p.count("/"), p))


def _inside(path, tree):
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _make_mountpoint(target, is_dir):
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            open(target, "w").close()


def build_private_root(root, scratch, hidden, scratch_mb, shm_mb, owner):
    """Pivot into a fresh read-only root holding only what Python needs, a private size-limited
    scratch (tmpfs) and /dev/shm, a /proc that hides other users' processes, and no hidden path.
    Runs in a new mount namespace, before any user code. Returns a report; raises OSError."""
    m = _Mounter()
    m.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    exposed = []
    for path in exposed_paths():
        if any(_inside(path, tree) for tree in exposed):
            continue
        target = root + path
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), target)  # /lib -> usr/lib and the like
            continue
        real = os.path.realpath(path)
        _make_mountpoint(target, os.path.isdir(real))
        m.mount(real, target, None, MS_BIND | MS_REC)
        exposed.append(path)
    os.makedirs(root + "/etc", exist_ok=True)
    uid, gid = os.getuid(), os.getgid()
    me = f"grader:x:{uid}:{gid}:grader:/:/bin/false\n" if uid not in (0, NOBODY) else ""
    with open(root + "/etc/passwd", "w") as f:
        f.write(f"root:x:0:0:root:/:/bin/false\nnobody:x:{NOBODY}:{NOBODY}:nobody:/:/bin/false\n{me}")
    with open(root + "/etc/group", "w") as f:
        f.write(f"root:x:0:\nnogroup:x:{NOBODY}:\n" + (f"grader:x:{gid}:\n" if me else ""))
    os.makedirs(root + "/dev/shm")
    for dev in ("null", "zero", "full", "random", "urandom"):
        _make_mountpoint(f"{root}/dev/{dev}", False)
        m.mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{root}/dev/{name}")
    os.makedirs(root + "/proc")
    os.makedirs(root + scratch, exist_ok=True)
    report = {"exposed": exposed, "hidden": [], "visible": []}
    for path in hidden:
        if not any(_inside(path, tree) for tree in exposed):
            report["hidden"].append(path)  # not in the new root at all
        elif os.path.isfile(path):
            m.mount("/dev/null", root + path, None, MS_BIND)
            report["hidden"].append(path)
        elif not os.path.exists(path):
            report["visible"].append(path)  # would show if created later inside an exposed tree
    m.read_only(root)
    ids = f",uid={owner[0]},gid={owner[1]}" if owner else ""
    m.mount("tmpfs", root + scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_mb}m,mode=700{ids}")
    m.mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={shm_mb}m,mode=1777")
    report["proc"] = False
    for option in ("hidepid=invisible", "hidepid=2"):
        try:
            m.mount("proc", root + "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, option)
            report["proc"] = option
            break
        except OSError:
            pass
    os.chdir(root)
    nr = {"x86_64": 155, "aarch64": 41, "arm64": 41}.get(platform.machine().lower())
    if nr is None:
        raise OSError(ENOSYS, f"pivot_root: no syscall number known for {platform.machine()}")
    if m.libc.syscall(nr, b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    if m.libc.umount2(b".", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"detaching the old root: {os.strerror(err)}")
    os.chdir(scratch)
    report["scratch_mb"], report["shm_mb"] = scratch_mb, shm_mb
    return report


def _write_id_maps(uid, gid):
    """Map our own uid and gid into the new user namespace (read them before unshare: after it,
    they show as the overflow id 65534)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def isolate_namespaces(setup, is_root):
    """New mount, network and IPC namespaces (plus a user namespace when not root); then a private
    read-only root (or, where that fails, the hidden paths covered by /dev/null). Returns a report."""
    hidden = setup.get("hidden", [])
    report = {"netns": False, "mountns": False, "userns": False, "private_root": False, "hidden": []}
    if not sys.platform.startswith("linux"):
        return report
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
    for extra in ((0, CLONE_NEWUSER) if is_root else (CLONE_NEWUSER, 0)):
        if libc.unshare(flags | extra) == 0:
            report["netns"] = report["mountns"] = True
            report["userns"] = bool(extra)
            break
    else:
        report["why"] = f"unshare(mount|net): {os.strerror(ctypes.get_errno())}"
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWNET) == 0:
            report["netns"] = True
        return report
    try:
        if report["userns"]:
            _write_id_maps(uid, gid)
        _Mounter().mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        report["why"] = str(e)
        return report
    if setup.get("private_root", True) and setup.get("root"):
        owner = (NOBODY, NOBODY) if is_root and setup.get("drop_privileges", True) else None
        scratch = os.getcwd()
        try:
            report.update(build_private_root(setup["root"], scratch, hidden, setup["scratch_mb"],
                                             setup["shm_mb"], owner))
            report["private_root"] = True
            return report
        except OSError as e:  # the namespace is ours and nothing was pivoted: fall back to /dev/null covers
            report["why"] = f"no private root: {e}"
            os.chdir(scratch)
            _libc().umount2(setup["root"].encode(), MNT_DETACH)  # with everything mounted below it
    for path in hidden:
        if os.path.lexists(path) and libc.mount(b"/dev/null", path.encode(), None, MS_BIND, None) == 0:
            report["hidden"].append(path)
    report["read_only"] = read_only_host(os.getcwd())
    return report


def _world_readable(path):
    """Whether any user can reach `path` (every folder above it searchable by others)."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def drop_privileges():
    """Root: become nobody (no capabilities, no access to root's files or processes). True if done."""
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    except OSError:
        return False
    return os.geteuid() == NOBODY


_SECCOMP = []  # (program buffer, sock_fprog, byte offset of the own-pid word) once compiled


def install_seccomp(pid):
    """Kernel-enforced: no new processes or programs, no sockets, no signals to other processes
    by any route, no tracing, no namespace or mount changes. True if active.

    The program is compiled once per worker (seccomp_program); each grading process only writes
    its own pid into the one word that holds it, in its own copy-on-write page, then installs it."""
    program = seccomp_program()
    if program is None:
        return False
    buf, fprog, pid_offset = program
    struct.pack_into("I", buf, pid_offset, pid & 0xFFFFFFFF)
    libc = _libc()
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def seccomp_program():
    """The seccomp filter as a BPF program, built on first use and kept for the process (and the
    grading processes it forks); None where this platform has none. Its own-pid check compares
    against a placeholder that install_seccomp overwrites."""
    if _SECCOMP:
        return _SECCOMP[0]
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in AUDIT_ARCH:
        _SECCOMP.append(None)
        return None
    audit_arch, column = AUDIT_ARCH[machine]
    nr = {name: numbers_[column] for name, numbers_ in SYSCALLS.items() if numbers_[column] is not None}

    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000

    def errno(e):
        return 0x00050000 | e

    prog = []  # [code, jt, jf, k] with jt/jf as labels or 0
    labels = {}

    def op(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    op(LD_ABS, 4)  # seccomp_data.arch
    op(JEQ, audit_arch, 0, "bad_arch")
    op(LD_ABS, 0)  # seccomp_data.nr
    if column == 0:
        op(JGE, 0x40000000, "deny", 0)  # x32 ABI numbers
    dispatch = [("clone", "clone"), ("clone3", "nosys"), ("socket", "eacces"), ("fcntl", "fcntl"),
                ("ioctl", "ioctl")]
    dispatch += [(name, "own_pid") for name in OWN_PID_ONLY] + [(name, "deny") for name in ALWAYS_DENIED]
    for name, target in dispatch:
        if name in nr:
            op(JEQ, nr[name], target, 0)
    op(RET, ALLOW)
    labels["clone"] = len(prog)
    op(LD_ABS, 16)  # args[0] low word: clone flags
    op(JSET, CLONE_THREAD, "allow", "deny")
    labels["own_pid"] = len(prog)
    op(LD_ABS, 16)  # args[0]: target pid / tgid (a pid_t: the low word is all the kernel reads)
    pid_at = len(prog)
    op(JEQ, 0, "allow", "deny")  # k: the grading process's pid, written in by install_seccomp
    labels["fcntl"] = len(prog)
    op(LD_ABS, 24)  # args[1] low word: the command (an unsigned int to the kernel)
    for cmd in SIGNAL_FCNTL:
        op(JEQ, cmd, "deny", 0)
    op(RET, ALLOW)
    labels["ioctl"] = len(prog)
    op(LD_ABS, 24)  # args[1] low word: the request
    for cmd in DENIED_IOCTL:
        op(JEQ, cmd, "deny", 0)
    op(RET, ALLOW)
    labels["eacces"] = len(prog)
    op(RET, errno(EACCES))
    labels["deny"] = len(prog)
    op(RET, errno(EPERM))
    labels["nosys"] = len(prog)
    op(RET, errno(ENOSYS))  # clone3: glibc falls back to clone, whose flags the filter can read
    labels["allow"] = len(prog)
    op(RET, ALLOW)
    labels["bad_arch"] = len(prog)
    op(RET, KILL)

    insn = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k
    raw = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256, "seccomp jump out of range"
        raw += insn.pack(code, jt, jf, k & 0xFFFFFFFF)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    _SECCOMP.append((buf, fprog, pid_at * insn.size + struct.calcsize("HBB")))
    return _SECCOMP[0]


def _limit(which, value):
    try:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
        return value
    except (ValueError, OSError):
        return None


def set_limits(memory_mb, file_size_mb):
    report = {"memory_mb": memory_mb if _limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024) else None}
    _limit(resource.RLIMIT_FSIZE, file_size_mb * 1024 * 1024)
    _limit(resource.RLIMIT_CORE, 0)
    report["open_files"] = _limit(resource.RLIMIT_NOFILE, 256)  # bounds pipe and socketpair buffers too
    return report


def count_tasks_by_uid():
    """Tasks (threads included: what RLIMIT_NPROC counts) per uid, read before /proc is replaced."""
    counts = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return counts
    for entry in entries:
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                counts[uid] = counts.get(uid, 0) + len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return counts


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


def compile_grader(source):
    """The grader source's code object, cached in the worker: compiled there before the fork so
    each grading process inherits it (compiling runs no user code)."""
    code = _compiled.get(source)
    if code is None:
        code = compile(source, "<grader>", "exec", dont_inherit=True)
        if len(_compiled) > 64:
            _compiled.clear()
        _compiled[source] = code
    return code


def load_grade(source):
    code = compile_grader(source)
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


def run_grade(request):
    """Run the user's grade() on one request (in the grading process); the reply's fields."""
    out, err = io.StringIO(), io.StringIO()
    reply = {}
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
        try:
            reply.update(ok=False, error=_user_traceback(exc)[:MAX_ERROR])
        except BaseException:  # an exception whose str() itself fails
            reply.update(ok=False, error=f"{type(exc).__name__} (its message could not be shown)")
    reply["stdout"] = out.getvalue()[-MAX_CAPTURE:]
    reply["stderr"] = err.getvalue()[-MAX_CAPTURE:]
    return reply


def lock_grading_process(setup, report, nproc_base):
    """In the grading process, before user code: die with the worker, the seccomp filter (with
    this process's own pid), and where no pids cgroup counts tasks, RLIMIT_NPROC. Raises OSError."""
    if sys.platform.startswith("linux"):
        _libc().prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: no grading process outlives its worker
    if not setup.get("pids_cgroup") and os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        # it counts every task of this uid on the machine, so the limit is the uid's count + ours
        if _limit(resource.RLIMIT_NPROC, nproc_base + setup["max_processes"]) is None:
            raise OSError("RLIMIT_NPROC could not be set")
    if report["seccomp"] and not install_seccomp(_getpid()):
        raise OSError("the seccomp filter could not be installed")


def grade_in_process(request, setup, report, nproc_base, protocol_fds):
    """Fork a grading process for one request: it drops the worker's channel to the parent (user
    code cannot write a reply there, whatever it finds in memory), locks itself down, runs grade()
    and sends its result over a pipe of its own; this worker checks that result and answers."""
    try:
        compile_grader(request["source"])
    except BaseException:  # noqa: S110 - a source that does not compile: the grading process reports why
        pass
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        return {"ok": False, "error": f"the grading process could not be started: {e}"}
    if pid == 0:  # the grading process
        code = 0
        try:
            os.close(r)
            for fd in protocol_fds:
                os.close(fd)
            lock_grading_process(setup, report, nproc_base)
            with os.fdopen(w, "wb", buffering=0) as result:
                write_message(result, run_grade(request))
        except BaseException:
            code = 70
        finally:
            _exit(code)
    os.close(w)
    try:
        body = read_result(r)
        _, status = os.waitpid(pid, 0)
        os.set_blocking(r, False)
        try:
            extra = os.read(r, 1)  # the process has ended: whatever it wrote is in the pipe now
        except BlockingIOError:
            extra = b""
    finally:
        os.close(r)
    if status != 0:
        return {"ok": False, "error": crash_message(status)}
    reply = _result_fields(body) if body is not None and not extra else None
    if reply is None:
        return {"ok": False, "error": "grade() broke the worker protocol: the grading process's result was "
                                      "not one valid reply (user code wrote into the result channel)"}
    return reply


def read_result(fd):
    """The grading process's one frame (None when it sent none or more than allowed)."""
    chunks, need, head = [], 4, None
    while need:
        chunk = os.read(fd, min(need, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
        if head is None and need == 0:
            head = b"".join(chunks)
            (need,) = _unpack(head)
            if need > MAX_RESULT_BYTES:
                return None
            chunks = []
    return b"".join(chunks)


def _result_fields(body):
    """The grading process's result, only the fields a reply carries, of the right types."""
    try:
        result = _loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        return None
    reply = {"ok": result["ok"]}
    if result["ok"]:
        score = result.get("score")
        if type(score) is not float or not math.isfinite(score):
            return None
        reply["score"] = score
    else:
        if not isinstance(result.get("error"), str):
            return None
        reply["error"] = result["error"][:MAX_ERROR]
    for key in ("stdout", "stderr"):
        if not isinstance(result.get(key, ""), str):
            return None
        reply[key] = result.get(key, "")[-MAX_CAPTURE:]
    return reply


def crash_message(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        hint = " (likely out of memory)" if sig == signal.SIGKILL else ""
        return f"grade() crashed the worker: the worker process was killed by {name}{hint}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == 70:
        return "grade() could not run: the grading process could not lock itself down"
    return f"grade() crashed the worker: the worker process exited with status {code}"


def seccomp_works():
    """Whether this kernel takes the filter: tried in a throwaway process (the worker itself stays
    free to fork its grading processes)."""
    if seccomp_program() is None:  # compiled here, once: every grading process inherits it
        return False
    pid = os.fork()
    if pid == 0:
        _exit(0 if install_seccomp(_getpid()) else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def main():
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    protocol_fds = (proto_in.fileno(), proto_out.fileno())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    proto_in = io.BufferedReader(proto_in)

    setup = read_message(proto_in)
    if setup is None:
        return
    me = _getpid()
    is_root = os.geteuid() == 0
    scratch = os.getcwd()
    tasks = count_tasks_by_uid()
    report = {"pid": me}
    report.update(isolate_namespaces(setup, is_root) if setup.get("namespaces", True) else {})
    if is_root and setup.get("drop_privileges", True) and (
            report.get("private_root") or all(_world_readable(p) for p in exposed_paths())):
        if not report.get("private_root"):  # the host scratch folder: nobody must be able to use it
            os.chown(scratch, NOBODY, NOBODY)
            os.chmod(os.path.dirname(scratch), 0o711)
        report["uid"] = os.geteuid() if not drop_privileges() else NOBODY
    else:
        report["uid"] = os.geteuid()
    report.update(set_limits(setup["memory_mb"], setup["file_size_mb"]))
    if sys.platform.startswith("linux"):
        _libc().prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem or environ for other processes
        _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of user code stay ours to see
    report["seccomp"] = seccomp_works() if setup.get("seccomp", True) else False
    nproc_base = tasks.get(os.getuid(), 64) + 8
    if setup.get("pids_cgroup"):
        report["max_processes"] = "pids cgroup"
    elif os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        report["max_processes"] = nproc_base + setup["max_processes"]  # RLIMIT_NPROC of the grading process
    else:
        report["max_processes"] = None  # root: RLIMIT_NPROC does not apply; nothing limits tasks
    start_orphan_watchdog(os.getppid())
    block_python_sockets()
    write_message(proto_out, {"ready": True, "isolation": report})
    gc.freeze()  # the worker's objects: a grading process's collections neither scan nor copy them

    while True:
        request = read_message(proto_in)
        if request is None:
            return
        reply = {"id": request.get("id")}
        reply.update(grade_in_process(request, setup, report, nproc_base, protocol_fds))
        # a process user code started and left (impossible under seccomp: no fork, no clone of a process)
        reply["dirty"] = False if report["seccomp"] else has_children(me)
        clean_scratch(scratch)
        try:
            write_message(proto_out, reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    main()
