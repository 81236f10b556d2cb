"""Eval throughput: the harness (two decoders) vs a naive one-item-at-a-time `generate` loop, and a cached rerun.

    .venv/bin/python benchmarks/eval_throughput.py            # 200 items, 1,000 cached
    .venv/bin/python benchmarks/eval_throughput.py --items 50 --cached-items 200
    .venv/bin/python benchmarks/eval_throughput.py --naive-items 0 --cached-items 0 --chunk 200 --repeats 3

Part 1 runs the same 200 BANKING77 demo test items through (a) a naive loop — chat template,
tokenize, `model.generate` with batch 1, decode — (b) the harness with `engine: hf` (one
transformers `generate` call per length-sorted batch of 32, shared prefix computed once) and (c)
the harness with the default `engine: continuous` (flywheel.models.decoding: one running batch
that requests join and leave), each harness path on its own fresh store, with the same model,
prompt and greedy decoding, in interleaved chunks so all see the same machine load; it compares
items/s, new tokens/s, process CPU seconds (less sensitive than wall time to other jobs on the
machine) and how many outputs agree. `--repeats` runs the harness paths again (fresh stores) and
reports medians. A "peak RSS" column gives each path's memory: a harness pass's peak resident set of
this process (reset before the pass, weights included), a whole process's own peak (`wait4`). Part 2 evaluates 1,000 items once (filling the completion
cache), then times the identical command again as a user would run it: a new `flywheel eval`
process, wall clock from start to exit. Prints a markdown table.

`--lm-eval PYTHON` adds lm-evaluation-harness, run by PYTHON (a scratch venv's python, made by
benchmarks/lm_eval_venv.sh; lm_eval is no dependency of this project) on the same items, weights
(the folder the embedded model is materialised to in that dtype), dtype, rendered prompt (the spec's system
message as `--system_instruction`, its rendered user message as the doc text, the model's chat
template), greedy decoding, max tokens and batch size: a `generate_until` task written to a temp
dir over a local jsonl, offline. Per repeat it times two whole processes from start to exit, in
alternating order: `python -m lm_eval ...` and `python -m flywheel eval` on a fresh store. The
lm-eval process runs through a small wrapper that times `HFLM.generate_until` (its generation
phase) and counts new tokens in `HFLM._model_generate`'s output, then runs lm_eval's `__main__`
as `-m` does. Adds rows and a "vs lm-eval" column to the table, and says how many lm-eval
prompts and outputs equal the harness's.

    .venv/bin/python benchmarks/eval_throughput.py --lm-eval /work/bench/lmeval-venv/bin/python \
        --naive-items 0 --cached-items 0 --chunk 200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
from flywheel.models.loading import pick_dtype  # noqa: E402
from flywheel.models.memory import peak_rss_bytes, release_memory, reset_peak_rss  # noqa: E402

sys.path.insert(1, str(ROOT / "benchmarks"))
from memory import peak_rss_of_command  # noqa: E402 - benchmarks/memory.py
from flywheel.prompt import Prompt  # noqa: E402
from flywheel.spec import load_eval_spec  # noqa: E402
from flywheel.store import Store  # noqa: E402

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"
MB = 2 ** 20
CEILING_TOKENS_S = 1400  # DESIGN.md: bf16 compute ceiling of SmolLM2-135M on these 2 cores
LM_EVAL_TASK = "flywheel_eval_throughput"
# Runs lm_eval's CLI as `python -m lm_eval` does, timing the generation phase and counting new tokens.
LM_EVAL_WRAPPER = """\
import importlib.metadata, json, os, runpy, sys, time
import lm_eval.models.huggingface as hf

stats = {"generate_s": 0.0, "generate_cpu_s": 0.0, "new_tokens": 0, "requests": 0,
         "version": importlib.metadata.version("lm_eval")}
generate_until, model_generate = hf.HFLM.generate_until, hf.HFLM._model_generate


def timed_generate_until(self, requests, *args, **kwargs):
    stats["dtype"] = str(self.model.dtype).replace("torch.", "")
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        return generate_until(self, requests, *args, **kwargs)
    finally:
        stats["generate_s"] += time.perf_counter() - started
        stats["generate_cpu_s"] += time.process_time() - cpu_started
        stats["requests"] += len(requests)
        with open(os.environ["FLYWHEEL_LMEVAL_STATS"], "w") as handle:
            json.dump(stats, handle)


