"""Eval throughput: the harness (two decoders) vs a naive one-item-at-a-time `generate` loop, and a cached rerun.

    .venv/bin/python benchmarks/eval_throughput.py            # 200 items, 1,000 cached
    .venv/bin/python benchmarks/eval_throughput.py --items 50 --cached-items 200
    .venv/bin/python benchmarks/eval_throughput.py --naive-items 0 --cached-items 0 --chunk 200 --repeats 3

Part 1 runs the same 200 BANKING77 demo test items through (a) a naive loop — chat template,
tokenize, `model.generate` with batch 1, decode — (b) the harness with `decoder: hf` (one
transformers `generate` call per length-sorted batch of 32, shared prefix computed once) and (c)
the harness with the default `decoder: continuous` (flywheel.models.decoding: one running batch
that requests join and leave), each harness path on its own fresh store, with the same model,
prompt and greedy decoding, in interleaved chunks so all see the same machine load; it compares
items/s, new tokens/s, process CPU seconds (less sensitive than wall time to other jobs on the
machine) and how many outputs agree. `--repeats` runs the harness paths again (fresh stores) and
reports medians. Part 2 evaluates 1,000 items once (filling the completion
cache), then times the identical command again as a user would run it: a new `flywheel eval`
process, wall clock from start to exit. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flywheel.data import load_dataset  # noqa: E402
from flywheel.grading import GraderSet  # noqa: E402
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


def harness_pass(spec, items, model, chunk: int, label: str):
    """Evaluate `items` in cumulative chunks on a fresh store; (wall s, cpu s, new tokens, outputs)."""
    wall = cpu = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        grader_set = GraderSet(spec.graders)
        prompt = Prompt(messages=spec.messages())
        iteration = store.iteration_for(store.create_run(kind="bench"), 0, stage="bench")
        for start in range(0, len(items), chunk):
            started, cpu_started = time.perf_counter(), time.process_time()
            outcome = evaluate(spec, store, iteration, items[: start + chunk], model, prompt, grader_set)
            wall += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
        tokens = outcome.summary.completion_tokens
        samples = {s["item_key"]: s for s in store.samples_with_grades(iteration)}
        outputs = [samples[i.key]["output_text"] for i in items]
        grader_set.close()
        store.close()
    print(f"  {label}: {wall:.1f}s wall, {cpu:.1f}s cpu, {tokens / wall:.0f} new tokens/s", flush=True)
    return wall, cpu, tokens, outputs


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=40, help="items per interleaved chunk")
    parser.add_argument("--naive-items", type=int, default=None,
                        help="items for the naive loop (default: all; 0 skips)")
    parser.add_argument("--repeats", type=int, default=1, help="harness passes per decoder (medians reported)")
    parser.add_argument("--cached-items", type=int, default=1000, help="0 skips part 2")
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: the model's auto choice)")
    args = parser.parse_args()

    spec = load_eval_spec(DEMO)
    items = load_dataset(spec).split("test")[: args.items]  # the demo's test split has 200
    options = dict(spec.model_options, **({"dtype": args.dtype} if args.dtype else {}))
    models = {"continuous": load_model(spec.model, dict(options, decoder="continuous")),
              "hf": load_model(spec.model, dict(options, decoder="hf"))}
    models["continuous"].load()
    models["hf"]._model, models["hf"]._tokenizer = models["continuous"].load()  # one copy of the weights
    dtype = str(models["hf"]._model.dtype).replace("torch.", "")
    loads = [load_average()]

    n_naive = len(items) if args.naive_items is None else args.naive_items
    naive_s = 0.0
    naive_tokens = 0
    naive_out: list[str] = []
    for start in range(0, n_naive, args.chunk):
        seconds, tokens, outputs = naive_loop(spec, items[start:min(start + args.chunk, n_naive)], models["hf"])
        naive_s, naive_tokens = naive_s + seconds, naive_tokens + tokens
        naive_out += outputs
        print(f"  naive: {start + len(outputs)} items, {naive_s:.1f}s", flush=True)

    runs: dict[str, list[tuple[float, float, int]]] = {"hf": [], "continuous": []}
    outputs: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for name in ("hf", "continuous") if repeat % 2 == 0 else ("continuous", "hf"):
            wall, cpu, tokens, outputs[name] = harness_pass(spec, items, models[name], args.chunk, name)
            runs[name].append((wall, cpu, tokens))
            loads.append(load_average())

    if args.cached_items:
        with tempfile.TemporaryDirectory() as tmp:
            first_s, rerun_s, rerun_calls = cached_rerun(args.cached_items, Path(tmp))

    n = len(items)
    print(f"\nSmolLM2-135M ({dtype}), {n} BANKING77 demo items, greedy, max_tokens {spec.sampling.max_tokens}, "
          f"{torch_threads()} torch threads; load averages during the run: {', '.join(loads)}\n")
    print("| path | wall s | cpu s | items/s | new tokens/s | % of ceiling | vs hf decoder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    if n_naive:
        print(f"| naive loop (batch 1), {n_naive} items | {naive_s:.1f} | | {n_naive / naive_s:.2f} | "
              f"{naive_tokens / naive_s:.1f} | {100 * naive_tokens / naive_s / CEILING_TOKENS_S:.1f}% | |")
    base = statistics.median(r[0] for r in runs["hf"])
    for name, label in (("hf", "harness, decoder hf (generate per batch)"),
                        ("continuous", "harness, decoder continuous (default)")):
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        tokens = runs[name][0][2]
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {n / wall:.2f} | {tokens / wall:.1f} | "
              f"{100 * tokens / wall / CEILING_TOKENS_S:.1f}% | {base / wall:.2f}× |")
    agree = sum(a == b for a, b in zip(outputs["hf"], outputs["continuous"]))
    print(f"\nidentical outputs, continuous vs hf decoder: {agree}/{n}")
    if n_naive:
        agree = sum(a == b for a, b in zip(naive_out, outputs["continuous"]))
        print(f"identical outputs, continuous vs naive loop: {agree}/{n_naive}")
    if args.repeats > 1:
        for name in runs:
            print(f"{name} wall s per pass: {', '.join(f'{r[0]:.1f}' for r in runs[name])}")
    if args.cached_items:
        print(f"\n| cached rerun, {args.cached_items} items | wall s | model calls |")
        print("|---|---:|---:|")
        print(f"| first run (fills cache) | {first_s:.1f} | {args.cached_items} |")
        print(f"| same command again | {rerun_s:.2f} | {rerun_calls} |")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
