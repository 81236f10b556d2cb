"""Replay every sandbox probe (tests/test_grader_sandbox_escapes.py) and print a table.

    PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE python benchmarks/sandbox_probes.py [--no-baseline]

Columns: the probe, the platform promise it tests, whether this sandbox contained it, and, in the
same run, whether the sandbox contained it with its kernel layers switched off (namespaces, private
root, privilege drop, seccomp and cgroup off; rlimits, protocol checks and Python guards stay:
what a machine without those kernel features gets, and the proof each probe can fail), and in the
fallback where the private root cannot be built (mount namespace + /dev/null covers).
Each of those runs in its own child process: a probe that escapes may SIGKILL its parent.

Then grade throughput with one reused worker: this sandbox vs the one on git `main` (same run).
Goal: 0 escapes of the platform's limits; worker reuse no slower.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose graders.py would shadow the package

import pytest  # noqa: E402
MODES = {
    # what a machine without the kernel features gets (rlimits, protocol checks, Python guard stay)
    "off": {"namespaces": False, "private_root": False, "drop_privileges": False, "seccomp": False, "cgroup": False},
    # the fallback where the mount namespace exists but the private root cannot be built
    "fallback": {"private_root": False},
}


def load_probes():
    spec = importlib.util.spec_from_file_location("sandbox_escapes", ROOT / "tests" / "test_grader_sandbox_escapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_escapes"] = module
    spec.loader.exec_module(module)
    return module


def verdict(module, probe, override=None, force=False) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
        try:
            escaped = module.run_probe(probe, Path(tmp), override=override, force=force)
        except pytest.skip.Exception as e:
            return "skipped", str(e)
        except Exception as e:  # a probe that could not run is not a pass
            return "error", f"{type(e).__name__}: {e}"
    return ("yes", "") if escaped is None else ("NO", escaped)


def one(name: str, mode: str) -> None:
    """Child mode: one probe with the layers of `mode` off; prints a JSON verdict."""
    module = load_probes()
    module.FILL_MB = 320  # enough to pass the limits, not enough to hurt a shared machine
    probe = next(p for p in module.PROBES if p.name == name)
    status, detail = verdict(module, probe, override=MODES[mode], force=True)
    print(json.dumps({"status": status, "detail": detail}), flush=True)


def baseline(name: str, mode: str) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        out = subprocess.run([sys.executable, __file__, "--one", name, mode], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return "NO", "the probe's parent hung"
    if out.returncode < 0:
        return "NO", f"the parent process was killed by signal {-out.returncode}"
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return "error", (out.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return result["status"], result["detail"]


def throughput(n: int = 1000) -> tuple[float, ...]:
    """Grades/s with one reused worker, then with a new worker per grade: this sandbox and git
    main's (same run, same grader; best of 3 interleaved rounds). benchmarks/sandbox_throughput.py
    has the fuller table (ms/grade and the fork floor)."""
    import graders.python_sandbox as new
    from sandbox_throughput import grade_rate, sandbox_at

    old = sandbox_at("main")
    rows = [(grade_rate(new, n), grade_rate(old, n), grade_rate(new, n // 50, reuse=False),
             grade_rate(old, n // 50, reuse=False)) for _ in range(3)]  # interleaved
    return tuple(max(r[i] for r in rows) for i in range(4))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    if "--one" in sys.argv:
        at = sys.argv.index("--one")
        one(sys.argv[at + 1], sys.argv[at + 2])
        return
    module = load_probes()
    modes = [] if "--no-baseline" in sys.argv else list(MODES)
    rows, escapes, mode_escapes = [], 0, {m: 0 for m in modes}
    start_load = load()
    for probe in module.PROBES:
        status, detail = verdict(module, probe)
        escapes += status == "NO"
        others = []
        for mode in modes:
            if probe.unsafe_without_layers and mode == "off":
                result = ("not run", "")  # e.g. a real fork bomb as root: nothing would stop it
            else:
                result = baseline(probe.name, mode)
            mode_escapes[mode] += result[0] == "NO"
            others.append(result)
        rows.append((probe.name, probe.limit, status, detail, others))
    import graders

    isolation = module._grade(graders.SandboxPool(graders.SandboxLimits(workers=1)), module.OK, {}).details["sandbox"]
    print(f"sandbox probes — {len(rows)} probes, uid {os.geteuid()}, kernel {os.uname().release}, load {start_load}")
    print("layers here: " + ", ".join(f"{k}={isolation.get(k)}" for k in
                                      ("netns", "private_root", "proc", "uid", "seccomp", "cgroup_mb", "memory_mb",
                                       "scratch_mb", "shm_mb")))
    print()
    titles = {"off": "kernel layers off", "fallback": "fallback: no private root"}
    print("| probe | platform limit | contained | " + " | ".join(titles[m] for m in modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))

    def cell(status: str, detail: str, width: int) -> str:
        detail = " ".join(str(detail).split()).replace("|", "/")
        return status + (f" ({detail[:width]})" if status not in ("yes", "not run") and detail else "")

    for name, limit, status, detail, others in rows:
        print(f"| {name} | {limit} | {cell(status, detail, 90)} | " + " | ".join(cell(s, d, 60) for s, d in others) + " |")
    skipped = sum(r[2] == "skipped" for r in rows)
    print(f"\nescapes: {escapes} of {len(rows)} (skipped {skipped}); "
          + "; ".join(f"{titles[m]}: {n}" for m, n in mode_escapes.items()) + " (goal: 0 escapes)")
    new, old, new_fresh, old_fresh = throughput()
    print(f"\ngrade throughput, one reused worker: this sandbox {new:,.0f} grades/s, git main's {old:,.0f} grades/s "
          f"({new / old:.2f}×); a new worker per grade: {new_fresh:,.1f}/s vs {old_fresh:,.1f}/s; "
          f"reuse speed-up here {new / new_fresh:,.0f}×; load {load()}")


if __name__ == "__main__":
    main()