def counted_model_generate(self, context, *args, **kwargs):
    out = model_generate(self, context, *args, **kwargs)
    for row in out[:, context.shape[1]:].tolist():  # up to and including EOS, as flywheel counts
        stats["new_tokens"] += row.index(self.eot_token_id) + 1 if self.eot_token_id in row else len(row)
    return out


hf.HFLM.generate_until, hf.HFLM._model_generate = timed_generate_until, counted_model_generate
sys.argv[0] = "lm_eval"
runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
"""


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
    """Evaluate `items` in cumulative chunks on a fresh store; (wall s, cpu s, new tokens, outputs,
    peak RSS bytes of the process during the pass: the weights, loaded before, included)."""
    wall = cpu = 0.0
    release_memory()
    reset_peak_rss()
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
        samples = {s.item_key: s for s in store.samples_with_grades(iteration)}
        outputs = [samples[i.key].output_text for i in items]
        grader_set.close()
        store.close()
    peak = peak_rss_bytes()
    print(f"  {label}: {wall:.1f}s wall, {cpu:.1f}s cpu, {tokens / wall:.0f} new tokens/s, peak RSS {peak / MB:.0f} MB",
          flush=True)
    return wall, cpu, tokens, outputs, peak


def lm_eval_task(spec, items, model, workdir: Path) -> tuple[Path, str, list[str]]:
    """Write a `generate_until` task over the items' rendered messages; (task dir, system, our prompts)."""
    rows, systems, prompts = [], set(), []
    for item in items:
        messages = render_messages(spec.messages(), item)
        if [m["role"] for m in messages] != ["system", "user"]:
            raise SystemExit("--lm-eval: the spec's prompt must be one system and one user message")
        systems.add(messages[0]["content"])
        rows.append({"id": item.key, "user": messages[1]["content"], "target": str(item.fields.get("label", ""))})
        prompts.append(model.render_prompt(messages))
    if len(systems) != 1:
        raise SystemExit("--lm-eval: the system message must be the same for every item")
    task_dir = workdir / "lm_eval_task"
    task_dir.mkdir()
    (task_dir / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, tokenizer = model.load()
    task = {
        "task": LM_EVAL_TASK, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task_dir / "data.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{user}}", "doc_to_target": "{{target}}",
        # EOS is lm-eval's own stop as well; greedy, the spec's max tokens.
        "generation_kwargs": {"until": [tokenizer.eos_token], "max_gen_toks": spec.sampling.max_tokens,
                              "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True}],
    }
    (task_dir / f"{LM_EVAL_TASK}.yaml").write_text(json.dumps(task, indent=1))  # JSON is YAML
    (workdir / "run_lm_eval.py").write_text(LM_EVAL_WRAPPER)
    return task_dir, systems.pop(), prompts


def timed_process(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str, int]:
    """Run a command to its exit; (wall s, its cpu s, stdout, its own peak RSS in bytes). Exits with
    its stderr on failure. The peak comes from benchmarks/memory.py's `peak_rss_of_command` (a
    child forked from this big process would otherwise inherit this process's high-water mark)."""
    wall, cpu, peak, stdout = peak_rss_of_command(command, env, cwd=ROOT)
    return wall, cpu, stdout, peak


def lm_eval_pass(python: str, model, dtype: str, task_dir: Path, system: str, workdir: Path, run: int):
    """One `python -m lm_eval` process; (wall s, cpu s, generation stats, {item id: (prompt, output)})."""
    out_dir, stats_path = workdir / f"lm_eval_out{run}", workdir / f"lm_eval_stats{run}.json"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / f"hf_datasets{run}"), FLYWHEEL_LMEVAL_STATS=str(stats_path))
    command = [python, str(workdir / "run_lm_eval.py"), "--model", "hf",
               "--model_args", f"pretrained={model.weights.base_path(pick_dtype(dtype))},dtype={dtype}", "--tasks", LM_EVAL_TASK,
               "--include_path", str(task_dir), "--batch_size", str(model.batch_size), "--apply_chat_template",
               "--system_instruction", system, "--output_path", str(out_dir), "--log_samples"]
    wall, cpu, _, peak = timed_process(command, env)
    stats = json.loads(stats_path.read_text())
    stats["peak_rss"] = peak
    samples = {}
    for path in out_dir.rglob(f"samples_{LM_EVAL_TASK}_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            samples[sample["doc"]["id"]] = (sample["arguments"]["gen_args_0"]["arg_0"], sample["resps"][0][0])
    print(f"  lm-eval {stats['version']}: {wall:.1f}s process wall, {stats['generate_s']:.1f}s generating "
          f"({stats['dtype']}), {stats['new_tokens']} new tokens", flush=True)
    return wall, cpu, stats, samples


def flywheel_cli_pass(n_items: int, dtype: str | None, workdir: Path, run: int) -> tuple[float, float, int]:
    """One `python -m flywheel eval` process on the demo's first n test items, fresh store; (wall s,
    cpu s, peak RSS bytes)."""
    command = [sys.executable, "-m", "flywheel", "eval", str(DEMO), "--split", "test", "--limit", str(n_items),
               "--db", str(workdir / f"cli{run}.db"), "--json"]
    if dtype:
        command += ["--set", f"model_options.dtype={dtype}"]
    wall, cpu, stdout, peak = timed_process(command)
    calls = json.loads(stdout)["model_calls"]
    if calls != n_items:
        raise SystemExit(f"flywheel eval made {calls} model calls for {n_items} items: not a fresh run")
    print(f"  flywheel eval: {wall:.1f}s process wall, {calls} model calls, peak RSS {peak / MB:.0f} MB", flush=True)
    return wall, cpu, peak


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
    parser.add_argument("--lm-eval", metavar="PYTHON", default=None,
                        help="also run lm-evaluation-harness with this python (benchmarks/lm_eval_venv.sh)")
    args = parser.parse_args()
    if args.lm_eval:  # before minutes of harness passes, not after
        probe = [args.lm_eval, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('lm_eval') is None)"]
        try:
            missing = subprocess.run(probe, check=False, capture_output=True).returncode
        except OSError as exc:
            raise SystemExit(f"error: --lm-eval {args.lm_eval}: {exc.strerror}") from None
        if missing:
            raise SystemExit(f"error: --lm-eval {args.lm_eval}: no lm_eval there; make it with benchmarks/lm_eval_venv.sh")

    spec = load_eval_spec(DEMO)
    items = load_dataset(spec).split("test")[: args.items]  # the demo's test split has 200
    options = dict(spec.model_options, **({"dtype": args.dtype} if args.dtype else {}))
    models = {"continuous": load_model(spec.model, dict(options, engine="continuous")),
              "hf": load_model(spec.model, dict(options, engine="hf"))}
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
            wall, cpu, tokens, outputs[name], peak = harness_pass(spec, items, models[name], args.chunk, name)
            runs[name].append((wall, cpu, tokens, peak))
            loads.append(load_average())

    if args.lm_eval:
        lm_runs, cli_runs, lm_samples, lm_stats = [], [], {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            task_dir, system, our_prompts = lm_eval_task(spec, items, models["continuous"], workdir)
            for repeat in range(args.repeats):
                for which in ("lm-eval", "flywheel") if repeat % 2 == 0 else ("flywheel", "lm-eval"):
                    if which == "lm-eval":
                        wall, cpu, lm_stats, lm_samples = lm_eval_pass(args.lm_eval, models["continuous"], dtype,
                                                                       task_dir, system, workdir, repeat)
                        lm_runs.append((wall, cpu, lm_stats["generate_s"], lm_stats["generate_cpu_s"],
                                        lm_stats["peak_rss"]))
                    else:
                        cli_runs.append(flywheel_cli_pass(len(items), args.dtype, workdir, repeat))
                    loads.append(load_average())
        if lm_stats["requests"] != len(items) or sorted(lm_samples) != sorted(i.key for i in items):
            raise SystemExit(f"lm-eval answered {lm_stats['requests']} requests, not the {len(items)} items")

    if args.cached_items:
        with tempfile.TemporaryDirectory() as tmp:
            first_s, rerun_s, rerun_calls = cached_rerun(args.cached_items, Path(tmp))

    n = len(items)
    print(f"\nSmolLM2-135M ({dtype}), {n} BANKING77 demo items, greedy, max_tokens {spec.sampling.max_tokens}, "
          f"{torch_threads()} torch threads; load averages during the run: {', '.join(loads)}\n")
    # With --lm-eval, one more column: items/s over lm-eval's generation phase (its whole process for ours).
    lm_gen = statistics.median(r[2] for r in lm_runs) if args.lm_eval else 0.0
    lm_whole = statistics.median(r[0] for r in lm_runs) if args.lm_eval else 0.0

    def versus(items_s: float, peer_s: float | None = None) -> str:
        return f" {items_s * (peer_s or lm_gen) / n:.2f}× |" if args.lm_eval else ""

    print("| path | wall s | cpu s | items/s | new tokens/s | % of ceiling | peak RSS MB | vs hf decoder |"
          + (" vs lm-eval |" if args.lm_eval else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.lm_eval else ""))
    if n_naive:
        print(f"| naive loop (batch 1), {n_naive} items | {naive_s:.1f} | | {n_naive / naive_s:.2f} | "
              f"{naive_tokens / naive_s:.1f} | {100 * naive_tokens / naive_s / CEILING_TOKENS_S:.1f}% | | |"
              + versus(n_naive / naive_s))
    base = statistics.median(r[0] for r in runs["hf"])
    for name, label in (("hf", "harness, decoder hf (generate per batch)"),
                        ("continuous", "harness, decoder continuous (default)")):
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        tokens = runs[name][0][2]
        peak = max(r[3] for r in runs[name])
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {n / wall:.2f} | {tokens / wall:.1f} | "
              f"{100 * tokens / wall / CEILING_TOKENS_S:.1f}% | {peak / MB:.0f} | {base / wall:.2f}× |" + versus(n / wall))
    if args.lm_eval:
        version, tokens = lm_stats["version"], lm_stats["new_tokens"]
        gen_cpu = statistics.median(r[3] for r in lm_runs)
        print(f"| lm-eval {version} hf, generate_until phase (batch {models['hf'].batch_size}) | {lm_gen:.1f} | "
              f"{gen_cpu:.1f} | {n / lm_gen:.2f} | {tokens / lm_gen:.1f} | "
              f"{100 * tokens / lm_gen / CEILING_TOKENS_S:.1f}% | | {base / lm_gen:.2f}× | 1.00× |")
        cli_wall = statistics.median(r[0] for r in cli_runs)
        for label, wall, cpu, peak in (
                (f"lm-eval {version}, whole process (`python -m lm_eval`)", lm_whole,
                 statistics.median(r[1] for r in lm_runs), max(r[4] for r in lm_runs)),
                ("flywheel eval, whole process (fresh store)", cli_wall, statistics.median(r[1] for r in cli_runs),
                 max(r[2] for r in cli_runs))):
            print(f"| {label} | {wall:.1f} | {cpu:.1f} | {n / wall:.2f} | | | {peak / MB:.0f} | |"
                  + versus(n / wall, lm_whole))
    agree = sum(a == b for a, b in zip(outputs["hf"], outputs["continuous"]))
    print(f"\nidentical outputs, continuous vs hf decoder: {agree}/{n}")
    if n_naive:
        agree = sum(a == b for a, b in zip(naive_out, outputs["continuous"]))
        print(f"identical outputs, continuous vs naive loop: {agree}/{n_naive}")
    if args.lm_eval:
        same_prompt = sum(lm_samples[i.key][0] == p for i, p in zip(items, our_prompts))
        print(f"lm-eval prompts identical to the harness's rendered prompts: {same_prompt}/{n}")
        for name in ("continuous", "hf"):
            agree = sum(lm_samples[i.key][1].strip() == o for i, o in zip(items, outputs[name]))
            print(f"identical outputs, lm-eval vs harness decoder {name} ({dtype}): {agree}/{n}")
    if args.repeats > 1:
        walls = {name: [r[0] for r in passes] for name, passes in runs.items()}
        if args.lm_eval:
            walls.update({"lm-eval generate_until": [r[2] for r in lm_runs],
                          "lm-eval process": [r[0] for r in lm_runs],
                          "flywheel eval process": [r[0] for r in cli_runs]})
        for name, values in walls.items():
            print(f"{name} wall s per pass: {', '.join(f'{v:.1f}' for v in values)}")
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
