"""Python grader throughput: this sandbox vs git main's, in the same run, and what a fork costs.

    PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE python benchmarks/sandbox_throughput.py [--grades N] [--also REF]

(--also REF: one more row, the sandbox at git REF, e.g. an earlier commit of this branch.)

This sandbox forks one grading process per grade (user code never shares a process with the
worker's channel or with another grade); main's ran every grade inside the reused worker. Rows:
both sandboxes with one reused worker (best of 3 interleaved rounds of N grades), then the floor a
fork per grade sets here: fork + exit + wait of a process the worker's size, and the same with the
seccomp filter installed (the grading process's own lockdown), both measured in a sandbox worker
module's process. The load average is printed: on a shared machine every row moves with it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose graders.py would shadow the package

SOURCE = "def grade(sample, item):\n    return float(item['label'] in sample['output_text'])\n"


def sandbox_at(ref: str = "main") -> ModuleType:
    """git `ref`'s graders/python_sandbox.py (and its worker), loaded as a module of its own."""
    old_dir = Path(tempfile.mkdtemp(prefix="sandbox-ref-"))
    for name in ("python_sandbox.py", "sandbox_worker.py"):
        text = subprocess.run(["git", "show", f"{ref}:graders/{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        (old_dir / name).write_text(text)
    module_name = f"python_sandbox_at_{len(sys.modules)}"
    spec = importlib.util.spec_from_file_location(module_name, old_dir / "python_sandbox.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = old
    spec.loader.exec_module(old)
    return old


def grade_rate(module: ModuleType, count: int, reuse: bool = True) -> float:
    """Grades per second of `module`'s PythonGrader with one worker (reused, or new per grade)."""
    import graders

    cfg = graders.parse_grader({"type": "python", "name": "py", "source": SOURCE})
    sample, item = graders.make_sample("my card has not arrived"), {"label": "card"}
    grader = module.PythonGrader(cfg, sandbox=module.SandboxLimits(workers=1, reuse_workers=reuse))
    try:
        first = grader.grade(sample, item)
        assert first.score == 1.0, first
        start = time.perf_counter()
        for _ in range(count):
            grader.grade(sample, item)
        return count / (time.perf_counter() - start)
    finally:
        grader.close()


def fork_rate(count: int, seccomp: bool) -> float:
    """Fork + exit + wait per second from a process the worker's size (`python -I`, the worker
    module only, its seccomp program compiled once), the child installing the filter first where
    `seccomp`: what a fork per grade costs here at the least."""
    out = subprocess.run([sys.executable, "-I", __file__, "--fork-floor", str(count), str(int(seccomp))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


def fork_floor(count: int, seccomp: bool) -> float:
    """fork_rate's child side: measured in this (small) process."""
    sys.path.insert(0, str(ROOT / "graders"))
    import sandbox_worker

    sandbox_worker.seccomp_program()
    start = time.perf_counter()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not seccomp or sandbox_worker.install_seccomp(os.getpid()) else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, "the seccomp filter could not be installed"
    return count / (time.perf_counter() - start)


def rates(count: int, also: str | None = None, rounds: int = 3) -> dict[str, float]:
    """Each row's best rate over interleaved rounds (the rows alternate within a round)."""
    import graders.python_sandbox as new

    old = sandbox_at("main")
    rows = {"this tree: fork per grade": lambda: grade_rate(new, count),
            "git main: grades in the worker": lambda: grade_rate(old, count)}
    if also:
        other = sandbox_at(also)
        rows[f"git {also}"] = lambda: grade_rate(other, count)
    rows["floor: fork + exit + wait"] = lambda: fork_rate(count, False)
    rows["floor: fork + seccomp + exit + wait"] = lambda: fork_rate(count, True)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, rate in rows.items():
            best[name] = max(best.get(name, 0.0), rate())
    return best


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    if "--fork-floor" in sys.argv:
        at = sys.argv.index("--fork-floor")
        print(fork_floor(int(sys.argv[at + 1]), sys.argv[at + 2] == "1"))
        return
    count = int(sys.argv[sys.argv.index("--grades") + 1]) if "--grades" in sys.argv else 500
    also = sys.argv[sys.argv.index("--also") + 1] if "--also" in sys.argv else None
    start_load = load()
    best = rates(count, also)
    main_rate = best["git main: grades in the worker"]
    print(f"python grader throughput — {count} grades per round, best of 3 interleaved rounds, "
          f"{os.cpu_count()} CPUs, load {start_load} at start, {load()} at end")
    print()
    print("| sandbox | grades/s | ms/grade | vs main |")
    print("|---|---:|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {1000 / rate:.3f} | {main_rate / rate:.1f}× slower |"
              if rate < main_rate else f"| {name} | {rate:,.0f} | {1000 / rate:.3f} | 1.0× |")


if __name__ == "__main__":
    main()
