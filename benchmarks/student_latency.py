"""A LoRA student against its base model on the same prompts: CPU time and latency per request.

    PYTHONPATH=. .venv/bin/python benchmarks/student_latency.py .flywheel/ckpt/sft-...   # the demo's student
    PYTHONPATH=. .venv/bin/python benchmarks/student_latency.py CKPT --items 100 --rounds 1

Evaluates the demo's first test items with the demo student's one-line prompt ("Banking intent
label.") through three models in one process, interleaved per round: the base (`local:smollm2`), the
student as loaded now (`models.loading.load_for_inference`: merged, frozen, the output head fed a
contiguous input), and the student as it was loaded before (merged by `load_adapters` only, so its
frozen head met a strided input: torch expanded the head per row). Prints CPU seconds, new tokens
and the mean/median per-request latency of each, and the ratio to the base; CPU seconds are the
figure to read on a shared machine.

    PYTHONPATH=. .venv/bin/python benchmarks/student_latency.py CKPT --db /tmp/perf-demo.db \
        --teacher-prompt p-257326cb7527 --row-caps 256,128,64,32

With `--row-caps`, instead: the running batch's row cap (`models.local.RUNNING_BATCH_FACTOR` ×
batch_size) against per-request latency and throughput, both sides in one process and interleaved
per round: the student (its prompt) and the teacher (the base with the run's best prompt, read
from `--db`) at each cap. Prints each side's wall, CPU and mean/median latency per cap (medians over
rounds), the student's latency as a fraction of the teacher's at the same cap, and CPU seconds
against the current default cap (throughput: CPU seconds are what a loaded machine does not blur).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flywheel.data import load_dataset  # noqa: E402
from flywheel.models import ChatRequest, Sampling, load_model  # noqa: E402
from flywheel.models.loading import load_adapters, load_base, pick_device  # noqa: E402
from flywheel.spec import load_eval_spec  # noqa: E402

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a LoRA adapter folder trained on local:smollm2 (the demo's sft checkpoint)")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--row-caps", help="comma-separated running-batch row caps (multiples of batch_size)")
    parser.add_argument("--db", help="the demo run's store, for --teacher-prompt")
    parser.add_argument("--teacher-prompt", help="the id of the run's best prompt in --db")
    args = parser.parse_args()
    spec = load_eval_spec(DEMO)
    items = load_dataset(spec).split("test")[: args.items]
    requests = [ChatRequest([{"role": "system", "content": "Banking intent label."},
                             {"role": "user", "content": item.fields["text"]}],
                            Sampling(max_tokens=spec.sampling.max_tokens)) for item in items]
    if args.row_caps:
        if not (args.db and args.teacher_prompt):
            parser.error("--row-caps needs --db and --teacher-prompt")
        row_caps(args, spec, items, requests)
        return
    models = {"base": load_model(spec.model, spec.model_options),
              "student (now)": load_model(f"{spec.model}+{args.checkpoint}", spec.model_options),
              "student (before)": load_model(f"{spec.model}+{args.checkpoint}", spec.model_options)}
    old = models["student (before)"]
    model, tokenizer = load_base(old.weights, dtype=old.dtype_name)  # the load as it was
    model = load_adapters(old.weights, model)
    model.to(pick_device(old.device_name)).eval()
    tokenizer.padding_side = "left"
    old._model, old._tokenizer = model, tokenizer
    runs: dict[str, list[tuple[float, float, float, float, float]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            started, cpu = time.perf_counter(), time.process_time()
            out = m.generate(requests)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            latencies = [c.latency_s for c in out]
            runs[name].append((wall, cpu, sum(c.completion_tokens for c in out) / len(out),
                               statistics.mean(latencies), statistics.median(latencies)))
            print(f"  {name}: {wall:.1f}s wall, {cpu:.1f}s cpu", flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n{len(items)} BANKING77 test items, the student's prompt, greedy; load average {load}\n")
    print("| model | cpu s | wall s | new tokens/item | latency mean s | latency median s | cpu vs base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_cpu = statistics.median(r[1] for r in runs["base"])
    for name, rows in runs.items():
        wall, cpu = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {rows[0][2]:.1f} | {statistics.median(r[3] for r in rows):.2f} | "
              f"{statistics.median(r[4] for r in rows):.2f} | {cpu / base_cpu:.2f}× |")


def row_caps(args, spec, items, student_requests) -> None:
    """Student and teacher at each running-batch row cap, interleaved per round; prints one table."""
    import flywheel.models.local as local
    from flywheel.prompt import Prompt
    from flywheel.store import Store

    prompt = Prompt.from_json(Store.open(args.db).get_prompt(args.teacher_prompt))
    teacher_requests = [ChatRequest(messages, Sampling(max_tokens=spec.sampling.max_tokens))
                        for messages in prompt.render_many(items)]
    sides = {"teacher (best prompt)": (load_model(spec.model, spec.model_options), teacher_requests),
             "student": (load_model(f"{spec.model}+{args.checkpoint}", spec.model_options), student_requests)}
    for model, requests in sides.values():
        model.generate(requests[:8])  # load and warm up outside the timings
    batch_size = sides["student"][0].batch_size
    caps = [int(c) for c in args.row_caps.split(",")]
    default = local.RUNNING_BATCH_FACTOR * batch_size
    runs: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
    for _ in range(args.rounds):
        for cap in caps:
            local.RUNNING_BATCH_FACTOR = max(1, cap // batch_size)
            for name, (model, requests) in sides.items():
                started, cpu = time.perf_counter(), time.process_time()
                out = model.generate(requests)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                latencies = [c.latency_s for c in out]
                runs.setdefault((name, cap), []).append(
                    (wall, cpu, sum(c.prompt_tokens for c in out) / len(out), statistics.mean(latencies),
                     statistics.median(latencies)))
                print(f"  cap {cap} {name}: {wall:.1f}s wall, {cpu:.1f}s cpu, latency {statistics.mean(latencies):.2f}s",
                      flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n{len(items)} BANKING77 test items, greedy, batch_size {batch_size}, {args.rounds} round(s), medians; "
          f"load average {load}\n")
    print("| side | row cap | prompt tokens/item | wall s | cpu s | latency mean s | latency median s | "
          f"student/teacher latency, same cap | cpu s vs cap {default} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    for name in sides:
        for cap in caps:
            rows = runs[(name, cap)]
            ratio = f"{med(rows, 3) / med(runs[('teacher (best prompt)', cap)], 3):.2f}" if name == "student" else ""
            base = runs.get((name, default), rows)
            print(f"| {name} | {cap} | {rows[0][2]:.0f} | {med(rows, 0):.1f} | {med(rows, 1):.1f} | "
                  f"{med(rows, 3):.2f} | {med(rows, 4):.2f} | {ratio} | {med(rows, 1) / med(base, 1):.2f}× |")

if __name__ == "__main__":
    main()
