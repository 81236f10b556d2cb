"""Validation during training on a small BANKING77 run with the embedded SmolLM2: what it costs, and
what choosing the best checkpoint by the graders buys over keeping the last one.

    .venv/bin/python benchmarks/training_validation.py            # 64 train rows, 24 steps, a checkpoint every 4
    .venv/bin/python benchmarks/training_validation.py --steps 12 --save-every 3

The demo's data is cut to a few dozen rows per split (the first N of each, in file order) and
written beside a copy of its eval. Training rows are the train items answered by their label
(`capture --teacher reference:label`), rendered with the eval's prompt. In one process, same rows,
same seed and steps:

1. `plain`: SFT without validation (the default settings; one adapter at the end);
2. `validated`: the same SFT with `eval_steps` = `save_steps` = N, the valid loss on the valid
   split (answered by the objective grader's reference, `{{item.label}}`), and at each checkpoint
   the graders' score on the first `--subset` valid items (greedy generation through the harness).

Printed: training wall time of each (and the ratio), then the best checkpoint (chosen by the valid
score on the subset, ties to the valid loss) against the last checkpoint of the same job, both
evaluated on the whole valid and test splits, paired (mean difference, 95% bootstrap CI, McNemar).
The subset the best was chosen on is part of `valid`, so only `test` is an unbiased comparison.
Load average is printed beside every timing: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "evals" / "banking77"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def small_eval(folder: Path, sizes: dict[str, int]) -> Path:
    """A copy of the demo's eval over the first `sizes[split]` rows of each split."""
    kept, counts = [], {k: 0 for k in sizes}
    for line in (DEMO / "data.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if counts.get(row["split"], 10**9) < sizes.get(row["split"], 0):
            counts[row["split"]] += 1
            kept.append(line)
    (folder / "data.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    spec = yaml.safe_load((DEMO / "eval.yaml").read_text(encoding="utf-8"))
    spec.pop("optimize", None)
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder / "eval.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=64)
    parser.add_argument("--valid-rows", type=int, default=40)
    parser.add_argument("--test-rows", type=int, default=60)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--subset", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from flywheel.distill import capture
    from flywheel.harness import item_scores
    from flywheel.models.loading import materialise_embedded
    from flywheel.spec import load_eval_spec
    from flywheel.stats import paired_stats
    from flywheel.store import Store
    from flywheel.train import SFTSpec, build_sft_set, load_checkpoint
    from flywheel.train.local import evaluate_checkpoint
    from flywheel.train.sft import train_sft

    materialise_embedded("smollm2")  # the first load converts the GGUF: not part of any timing
    folder = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    spec = load_eval_spec(small_eval(folder, {"train": args.train_rows, "valid": args.valid_rows,
                                              "test": args.test_rows}))
    store = Store.open(folder / "bench.db")
    capture(spec, store, "reference:label")
    training_set = build_sft_set(spec, store)
    common = dict(max_steps=args.steps, learning_rate=args.lr, batch_size=8, logging_steps=1, seed=0)
    configs = {
        "plain": SFTSpec(**common),
        "validated": SFTSpec(**common, eval_steps=args.save_every, save_steps=args.save_every,
                             valid_subset=args.subset, keep="all"),
    }
    results, timing = {}, {}
    for name, config in configs.items():
        before = load()
        started = time.perf_counter()
        results[name] = train_sft(spec, store, training_set, base="local:smollm2", config=config, evaluate=False,
                                  quiet=True)
        timing[name] = (time.perf_counter() - started, results[name].metrics["wall_s"], before, load())
    print(f"\nSFT on {len(training_set)} BANKING77 rows, {args.steps} steps of 8, SmolLM2-135M, "
          f"checkpoint every {args.save_every} steps, valid subset {args.subset} of {args.valid_rows}\n")
    print(f"{'run':<11} {'total s':>8} {'trainer s':>10} {'load before':>16} {'load after':>16}")
    for name, (total, trainer, before, after) in timing.items():
        print(f"{name:<11} {total:8.1f} {trainer:10.1f} {before:>16} {after:>16}")
    print(f"validation overhead: x{timing['validated'][0] / timing['plain'][0]:.2f} total wall time "
          f"(trainer loop incl. valid loss and scoring: x{timing['validated'][1] / timing['plain'][1]:.2f})\n")

    validated = results["validated"]
    print(f"{'checkpoint':<28} {'step':>5} {'train loss':>11} {'valid loss':>11} {'valid score':>12}")
    for c in validated.checkpoints:
        score = f"{c['valid_score']:.3f}" if c["valid_score"] is not None else "-"
        loss = f"{c['valid_loss']:.4f}" if c["valid_loss"] is not None else "-"
        print(f"{c['id']:<28} {c['step']:>5} {c['train_loss'] or float('nan'):11.4f} {loss:>11} {score:>12}"
              + ("  <- best" if c["best"] else ""))
    print(f"best: {validated.best_reason}\n")

    best = validated.checkpoint
    last = load_checkpoint(store, validated.checkpoints[-1]["id"])
    if best.id == last.id:
        print("the best checkpoint is the last one: nothing to compare")
        return
    print(f"{'split':<6} {'n':>4} {'base':>7} {'last':>7} {'best':>7} {'diff':>8} {'95% CI':>18} {'McNemar p':>10} {'load':>16}")
    for split in ("valid", "test"):
        [e_last] = evaluate_checkpoint(spec, store, last, parent_ref=spec.model, splits=(split,))
        [e_best] = evaluate_checkpoint(spec, store, best, parent_ref=spec.model, splits=(split,))
        a, b = item_scores(store, e_last.iteration_id, spec), item_scores(store, e_best.iteration_id, spec)
        keys = sorted(set(a) & set(b))
        stats = paired_stats([float(a[k][1]) for k in keys], [float(b[k][1]) for k in keys],
                             [a[k][1] for k in keys], [b[k][1] for k in keys])
        print(f"{split:<6} {stats['n']:>4} {e_last.parent_score:7.3f} {stats['mean_a']:7.3f} {stats['mean_b']:7.3f} {stats['diff']:+8.3f} "
              f"[{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}] {stats['p_mcnemar']:10.3g} {load():>16}")
    store.close()


if __name__ == "__main__":
    main()
