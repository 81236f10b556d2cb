"""Grader throughput, each figure against a baseline measured in the same run.

    .venv/bin/python benchmarks/graders.py            # the full run (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/graders.py --quick    # smaller counts

Rows:
* string_check / fuzzy_match / bleu / rouge_l: grades/s through `grade_batch` (templates, Grade
  objects and all) vs the bare library call on the same pairs (the overhead ratio);
* cosine: 1,000 pairs graded in one `grade_batch` (one embedding call) vs one `grade` per pair;
* python: grades/s with reused sandbox workers vs a new worker process per grade.

Pairs are BANKING77 queries (2,000 distinct sentences from ../shared/data/banking77 when present,
else the demo eval's 700). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graders  # noqa: E402
from graders import text_similarity as ts  # noqa: E402


def load_sentences(n: int) -> list[tuple[str, str]]:
    """(text, label) rows, distinct texts, deterministic order."""
    shared = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
    rows: list[tuple[str, str]] = []
    if shared.is_file():
        with shared.open(newline="", encoding="utf-8") as f:
            rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    else:
        with (ROOT / "evals" / "banking77" / "data.jsonl").open(encoding="utf-8") as f:
            rows = [(d["text"].strip(), d["label"]) for d in map(json.loads, f)]
    seen, out = set(), []
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out[:n]


def rate(fn, count: int, repeat: int = 3) -> float:
    """Best of `repeat` runs, in items per second."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def text_grader(metric: str):
    return graders.build_grader({"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
                                 "reference": "{{item.reference}}", "evaluation_metric": metric, "pass_threshold": 0.5})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    n_string = 20_000 if args.quick else 200_000
    n_text = 2_000 if args.quick else 10_000
    n_cos = 200 if args.quick else 1_000
    n_py = 100 if args.quick else 500
    n_py_fresh = 10 if args.quick else 40

    sentences = load_sentences(2 * max(n_cos, 1000))
    half = len(sentences) // 2
    pairs = [(sentences[i][0], sentences[half + i][0]) for i in range(half)]
    rows: list[tuple[str, str, str, str]] = []

    # string_check
    g = graders.build_grader({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                              "reference": "{{item.label}}", "operation": "ilike"})
    samples = [graders.make_sample(f"The intent is {label}" if i % 2 else text) for i, (text, label) in
               enumerate(sentences[i % len(sentences)] for i in range(n_string))]
    items = [{"label": sentences[i % len(sentences)][1]} for i in range(n_string)]
    ours = rate(lambda: g.grade_batch(samples, items), n_string)
    texts = [s["output_text"] for s in samples]
    labels = [it["label"] for it in items]
    bare = rate(lambda: [b.casefold() in a.casefold() for a, b in zip(texts, labels)], n_string)
    rows.append(("string_check (ilike)", f"{ours:,.0f} grades/s", f"bare `in` + casefold: {bare:,.0f}/s",
                 f"goal ≥ 200,000/s: {'met' if ours >= 200_000 else 'NOT met'}"))

    # fuzzy_match / bleu / rouge_l
    text_pairs = [pairs[i % len(pairs)] for i in range(n_text)]
    t_samples = [graders.make_sample(a) for a, _ in text_pairs]
    t_items = [{"reference": b} for _, b in text_pairs]
    for metric in ("fuzzy_match", "bleu", "rouge_l"):
        g = text_grader(metric)
        g.grade_batch(t_samples[:10], t_items[:10])  # warm up (imports)
        ours = rate(lambda: g.grade_batch(t_samples, t_items), n_text)
        fn = ts.METRICS[metric]
        bare = rate(lambda: [fn(a, b) for a, b in text_pairs], n_text)
        rows.append((metric, f"{ours:,.0f} grades/s", f"bare library call: {bare:,.0f}/s",
                     f"goal ≥ 5,000/s: {'met' if ours >= 5_000 else 'NOT met'}"))

    # cosine: batched vs one at a time, same pairs, each with its own uncached embedder
    from graders.embeddings import SentenceTransformerEmbedder

    cos_pairs = pairs[:n_cos]
    c_samples = [graders.make_sample(a) for a, _ in cos_pairs]
    c_items = [{"reference": b} for _, b in cos_pairs]
    timings = {}
    scores = {}
    for label, dtype, batched in (("batched", "float32", True), ("single", "float32", False),
                                  ("batched-bf16", "bfloat16", True)):
        embedder = SentenceTransformerEmbedder(dtype=dtype, cache_size=0)
        embedder.embed(["warm up the model"])
        g = graders.build_grader({"type": "text_similarity", "name": "cos", "input": "{{sample.output_text}}",
                                  "reference": "{{item.reference}}", "evaluation_metric": "cosine"}, embedder=embedder)
        start = time.perf_counter()
        if batched:
            grades = g.grade_batch(c_samples, c_items)
        else:
            grades = [g.grade(s, i) for s, i in zip(c_samples, c_items)]
        timings[label] = time.perf_counter() - start
        scores[label] = [x.score for x in grades]
    n = len(cos_pairs)
    agree = max(abs(a - b) for a, b in zip(scores["batched"], scores["single"]))
    bf16_delta = max(abs(a - b) for a, b in zip(scores["batched"], scores["batched-bf16"]))
    ratio = timings["single"] / timings["batched"]
    rows.append((f"cosine, {n:,} pairs (fp32)", f"batched {timings['batched']:.1f} s ({n / timings['batched']:,.0f} pairs/s)",
                 f"one at a time {timings['single']:.1f} s ({n / timings['single']:,.0f} pairs/s)",
                 f"{ratio:.1f}× (goal ≥ 10×: {'met' if ratio >= 10 else 'NOT met'}); max |Δscore| {agree:.1e}"))
    rows.append((f"cosine, {n:,} pairs (bf16 autocast)", f"batched {timings['batched-bf16']:.1f} s "
                 f"({n / timings['batched-bf16']:,.0f} pairs/s)", f"fp32 one at a time: {timings['single']:.1f} s",
                 f"{timings['single'] / timings['batched-bf16']:.1f}×; max |Δscore| vs fp32 {bf16_delta:.1e}"))

    # python: reused workers vs a new process per grade
    source = "def grade(sample, item):\n    return float(item['label'] in sample['output_text'])\n"
    cfg = {"type": "python", "name": "py", "source": source}
    py_items = [{"label": label} for _, label in sentences[:n_py]]
    py_samples = [graders.make_sample(text) for text, _ in sentences[:n_py]]
    with graders.build_grader(cfg, sandbox=graders.SandboxLimits(workers=1)) as g:
        g.grade(py_samples[0], py_items[0])  # start the worker
        start = time.perf_counter()
        for s, i in zip(py_samples, py_items):
            g.grade(s, i)
        reused = n_py / (time.perf_counter() - start)
    with graders.build_grader(cfg, sandbox=graders.SandboxLimits(workers=1, reuse_workers=False)) as g:
        start = time.perf_counter()
        for s, i in zip(py_samples[:n_py_fresh], py_items[:n_py_fresh]):
            g.grade(s, i)
        fresh = n_py_fresh / (time.perf_counter() - start)
    with graders.build_grader(cfg, sandbox=graders.SandboxLimits(workers=2)) as g:
        g.grade_batch(py_samples[:4], py_items[:4])
        two = rate(lambda: g.grade_batch(py_samples, py_items), n_py, repeat=1)
    rows.append(("python (sandboxed)", f"reused worker {reused:,.0f} grades/s",
                 f"new process per grade {fresh:,.1f}/s",
                 f"{reused / fresh:.0f}×; 2 workers, grade_batch: {two:,.0f}/s (goal ≥ 200/s: {'met' if reused >= 200 else 'NOT met'})"))

    print(f"graders benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {len(sentences):,} distinct BANKING77 sentences\n")
    print("| grader | ours | baseline (same run) | ratio / goal |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
