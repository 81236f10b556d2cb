"""Process memory: the peak resident set read back, and freed heap handed back to the OS.

A long process (a wheel run: search, capture, training, evaluations one after another) frees the
tensors of each phase, but glibc's malloc keeps freed chunks below its mmap threshold (which rises
to 32 MB as big tensors come and go) in its arenas, so the resident set only ever grows: the next
phase starts on top of the last one's high-water mark. `release_memory` after a phase returns
those pages (`malloc_trim`), so phases do not stack.

    release_memory()                 # after an evaluation, a training run, a stage
    reset_peak_rss(); ...; peak_rss_bytes()   # a phase's own peak (benchmarks/memory.py)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: no glibc here


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else None
        except OSError:
            _LIBC = None
    return _LIBC  # type: ignore[return-value]


def release_memory(*, collect: bool = True) -> bool:
    """Collect garbage (unless `collect` is False), then give the heap's free pages back to the OS
    (glibc `malloc_trim`).

    Returns whether anything could be handed back (False where the C library is not glibc).
    Cheap (milliseconds): call it between phases; inside a long loop (the continuous decoder), only
    every few seconds and with `collect=False`."""
    if collect:
        gc.collect()
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM) since it started or since `reset_peak_rss`; 0 where
    /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    """The process's resident set now (VmRSS); 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Start a new peak: VmHWM falls to the resident set now (Linux: /proc/self/clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
