"""int8 export vs the unquantised model: size on disk, tokens/s and paired accuracy, same items.

    .venv/bin/python benchmarks/export_int8.py                                   # base SmolLM2, eval prompt
    .venv/bin/python benchmarks/export_int8.py --model local:smollm2+.flywheel/ckpt/sft-... \\
        -s 'input=[{role: system, content: Banking intent label.}, {role: user, content: "{{item.text}}"}]'

`--model` (default `local:smollm2`) is exported three times with `flywheel.export.export_model`:
merged fp32, merged bf16, and merged int8 (torchao int8 weights; the `quantize` extra). Each folder
is then evaluated as `local:DIR` through the harness on the same first `--n` items of `--split` of
the BANKING77 demo eval (greedy, a fresh store per variant, so nothing comes from the cache):

* size: the folder's bytes (weights, tokenizer, config, card);
* tokens/s: completion tokens / wall seconds of the eval (render, prefill, decode, grade);
* accuracy and its paired comparison with the fp32 export (flywheel.stats.paired_stats: mean
  difference with a paired-bootstrap CI, McNemar's exact p), and how many outputs are identical.

`--variants` picks the rows (fp32 is always run: it is the baseline). `int8` runs with the
activation dtype Flywheel picks (bf16 on CPUs with AVX512-BF16/AMX, else fp32) unless
`--int8-dtype` says otherwise; `int8-fp32` always computes in fp32; `int8-bf16` is exported with
`--dtype bf16` (the embeddings, which stay unquantised, in bf16) and computes in bf16. The load average is printed with the table: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flywheel.export import export_model  # noqa: E402
from flywheel.harness import item_scores, run_eval  # noqa: E402
from flywheel.models import load_model  # noqa: E402
from flywheel.spec import load_eval_spec  # noqa: E402
from flywheel.stats import paired_stats  # noqa: E402
from flywheel.store import Store  # noqa: E402

VARIANTS = {  # name: (export options, model_options dtype)
    "fp32": ({"dtype": "fp32"}, "fp32"),
    "bf16": ({"dtype": "bf16"}, "bf16"),
    "int8": ({"dtype": "fp32", "quantize": "int8"}, None),
    "int8-fp32": ({"dtype": "fp32", "quantize": "int8"}, "fp32"),  # int8 weights, fp32 activations
    "int8-bf16": ({"dtype": "bf16", "quantize": "int8"}, "bf16"),  # int8 linears, bf16 embeddings and activations
}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(name: str, folder: Path, dtype: str | None, spec, split: str, n: int, batch_size: int, work: Path):
    """Evaluate local:folder on the first n items; returns a dict of the figures and per-item results."""
    store = Store.open(work / f"{name}.db")
    options = {"batch_size": batch_size, **({"dtype": dtype} if dtype else {})}
    model = load_model(f"local:{folder}", options)
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    torch_dtype = str(next(model.load()[0].parameters()).dtype).replace("torch.", "")
    torch_dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(torch_dtype, torch_dtype)
    result = run_eval(spec, store, split=split, limit=n, model=model, stage="bench")
    scores = item_scores(store, result.iteration_id, spec)
    outputs = {row.item_key: row.output_text for row in store.samples_with_grades(result.iteration_id,
                                                                                         details=False)}
    model.close()
    store.close()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"name": name, "size": size, "load_s": load_s, "wall_s": result.wall_s, "tokens": result.completion_tokens,
            "tps": result.completion_tokens / result.wall_s if result.wall_s else float("nan"),
            "accuracy": result.objective, "scores": scores, "outputs": outputs, "dtype": torch_dtype,
            "errors": result.n_errors, "load": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="local:smollm2")
    parser.add_argument("--eval", default=str(ROOT / "evals/banking77/eval.yaml"))
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="Eval spec override.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=100, help="Items (the first n of the split).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default="fp32,bf16,int8")
    parser.add_argument("--int8-dtype", choices=["fp32", "bf16"], default=None,
                        help="Activation dtype of the int8 model (default: Flywheel's pick for this machine).")
    parser.add_argument("--keep", type=Path, default=None, help="Write the exports here (default: a temp folder).")
    args = parser.parse_args()

    names = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    spec = load_eval_spec(args.eval, args.overrides)
    work = args.keep or Path(tempfile.mkdtemp(prefix="export-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model}, eval {spec.name}, {args.n} {args.split} items, batch {args.batch_size}; "
          f"load average at start {load_average()}", flush=True)
    rows = []
    try:
        for name in names:
            export_options, dtype = VARIANTS[name]
            if name == "int8" and args.int8_dtype:
                dtype = args.int8_dtype
            started = time.perf_counter()
            result = export_model(args.model, work / name, overwrite=True, **export_options)
            export_s = time.perf_counter() - started
            row = measure(name, Path(result.path), dtype, spec, args.split, args.n, args.batch_size, work)
            row["export_s"] = export_s
            rows.append(row)
            print(f"  {name}: exported in {export_s:.1f}s, {row['tokens']} tokens in {row['wall_s']:.1f}s, "
                  f"accuracy {row['accuracy']:.3f} (load {row['load']})", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    base = rows[0]
    keys = sorted(base["scores"])
    header = (f"{'variant':<10} {'weights/acts':<14} {'size MB':>8} {'x size':>7} {'load s':>7} {'tok/s':>7} {'x speed':>8} "
              f"{'accuracy':>9} {'diff vs fp32 [95% CI]':>24} {'McNemar p':>10} {'same output':>12}  load avg")
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        a = [float(base["scores"][k][1]) for k in keys]
        b = [float(row["scores"].get(k, (0.0, False))[1]) for k in keys]
        stats = paired_stats(a, b, [bool(x) for x in a], [bool(x) for x in b])
        same = sum(1 for k in base["outputs"] if row["outputs"].get(k) == base["outputs"][k])
        weights = "int8" if row["name"].startswith("int8") else row["dtype"]
        print(f"{row['name']:<10} {weights + '/' + row['dtype']:<14} {row['size'] / 1e6:>8.1f} {row['size'] / base['size']:>7.2f} "
              f"{row['load_s']:>7.1f} {row['tps']:>7.1f} {row['tps'] / base['tps']:>8.2f} "
              f"{row['accuracy']:>9.3f} {stats['diff']:>+8.3f} [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}] "
              f"{stats['p_mcnemar']:>10.3g} {same:>7}/{len(base['outputs']):<4}  {row['load']}")
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
