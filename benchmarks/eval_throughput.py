"""Eval throughput: the harness vs a naive one-item-at-a-time `generate` loop, and a cached rerun.

    .venv/bin/python benchmarks/eval_throughput.py            # 200 items, 1,000 cached
    .venv/bin/python benchmarks/eval_throughput.py --items 50 --cached-items 200

Part 1 runs the same 200 BANKING77 demo test items through (a) a naive loop — chat template,
tokenize, `model.generate` with batch 1, decode — and (b) the harness (batched, length-sorted,
left-padded, shared prefix computed once, stored and graded) on a fresh store, with the same model,
prompt and greedy decoding, in interleaved chunks so both see the same machine load; it compares
items/s, new tokens/s and how many outputs agree. Part 2 evaluates 1,000 items once (filling the completion
cache), then times the identical command again as a user would run it: a new `flywheel eval`
process, wall clock from start to exit. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flywheel.data import load_dataset  # noqa: E402
from flywheel.grading import GraderSet
from flywheel.harness import evaluate, render_messages  # noqa: E402
from flywheel.models import load_model  # noqa: E402
from flywheel.prompt import Prompt  # noqa: E402
from flywheel.spec import load_eval_spec  # noqa: E402
from flywheel.store import Store  # noqa: E402

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"
CEILING_TOKENS_S = 1400  # DESIGN.md: bf16 compute ceiling of SmolLM2-135M on these 2 cores


def naive_loop(spec, items, model) -> tuple[float, int, list[str]]:
    """One request at a time, as a first script would do it."""
    import torch

    hf_model, tokenizer = model.load()
    outputs, new_tokens = [], 0
    started = time.perf_counter()
    for item in items:
        prompt = tokenizer.apply_chat_template(render_messages(spec.messages(), item), tokenize=False,
                                               add_generation_prompt=True)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = hf_model.generate(**encoded, max_new_tokens=spec.sampling.max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
                                    top_k=None)
        ids = out[0, encoded["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        new_tokens += len(ids)
        outputs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return time.perf_counter() - started, new_tokens, outputs


def cached_rerun(n_items: int, workdir: Path) -> tuple[float, float, int]:
    """First run of n items (fills the cache), then the same CLI command again; wall seconds."""
    rows = []
    with (ROOT.parent / "shared" / "data" / "banking77" / "test.csv").open(newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            rows.append({"id": f"t{index}", "text": row["text"], "label": row["category"], "split": "test"})
    rows = rows[:n_items]
    (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec_text = DEMO.read_text()
    (workdir / "eval.yaml").write_text(spec_text)
    command = [sys.executable, "-m", "flywheel", "eval", str(workdir / "eval.yaml"), "--db",
               str(workdir / "cached.db"), "--json"]
    timings, calls = [], []
    for _ in range(2):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
        timings.append(time.perf_counter() - started)
        calls.append(json.loads(done.stdout)["model_calls"])
    return timings[0], timings[1], calls[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=40, help="items per interleaved naive/harness chunk")
    parser.add_argument("--cached-items", type=int, default=1000, help="0 skips part 2")
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: the model's auto choice)")
    args = parser.parse_args()

    spec = load_eval_spec(DEMO)
    items = load_dataset(spec).split("test")[: args.items]  # the demo's test split has 200
    options = dict(spec.model_options, **({"dtype": args.dtype} if args.dtype else {}))
    model = load_model(spec.model, options)
    model.load()
    dtype = str(model._model.dtype).replace("torch.", "")

    # Interleaved chunks, so both paths see the same machine load (the 2 cores may be shared).
    naive_s = harness_s = 0.0
    naive_tokens = harness_tokens = 0
    naive_out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        grader_set = GraderSet(spec.graders)
        prompt = Prompt(messages=spec.messages())
        iteration = store.iteration_for(store.create_run(kind="bench"), 0, stage="bench")
        for start in range(0, len(items), args.chunk):
            seconds, tokens, outputs = naive_loop(spec, items[start:start + args.chunk], model)
            naive_s, naive_tokens = naive_s + seconds, naive_tokens + tokens
            naive_out += outputs
            started = time.perf_counter()
            outcome = evaluate(spec, store, iteration, items[: start + args.chunk], model, prompt, grader_set)
            harness_s += time.perf_counter() - started
            print(f"  {start + args.chunk} items: naive {naive_s:.1f}s, harness {harness_s:.1f}s", flush=True)
        harness_tokens = outcome.summary["completion_tokens"]
        samples = {s["item_key"]: s for s in store.samples_with_grades(iteration)}
        harness_out = [samples[i.key]["output_text"] for i in items]
        grader_set.close()

    agree = sum(a == b for a, b in zip(naive_out, harness_out))
    if args.cached_items:
        with tempfile.TemporaryDirectory() as tmp:
            first_s, rerun_s, rerun_calls = cached_rerun(args.cached_items, Path(tmp))

    n = len(items)
    print(f"\nSmolLM2-135M ({dtype}), {n} BANKING77 demo items, greedy, max_tokens {spec.sampling.max_tokens}\n")
    print("| path | wall s | items/s | new tokens/s | vs naive |")
    print("|---|---:|---:|---:|---:|")
    print(f"| naive loop (batch 1) | {naive_s:.1f} | {n / naive_s:.2f} | {naive_tokens / naive_s:.1f} | 1.00× |")
    print(f"| flywheel eval (batched) | {harness_s:.1f} | {n / harness_s:.2f} | {harness_tokens / harness_s:.1f} "
          f"| {naive_s / harness_s:.2f}× |")
    print(f"\nidentical outputs: {agree}/{n}; harness new tokens/s is "
          f"{100 * harness_tokens / harness_s / CEILING_TOKENS_S:.1f}% of the ~{CEILING_TOKENS_S} tokens/s ceiling")
    if args.cached_items:
        print(f"\n| cached rerun, {args.cached_items} items | wall s | model calls |")
        print("|---|---:|---:|")
        print(f"| first run (fills cache) | {first_s:.1f} | {args.cached_items} |")
        print(f"| same command again | {rerun_s:.2f} | {rerun_calls} |")


if __name__ == "__main__":
    main()
