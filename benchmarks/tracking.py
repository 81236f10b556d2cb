"""Overhead of experiment tracking on a small SFT run: wall time without a tracker vs with each.

    .venv/bin/python benchmarks/tracking.py                      # 48 BANKING77 rows, 6 steps of 8
    .venv/bin/python benchmarks/tracking.py --rows 64 --repeats 3
    .venv/bin/python benchmarks/tracking.py --per-step-only       # what one logged step costs each tracker

Every configuration trains the same LoRA adapter on SmolLM2-135M (flywheel's default SFTSpec, one
epoch, batch 8, logging every step: the worst case for a tracker) through `train_sft`, the path
`flywheel train` takes, in its own process, and times the whole call (model load, the trainer,
registering the checkpoint; no evaluation). The baseline is `report_to: []`; the others add
TensorBoard event files, a local MLflow file store, or both. `--repeats N` runs the list N times,
rotating its order, and reports medians, with the load average beside every figure: this machine
is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"
CONFIGS = {"none": [], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"],
           "tensorboard+mlflow": ["tensorboard", "mlflow"]}


def worker(name: str, n: int) -> dict:
    from flywheel.distill import capture
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store
    from flywheel.train import SFTSpec, build_sft_set
    from flywheel.train.sft import train_sft

    spec = load_eval_spec(DEMO)
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Path(folder) / "bench.db")
        capture(spec, store, "reference:label", limit=n)
        training_set = build_sft_set(spec, store)
        config = SFTSpec(epochs=1, batch_size=8, logging_steps=1, report_to=CONFIGS[name], min_examples=1)
        started = time.perf_counter()
        result = train_sft(spec, store, training_set, base="local:smollm2", config=config, evaluate=False, quiet=True)
        wall = time.perf_counter() - started
        written = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()
                      and ("tracking" in f.parts or "mlruns" in f.parts))
        store.close()
    return {"name": name, "wall_s": wall, "train_s": result.metrics["runtime_s"], "steps": result.metrics["steps"],
            "rows": len(training_set), "bytes": written}


def per_step(n: int = 200) -> dict[str, float]:
    """Milliseconds one logged step costs each tracker (a trainer's typical 8-number log line),
    measured by calling it `n` times: the part of the overhead that grows with the steps."""
    from flywheel.store import Store
    from flywheel.tracking import open_trackers

    line = {"train/loss": 2.0, "train/grad_norm": 1.0, "train/learning_rate": 5e-4, "train/epoch": 0.5,
            "train/entropy": 3.0, "train/num_tokens": 1e4, "train/mean_token_accuracy": 0.5, "train/step_s": 4.0}
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Path(folder) / "bench.db")
        for name in ("tensorboard", "mlflow"):
            [tracker] = open_trackers([name], store=store, name=f"micro-{name}", experiment="bench", params={})
            started = time.perf_counter()
            for step in range(n):
                tracker.log(line, step)
            tracker.finish()
            out[name] = (time.perf_counter() - started) * 1000 / n
        store.close()
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--per-step-only", action="store_true", help="Only the per-logged-step cost (seconds).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.per_step_only:
        before = load()
        costs = per_step()
        print("per logged step (8 numbers, 200 calls): " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items())
              + f"  (load {before} -> {load()})")
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows)))
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    names = list(CONFIGS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            before = load()
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--rows", str(args.rows)],
                                 capture_output=True, text=True, env=env, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["load"] = f"{before} -> {load()}"
            results[name].append(row)
            print(f"  {name:<20} {row['wall_s']:7.1f}s wall, {row['train_s']:6.1f}s in trainer.train  "
                  f"(load {row['load']})", file=sys.stderr)
    base = statistics.median(r["wall_s"] for r in results["none"])
    base_train = statistics.median(r["train_s"] for r in results["none"])
    print(f"\nSFT on SmolLM2-135M, {results['none'][0]['rows']} rows, {results['none'][0]['steps']} steps, "
          f"logging every step; median of {args.repeats}")
    print(f"{'report_to':<20} {'wall s':>8} {'vs none':>8} {'train s':>8} {'vs none':>8} {'written':>9}  load (1/5/15 min)")
    for name in names:
        wall = statistics.median(r["wall_s"] for r in results[name])
        train = statistics.median(r["train_s"] for r in results[name])
        print(f"{name:<20} {wall:8.1f} {wall / base:8.3f} {train:8.1f} {train / base_train:8.3f} "
              f"{results[name][-1]['bytes'] / 1024:7.0f}KB  {results[name][-1]['load']}")
    before = load()
    costs = per_step()
    print("\nper logged step (8 numbers, 200 calls): " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items())
          + f"  (load {before} -> {load()})")


if __name__ == "__main__":
    main()
