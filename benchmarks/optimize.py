"""Prompt search cost: model calls and wall time to reach the winner, then the same search again.

    .venv/bin/python benchmarks/optimize.py [--spec evals/banking77/eval.yaml]

Runs `flywheel optimize SPEC` twice as a user would (two processes, one fresh store). The baseline
is the first run; the rerun should answer every candidate from the completion cache (goal: zero
model calls). Prints a markdown table, then the winner vs baseline on valid and test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(spec: str, db: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flywheel", "optimize", spec, "--db", str(db), "--json"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="evals/banking77/eval.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first, first_s = run(args.spec, Path(tmp) / "opt.db")
        again, again_s = run(args.spec, Path(tmp) / "opt.db")
    print(f"\nprompt search on {args.spec}: {len(first['candidates'])} candidates, "
          f"{len(first['rejected'])} proposals rejected before evaluation\n")
    print("| run | wall s | model calls | tokens | winner | test (winner) |")
    print("|---|---:|---:|---:|---|---:|")
    for name, data, wall in (("first", first, first_s), ("rerun", again, again_s)):
        print(f"| {name} | {wall:.1f} | {data['model_calls']} | {data['tokens']} | {data['winner']['origin']} "
              f"| {data['winner']['test_score']:.3f} |")
    for split in ("valid", "test"):
        c = first[f"{split}_comparison"]
        print(f"\n{split}: baseline {c['mean_a']:.3f} -> winner {c['mean_b']:.3f}, diff {c['diff']:+.3f} "
              f"(95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}), McNemar p={c['p_mcnemar']:.2g}, "
              f"{c['improvements']} fixed / {c['regressions']} broken")
    print("\ncandidates (minibatch / valid / test):")
    for c in first["candidates"]:
        print(f"  {c['origin']:<24} {c['minibatch_score']!s:>6} {c['valid_score']!s:>6} {c['test_score']!s:>6}")


if __name__ == "__main__":
    main()
