"""Ray executor vs local executor: one eval of N items on a tiny model, items/s.

    .venv/bin/python benchmarks/executors.py                 # 200 items, a local Ray cluster of 2 CPUs
    .venv/bin/python benchmarks/executors.py --items 400 --num-cpus 4 --chunk 25

Builds a tiny random Llama (SmolLM2's tokenizer, varied greedy words) and an eval of N test items
graded by string_check, then runs it with the local executor and with `RayExecutor` (chunks of
`--chunk` samples as Ray tasks), each into a fresh SQLite store, in the order local, ray (cold:
the workers load the model), local, ray (warm: workers kept). `ray.init` is timed on its own.
Prints a markdown table with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=25)
    args = parser.parse_args()

    import ray

    from fleet import build_tiny
    from flywheel.executors import RayExecutor
    from flywheel.harness import run_eval
    from flywheel.spec import parse_eval_spec
    from flywheel.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny(tmp / "tiny")
        rows = [{"id": f"t{i}", "text": f"question {i} about my card", "label": "card_arrival", "split": "test"}
                for i in range(args.items)]
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = parse_eval_spec({
            "name": "bench", "dataset": {"path": "data.jsonl", "id_field": "id"}, "split": {"column": "split"},
            "input": [{"role": "user", "content": "{{item.text}}"}], "model": f"local:{model_dir}",
            "model_options": {"dtype": "fp32"}, "sampling": {"temperature": 0, "max_tokens": 8},
            "graders": [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                         "reference": "{{item.label}}", "operation": "ilike"}]}, source="bench.yaml", base_dir=tmp)
        started = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - started
        table = []
        try:
            for run, label in enumerate(["local", "ray (cold workers)", "local", "ray (warm workers)"]):
                executor = RayExecutor(chunk_size=args.chunk) if label.startswith("ray") else None
                with closing(Store.open(tmp / f"run{run}.db")) as store:
                    started = time.perf_counter()
                    result = run_eval(spec, store, split="test", executor=executor)
                    wall = time.perf_counter() - started
                assert result.n_samples == args.items and result.n_errors == 0, result
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                table.append((label, wall, args.items / wall, load))
                print(f"{label}: {wall:.1f} s, load average {load}", file=sys.stderr)
        finally:
            ray.shutdown()
    local = min(w for label, w, _, _ in table if label == "local")
    print(f"\n{args.items} items, tiny Llama (local:, fp32, max_tokens 8), Ray cluster of {args.num_cpus} CPUs "
          f"started here (ray.init {init_s:.1f} s, not counted), chunks of {args.chunk}\n")
    print("| executor | wall s | items/s | vs best local | load average |")
    print("|---|---|---|---|---|")
    for label, wall, rate, load in table:
        print(f"| {label} | {wall:.1f} | {rate:.1f} | {local / wall:.2f}x | {load} |")
    print(f"\n{os.cpu_count()} CPUs on this machine")


if __name__ == "__main__":
    main()
