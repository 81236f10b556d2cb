"""The wheel's wall time per stage and per lap, cold and then warm, with the milestones.

    .venv/bin/python benchmarks/wheel.py [--spec evals/banking77/run.yaml] [--db DIR/flywheel.db]

Runs `flywheel run SPEC --json` as a user would, twice on one store: the first (cold) run does every
model call and trains every checkpoint; the second (warm) run is a new run of the same spec, which
the completion cache and the checkpoint registry answer (the baseline to compare a stage's cost
against: what is left is the stage's own bookkeeping and evaluation). Prints a markdown table per
stage and per lap, then baseline -> best prompt -> final model with valid/test score and cost per
item, and the load average. `--db` keeps the store (default: a temporary folder).
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


def run(spec: str, db: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flywheel", "run", spec, "--db", str(db), "--json"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        sys.exit(f"flywheel run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), time.perf_counter() - started


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="evals/banking77/run.yaml")
    parser.add_argument("--db", default=None, help="Store to use (kept); a temporary one by default.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(args.db) if args.db else Path(tmp) / "flywheel.db"
        cold, cold_s = run(args.spec, db)
        warm, warm_s = run(args.spec, db)
    load = os.getloadavg()
    print(f"\n`flywheel run {args.spec}`: stopped: {cold['stopped']}\n")
    print("| lap | stage | decision | cold s | warm s |")
    print("|---:|---|---|---:|---:|")
    for c, w in zip(cold["stages"], warm["stages"]):
        print(f"| {c['lap']} | {c['stage']} | {c['decision']} | {c['wall_s']:.1f} | {w['wall_s']:.1f} |")
    for lap, seconds in sorted(cold["lap_wall_s"].items()):
        print(f"| {lap} | **lap total** | | {seconds:.1f} | {warm['lap_wall_s'].get(lap, 0.0):.1f} |")
    print(f"| | **process** (baseline, stages, test, report) | | {cold_s:.1f} | {warm_s:.1f} |")
    print(f"\nmodel calls cold {cold['model_calls']}, warm {warm['model_calls']}\n")
    print("| milestone | model | valid | test | prompt tokens/item | tokens/item | s/item |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m in cold["milestones"]:
        cost = m["cost"]
        tokens = (cost["prompt_tokens"] or 0) + (cost["completion_tokens"] or 0)
        print(f"| {m['label']} | `{m['model_ref'].split('+')[0]}{'+adapter' if '+' in m['model_ref'] else ''}` | "
              f"{_pct(m['valid'])} | {_pct(m['test'])} | {cost['prompt_tokens']:.0f} | {tokens:.0f} | "
              f"{cost['latency_s']:.4f} |")
    cmp = cold["test"].get("comparison") or {}
    if cmp:
        print(f"\ntest: {_pct(cold['test']['baseline'])} -> {_pct(cold['test']['winner'])}, diff {cmp['diff']:+.3f} "
              f"(95% CI {cmp['ci_low']:+.3f} to {cmp['ci_high']:+.3f}), McNemar p={cmp['p_mcnemar']:.3g}")
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cold {cold_s:.0f} s, warm {warm_s:.0f} s "
          f"({cold_s / max(warm_s, 1e-9):.1f}x)")


if __name__ == "__main__":
    main()
