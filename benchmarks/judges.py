"""Judge quality and speed: constrained vs free-text SmolLM2 on the same labelled set.

    .venv/bin/python benchmarks/judges.py            # 48 items (about 5 minutes on 2 busy cores)
    .venv/bin/python benchmarks/judges.py --quick    # 16 items

The set is fixtures/judges/sentiment.jsonl (customer messages labelled positive/negative) with the
graders of fixtures/judges/graders.json (a label_model and a 0-10 score_model; reference pass =
positive). Per grader and mode: parse errors, pass/fail accuracy and Cohen's kappa against the
reference, and grades/s through one batched `grade_batch`. The free-text judge is the same
loaded model seen only through `chat` (what any judge without `score_choices` gets); its
score_model replies are capped at 96 tokens (the default 512 mostly buys rambling).
Then throughput of the constrained label_model: one `grade_batch` vs one `grade` per item.
Prints a markdown table and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graders  # noqa: E402
from graders.constrained import FreeText  # noqa: E402

from flywheel.calibration import calibrate  # noqa: E402
from flywheel.models import load_model  # noqa: E402


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    fixtures = ROOT / "fixtures" / "judges"
    lines = (fixtures / "sentiment.jsonl").read_text().splitlines()
    rows = [(i + 1, json.loads(line)) for i, line in enumerate(lines[:16] if args.quick else lines)]
    configs = json.loads((fixtures / "graders.json").read_text())
    print(f"load average before: {load()}  items: {len(rows)}")
    model = load_model("local:smollm2")
    model.load()
    out = []
    for mode, judge in (("constrained", model), ("free text", FreeText(model))):
        for cfg in configs:
            cfg = dict(cfg)
            if mode == "free text" and cfg["type"] == "score_model":
                cfg["sampling_params"] = {"max_completions_tokens": 96}
            [result] = calibrate([cfg], rows, judge=judge, passing=["positive"])
            out.append((mode, result))
    print()
    print("| grader | judge | errors | pass/fail accuracy | kappa | label kappa | score AUC | grades/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in out:
        label_kappa = f"{r.label_kappa:.3f}" if r.label_kappa is not None else "-"
        auc = f"{r.auc:.3f}" if r.auc is not None else "-"
        print(f"| {r.grader} ({r.type}) | {mode} | {r.errors}/{r.n} | {r.pass_accuracy:.3f} | {r.pass_kappa:.3f} "
              f"| {label_kappa} | {auc} | {r.grades_per_s:.2f} |")

    grader = graders.build_grader(configs[0], judge=model)
    samples = [row["output"] for _, row in rows]
    start = time.perf_counter()
    grader.grade_batch(samples, [{}] * len(samples))
    batched = len(samples) / (time.perf_counter() - start)
    start = time.perf_counter()
    for sample in samples:
        grader.grade(sample, {})
    single = len(samples) / (time.perf_counter() - start)
    print()
    print("| constrained label_model | grades/s | ratio |")
    print("|---|---|---|")
    print(f"| one grade_batch of {len(samples)} | {batched:.2f} | {batched / single:.2f}x |")
    print(f"| one grade per item | {single:.2f} | 1.00x |")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
