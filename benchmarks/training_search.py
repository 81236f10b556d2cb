"""A 6-trial Optuna search vs the default SFT config, within the same wall-clock budget.

    .venv/bin/python benchmarks/training_search.py                       # 80 train rows, 40 valid, 60 test
    .venv/bin/python benchmarks/training_search.py --steps 8 --trials 6 --json out.json

Both sides train LoRA SFT adapters on SmolLM2-135M (the embedded model) from the same BANKING77 rows
(the first `--train` train items of the demo, the reference label as the answer, the eval's prompt):

* default: `SFTSpec()` (lr 5e-4, r 16, alpha 32, batch 8) for `trials x steps` steps: one job
  that spends the budget on one configuration. Its wall time (training + the valid evaluation,
  what each trial spends too) is the budget B.
* search: `trials` trials of `steps` steps each, TPE over learning rate (log 1e-4..5e-3) and LoRA
  rank (8, 16, 32), MedianPruner fed by the training loss, `wall_s` = B (no trial starts once B is
  spent), every trial evaluated on valid, the winner chosen by the paired rule.

Then both winners are measured on test and paired item by item (McNemar exact). The load average is
printed beside every figure: the machine is shared, and wall time moves with it.
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
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def subset_eval(folder: Path, n_train: int, n_valid: int, n_test: int) -> Path:
    """The demo eval over the first rows of each split, written to `folder`."""
    keep = {"train": n_train, "valid": n_valid, "test": n_test}
    rows = [json.loads(line) for line in (DEMO / "data.jsonl").read_text(encoding="utf-8").splitlines() if line]
    chosen = []
    for row in rows:
        if keep.get(row["split"], 0) > 0:
            keep[row["split"]] -= 1
            chosen.append(row)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    spec = yaml.safe_load((DEMO / "eval.yaml").read_text(encoding="utf-8"))
    spec.pop("optimize", None)
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder / "eval.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=80, help="Train rows (SFT rows).")
    parser.add_argument("--valid", type=int, default=40, help="Valid items (each trial is scored on them).")
    parser.add_argument("--test", type=int, default=60, help="Test items (the two winners are paired on them).")
    parser.add_argument("--steps", type=int, default=8, help="Steps per trial; the default config gets trials x steps.")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()

    from flywheel.distill import capture
    from flywheel.harness import paired_comparison
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store
    from flywheel.train import SFTSpec, build_sft_set
    from flywheel.train.local import evaluate_checkpoint
    from flywheel.train.search import SearchSpec, run_search
    from flywheel.train.sft import train_sft

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = load_eval_spec(subset_eval(folder, args.train, args.valid, args.test))
        store = Store.open(folder / "bench.db")
        capture(spec, store, "reference:label")
        training_set = build_sft_set(spec, store)
        print(f"{len(training_set)} SFT rows, {args.valid} valid, {args.test} test; load {load()}", flush=True)

        started, load_before = time.perf_counter(), load()
        default = train_sft(spec, store, training_set, base=spec.model, splits=("valid",), quiet=True,
                            config=SFTSpec(max_steps=args.trials * args.steps, logging_steps=1))
        budget = time.perf_counter() - started  # training + the valid evaluation, as each trial spends
        [d_valid] = default.evals
        [d_test] = evaluate_checkpoint(spec, store, default.checkpoint, parent_ref=spec.model, splits=("test",))
        print(f"default: {default.metrics['steps']} steps, {budget:.0f}s, valid {d_valid.score:.3f}, "
              f"test {d_test.score:.3f}; load {load_before} -> {load()}", flush=True)

        search = SearchSpec(space={"learning_rate": {"low": 1e-4, "high": 5e-3, "log": True},
                                   "lora.r": {"choices": [8, 16, 32]}},
                            trials=args.trials, sampler="tpe", wall_s=budget, prune_warmup_steps=3)
        default_load = load_before + " -> " + load()
        result = run_search("sft", spec, store, training_set, search, base=spec.model,
                            config=SFTSpec(max_steps=args.steps, logging_steps=1), splits=("valid", "test"),
                            log=lambda line: print(line, flush=True))
        search_load = default_load.split(' -> ')[1] + ' -> ' + load()
        print("\n".join(result.summary_lines()))
        cmp = paired_comparison(store, spec, d_test.iteration_id, result.test.iteration_id) if result.test else None

        print("\n| side | trials | steps each | wall s | valid | test | load (1/5/15 min) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| default config | 1 | {default.metrics['steps']} | {budget:.0f} | {d_valid.score:.3f} | "
              f"{d_test.score:.3f} | {default_load} |")
        best = result.trials[result.best] if result.best is not None else None
        print(f"| {args.trials}-trial TPE search | {len(result.trials)} ({sum(t.state == 'pruned' for t in result.trials)}"
              f" pruned) | {args.steps} | {result.wall_s:.0f} (budget {budget:.0f}) | "
              f"{best.valid_score if best else float('nan'):.3f} | "
              f"{result.test.score if result.test else float('nan'):.3f} | {search_load} |")
        if cmp:
            print(f"\nsearch winner vs default on test: diff {cmp['diff']:+.3f} "
                  f"[{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}], McNemar p={cmp['p_mcnemar']:.3g} "
                  f"({cmp['improvements']} fixed, {cmp['regressions']} broken), n={cmp['n']}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "default": {"steps": default.metrics["steps"], "wall_s": budget, "valid": d_valid.score,
                            "test": d_test.score},
                "search": result.to_dict(), "test_paired": cmp, "load": search_load}, indent=2, default=str))
        store.close()


if __name__ == "__main__":
    main()
