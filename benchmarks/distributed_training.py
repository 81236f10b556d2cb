"""SFT on 2 CPU processes (`--launcher accelerate --num-processes 2 --cpu`) vs 1 process: tokens/s.

    .venv/bin/python benchmarks/distributed_training.py               # tiny Llama, 20 steps, global batch 8
    .venv/bin/python benchmarks/distributed_training.py --model local:smollm2 --steps 10
    .venv/bin/python benchmarks/distributed_training.py --model local:smollm2 --eval evals/banking77/eval.yaml \
        --train-rows 64 --epochs 1 --lr 1e-3         # 64 banking77 rows, 1 epoch, scored on all of valid

Captures the reference answers of an eval's train items (`flywheel capture --teacher
reference:label`), then trains the same SFT twice through the CLI, with the same global batch
(1 process x B vs 2 processes x B/2) and steps: locally, and under `accelerate launch` with 2 gloo
processes. Tokens/s is TRL's `num_tokens` (counted over all processes) over the trainer's runtime;
wall time includes starting the processes. Both checkpoints are evaluated on `valid` and compared
paired (the store's paired statistics). Prints a markdown table and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def flywheel(*args: str, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-m", "flywheel", *args, "--json"], capture_output=True, text=True,
                          env=env, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"flywheel {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local: model (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--eval", default=None, help="an eval spec whose data to use (default: a synthetic one)")
    parser.add_argument("--train-rows", type=int, default=64, help="with --eval: the first N train rows")
    parser.add_argument("--valid-rows", type=int, default=None, help="with --eval: the first N valid rows (all)")
    parser.add_argument("--epochs", type=float, default=None, help="train epochs instead of --steps")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    import yaml

    from fleet import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or f"local:{build_tiny(tmp / 'tiny')}"
        labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "pin_blocked"]
        rows = [{"id": f"{split}-{i}", "text": f"question {i} about {labels[i % 4].replace('_', ' ')}",
                 "label": labels[i % 4], "split": split} for split in ("train", "valid") for i in range(32)]
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "eval.yaml").write_text(yaml.safe_dump({
            "name": "bench", "dataset": {"path": "data.jsonl", "id_field": "id"}, "split": {"column": "split"},
            "input": [{"role": "system", "content": "Answer with one label: " + ", ".join(labels)},
                      {"role": "user", "content": "{{item.text}}"}],
            "model": model, "model_options": {"dtype": "fp32"}, "sampling": {"temperature": 0, "max_tokens": 8},
            "graders": [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                         "reference": "{{item.label}}", "operation": "ilike"}]}))
        if args.eval:
            _subset_eval(Path(args.eval), tmp, model, args.train_rows, args.valid_rows)
        db = str(tmp / "flywheel.db")
        flywheel("capture", "eval.yaml", "--teacher", "reference:label", "--db", db, cwd=tmp)
        length = f"epochs={args.epochs}" if args.epochs else f"max_steps={args.steps}"
        common = ["train", "sft", "eval.yaml", "--base", model, "-s", length, "-s",
                  "precision=fp32", "-s", f"learning_rate={args.lr}", "-s", "logging_steps=1", "--split", "valid",
                  "--db", db]
        runs = {}
        for label, extra in [("1 process", ["-s", f"batch_size={args.batch}"]),
                             ("2 processes (accelerate, gloo)", ["-s", f"batch_size={args.batch // 2}",
                                                                 "--launcher", "accelerate", "--num-processes",
                                                                 "2", "--cpu"])]:
            started = time.perf_counter()
            result = flywheel(*common, *extra, cwd=tmp)
            wall = time.perf_counter() - started
            with sqlite3.connect(db) as conn:
                logged = [json.loads(r[0]) for r in conn.execute(
                    "select data_json from training_events where job_id = ? and type = 'metrics'",
                    (result["job_id"],))]
            tokens = max((d.get("num_tokens") or 0 for d in logged), default=0)
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            runs[label] = (result, wall, tokens, load)
            print(f"{label}: {wall:.1f} s wall, load average {load}", file=sys.stderr)
        from contextlib import closing

        from flywheel.harness import paired_comparison
        from flywheel.spec import load_eval_spec
        from flywheel.store import Store

        spec = load_eval_spec(tmp / "eval.yaml")
        valid_ids = [_valid(r)["iteration_id"] for r, *_ in runs.values()]
        with closing(Store.open(db)) as store:
            paired = paired_comparison(store, spec, valid_ids[0], valid_ids[1])

    length = f"{args.epochs} epoch(s)" if args.epochs else f"{args.steps} steps"
    data = f"{args.eval} ({args.train_rows} train rows)" if args.eval else "synthetic rows"
    print(f"\nSFT, {length}, global batch {args.batch}, lr {args.lr}, model {args.model or 'tiny random Llama'}, "
          f"data {data}, {os.cpu_count()} CPUs\n")
    print("| run | processes | trainer s | tokens | tokens/s | wall s (with start-up) | first -> last loss "
          "| valid score | load average |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (result, wall, tokens, load) in runs.items():
        m = result["metrics"]
        runtime = m.get("runtime_s") or m["wall_s"]
        valid = _valid(result)
        print(f"| {label} | {m.get('processes')} | {runtime:.1f} | {tokens:.0f} | {tokens / runtime:.0f} | "
              f"{wall:.1f} | {m['first_loss']:.3f} -> {m['last_loss']:.3f} | {valid['score']:.3f} | {load} |")
    print(f"\npaired on valid (2 processes - 1 process): {json.dumps(paired, default=str)[:400]}")


def _subset_eval(source: Path, tmp: Path, model: str, train_rows: int, valid_rows: int | None) -> None:
    """tmp/eval.yaml: `source`'s spec on its first train (and valid) rows, with `model`, no prompt search."""
    import yaml

    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(source)
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in spec.dataset_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    column = spec.split.column
    train = [r for r in rows if r[column] == "train"][:train_rows]
    valid = [r for r in rows if r[column] == "valid"][:valid_rows]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + valid))
    raw["dataset"] = {**raw["dataset"], "path": "data.jsonl"}
    raw.pop("optimize", None)
    raw["model"] = model
    (tmp / "eval.yaml").write_text(yaml.safe_dump(raw))


def _valid(result: dict) -> dict:
    return next(e for e in result["evals"] if e["split"] == "valid")


if __name__ == "__main__":
    main()
