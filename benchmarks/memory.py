"""Peak memory per phase of an evaluation process, the old way and the new way, in one run.

    .venv/bin/python benchmarks/memory.py                     # 200 test items; 100 inputs x 5 samples
    .venv/bin/python benchmarks/memory.py --items 50 --sampled 40

Each configuration runs in its own fresh process (a peak never falls back, so two configurations
in one process would hide each other) and goes through the phases a wheel run goes through with
the embedded SmolLM2: import Flywheel, load the model, evaluate the demo's test items greedily
(the eval's own prompt, whose system message is the shared prefix), then sample 5 outputs per
input at temperature 0.7 as `capture` does. Before each phase the process's peak resident set is
reset (`/proc/self/clear_refs`), so a row's peak is that phase's own high-water mark; "after" is
the resident set the next phase starts from. Configurations:

- `old`: as before this change: the fp32 cache file cast to bf16 on load, a 1 GiB KV budget for
  the running batch, nothing handed back to the OS between phases;
- `new`: the defaults: the weights read in the dtype they run in, the current KV budget
  (flywheel.models.decoding.KV_BUDGET_BYTES), `release_memory()` after each phase.

Prints a markdown table (MB) and the ratio new/old of the largest peak. Wall seconds are shown
for context; on a shared machine they move with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose graders.py would shadow the package
DEMO = ROOT / "evals" / "banking77" / "eval.yaml"
OLD_KV_BUDGET = 1 << 30


TIME = "/usr/bin/time"


def peak_rss_of_command(command: list[str], env: dict[str, str] | None = None,
                        cwd: Path | None = None) -> tuple[float, float, int, str]:
    """Run a command to its exit: (wall s, cpu s, its own peak RSS in bytes, stdout); exits with
    its stderr on failure.

    The peak is read by GNU time (`%M`) when it is installed: Linux carries a process's high-water
    mark across fork and exec, so a child forked from a big Python process reports at least that
    process's peak to `wait4` (measured: a 33 s `flywheel eval` "peaking" at exactly its parent's
    1,359 MB). `time` is a small process, so what it reports is the command's own. Without it, the
    `wait4` figure is returned, an upper bound."""
    started = time.perf_counter()
    timed = os.path.exists(TIME)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(([TIME, "-f", "flywheel-peak-kb %M"] if timed else []) + command, stdout=out,
                                   stderr=err, text=True, cwd=cwd or ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = usage.ru_maxrss * 1024
    lines = stderr.rstrip().splitlines()
    if timed and lines and lines[-1].startswith("flywheel-peak-kb "):
        peak = int(lines[-1].split()[1]) * 1024
    if returncode:
        raise SystemExit(f"{command[0]} {command[1]} failed ({returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, peak, stdout


def phases(mode: str, n_items: int, n_sampled: int) -> list[dict]:
    """Run the phases in this process; one row per phase."""
    from flywheel.models.memory import peak_rss_bytes, release_memory, reset_peak_rss, rss_bytes

    rows: list[dict] = []

    def phase(name: str, work) -> object:
        reset_peak_rss()
        started = time.perf_counter()
        result = work()
        if mode == "new":
            release_memory()
        rows.append({"phase": name, "peak": peak_rss_bytes(), "after": rss_bytes(),
                     "wall": time.perf_counter() - started})
        return result

    def imports():
        from flywheel import harness  # noqa: F401 - what `flywheel eval` imports before a model loads
        from flywheel.models import load_model  # noqa: F401
        return None

    phase("import", imports)
    import flywheel.models.decoding as decoding
    from flywheel.data import load_dataset
    from flywheel.grading import GraderSet
    from flywheel.harness import evaluate
    from flywheel.models import load_model
    from flywheel.models.loading import LocalWeights
    from flywheel.prompt import Prompt
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store

    if mode == "old":
        decoding.KV_BUDGET_BYTES = OLD_KV_BUDGET
        plain = LocalWeights.base_path
        LocalWeights.base_path = lambda self, dtype=None: plain(self)  # the fp32 file, cast on load
    spec = load_eval_spec(DEMO)
    dataset = load_dataset(spec)
    model = load_model(spec.model, spec.model_options)
    phase("load model", model.load)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "memory.db")
        graders = GraderSet(spec.graders)
        prompt = Prompt(messages=spec.messages())
        run = store.create_run(kind="bench")

        def greedy():
            iteration = store.iteration_for(run, 0, stage="bench")
            return evaluate(spec, store, iteration, dataset.split("test")[:n_items], model, prompt, graders)

        def sampled():
            sampling = spec.sampling.model_copy(update={"repeats": 5, "temperature": 0.7})
            iteration = store.iteration_for(run, 1, stage="bench")
            items = (dataset.split("train") + dataset.split("valid"))[:n_sampled]
            return evaluate(spec.model_copy(update={"sampling": sampling}), store, iteration, items, model,
                            prompt, graders)

        phase(f"eval, {n_items} items greedy", greedy)
        phase(f"sample, {n_sampled} inputs x 5 at T=0.7", sampled)
        graders.close()
        store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--sampled", type=int, default=100)
    parser.add_argument("--phases", choices=("old", "new"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases(args.phases, args.items, args.sampled)))
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    loads, results = [Path("/proc/loadavg").read_text().split()[0]], {}
    for mode in ("old", "new"):
        command = [sys.executable, __file__, "--phases", mode, "--items", str(args.items),
                   "--sampled", str(args.sampled)]
        wall, cpu, peak, out = peak_rss_of_command(command, env)
        results[mode] = (json.loads(out.strip().splitlines()[-1]), wall, peak)
        loads.append(Path("/proc/loadavg").read_text().split()[0])
        print(f"  {mode}: {wall:.1f}s, peak RSS {peak / 2**20:.0f} MB", flush=True)
    mb = 2 ** 20
    print(f"\nSmolLM2-135M, demo eval; load averages: {', '.join(loads)}\n")
    print("| phase | old peak MB | old after MB | new peak MB | new after MB | new/old peak | old s | new s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for old, new in zip(results["old"][0], results["new"][0]):
        print(f"| {old['phase']} | {old['peak'] / mb:.0f} | {old['after'] / mb:.0f} | {new['peak'] / mb:.0f} | "
              f"{new['after'] / mb:.0f} | {new['peak'] / old['peak']:.2f} | {old['wall']:.1f} | {new['wall']:.1f} |")
    old_peak, new_peak = results["old"][2], results["new"][2]
    print(f"| whole process (wait4) | {old_peak / mb:.0f} | | {new_peak / mb:.0f} | | {new_peak / old_peak:.2f} | "
          f"{results['old'][1]:.1f} | {results['new'][1]:.1f} |")


if __name__ == "__main__":
    main()
