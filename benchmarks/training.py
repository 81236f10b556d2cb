"""SFT throughput and memory: flywheel's settings vs TRL's defaults, same data, same steps.

    .venv/bin/python benchmarks/training.py                 # 160 BANKING77 rows = 20 steps of 8
    .venv/bin/python benchmarks/training.py --rows 80 --ablate

Both sides train the same LoRA adapter (r=16, alpha 32, every linear layer) on SmolLM2-135M over
the same rows (the demo's train items, rendered with the eval's prompt, the label as the answer),
one epoch, batch 8, learning rate 5e-4:

* TRL defaults: `SFTConfig(bf16=False)` and nothing else: fp32, loss on every token of the
  conversational `messages` rows (TRL tokenises them), no packing, random batches, and TRL's own
  default of gradient checkpointing on. The base is loaded in fp32.
* flywheel before issue 14 (`trl_loss`): the same trainer with TRL's own loss, whose fused LM head
  scores every position on CPU (no Triton), then masks.
* flywheel: `flywheel.train.sft.build_sft_trainer` with the default `SFTSpec`: bf16 where the CPU
  has AVX512-BF16/AMX (frozen base weights in bf16, LoRA weights fp32, autocast), loss on the
  assistant tokens only, computed on those positions only (flywheel.train.sft_loss), batches grouped
  by length, no gradient checkpointing. Packing stays off: on CPU there is no varlen attention, so
  packed rows would attend to each other (see docs/training.md).

`--ablate` adds the steps in between, one change at a time. Each configuration runs in its own
process (so peak RSS is its own); tokens/s counts real (non-pad) tokens of the rows processed.
`--repeats N` runs the list N times, alternating its order, and reports medians. Load average is
printed next to every timing, and CPU seconds beside wall seconds: this machine is shared, and
process CPU time moves less than wall time when other jobs hold the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"

# name -> (label, settings). "trl": TRL tokenises `messages` itself; otherwise flywheel's trainer.
CONFIGS = {
    "trl_defaults": ("TRL defaults (fp32, all tokens, no packing, checkpointing)", {"trl": True}),
    "no_ckpt": ("+ no gradient checkpointing", {"trl": True, "ckpt": False}),
    "assistant_only": ("+ assistant-only loss", {"precision": "fp32", "group_by_length": False}),
    "grouped": ("+ batches grouped by length", {"precision": "fp32"}),
    "bf16_autocast": ("+ bf16 autocast, fp32 weights", {"precision": "bf16", "fp32_weights": True}),
    "trl_loss": ("flywheel before issue 14 (bf16 weights + autocast, TRL's loss)",
                 {"precision": "auto", "compact_loss": False}),
    "flywheel": ("flywheel (+ loss on labelled positions only, eager attention)", {"precision": "auto"}),
}
MAIN = ("trl_defaults", "trl_loss", "flywheel")


def rows(n: int):
    from flywheel.distill import capture
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store
    from flywheel.train import build_sft_set

    spec = load_eval_spec(DEMO)
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Path(folder) / "bench.db")
        capture(spec, store, "reference:label", limit=n)
        training_set = build_sft_set(spec, store)
        store.close()
    return training_set


def worker(name: str, n: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.models.loading import materialise_embedded
    from flywheel.train.config import SFTSpec, resolve_bf16, to_peft
    from flywheel.train.formats import chat_messages, tokenize_sft
    from flywheel.train.sft import build_sft_trainer

    settings = CONFIGS[name][1]
    training_set = rows(n)
    path = materialise_embedded("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = SFTSpec(epochs=1, batch_size=8, learning_rate=5e-4, logging_steps=1000,
                   precision=settings.get("precision", "fp32"),
                   group_by_length=settings.get("group_by_length", True))
    bf16 = resolve_bf16(spec.precision)
    weights = torch.bfloat16 if bf16 and not settings.get("fp32_weights") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=weights)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if settings.get("trl"):
        from trl import SFTConfig, SFTTrainer

        extra = {} if settings.get("ckpt", True) else {"activation_checkpointing": False}
        args = SFTConfig(output_dir=str(work), bf16=False, num_train_epochs=1, per_device_train_batch_size=8,
                         learning_rate=5e-4, logging_steps=1000, save_strategy="no", report_to=[],
                         disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **extra)
        dataset = Dataset.from_list([{"messages": chat_messages(r["messages"])} for r in training_set.rows])
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=to_peft(spec.lora))
    else:
        trainer = build_sft_trainer(model, tokenizer, training_set, spec, work, bf16=bf16, quiet=True,
                                    compact_loss=settings.get("compact_loss", True)).trainer
        if settings.get("fp32_weights"):
            assert next(model.parameters()).dtype == torch.float32
    tokens, _ = tokenize_sft(training_set, tokenizer, loss="assistant")
    real_tokens = sum(len(t["input_ids"]) for t in tokens)
    trained_tokens = sum(sum(1 for x in t["labels"] if x != -100) for t in tokens)
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    out.write_text(json.dumps({
        "name": name, "rows": len(training_set), "steps": trainer.state.global_step, "wall_s": wall,
        "tokens": real_tokens, "tokens_per_s": real_tokens / wall,
        "cpu_s": cpu, "tokens_per_cpu_s": real_tokens / cpu, "s_per_step": wall / trainer.state.global_step,
        "trained_tokens": trained_tokens if not settings.get("trl") else real_tokens,
        "train_loss": output.training_loss, "bf16": bf16, "weights": str(weights).replace("torch.", ""),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=160, help="Training rows (one epoch, batch 8).")
    parser.add_argument("--ablate", action="store_true", help="Also run the configurations in between.")
    parser.add_argument("--only", nargs="*", help="Run only these configurations.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per configuration (medians reported).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rows, Path(args.out))
        return
    names = args.only or (list(CONFIGS) if args.ablate else list(MAIN))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                out = Path(handle.name)
            subprocess.run([sys.executable, __file__, "--worker", name, "--rows", str(args.rows), "--out", str(out)],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            out.unlink()
            runs[name].append(r)
            print(f"  {name}: {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s cpu, {r['tokens_per_s']:.0f} tokens/s, "
                  f"loss {r['train_loss']:.4f}, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(load {r['load_before']:.2f} -> {r['load_after']:.2f})", file=sys.stderr)
    results = {}
    for name, found in runs.items():
        middle = sorted(found, key=lambda r: r["wall_s"])[len(found) // 2]
        results[name] = dict(middle, cpu_s=statistics.median(r["cpu_s"] for r in found),
                             tokens_per_cpu_s=statistics.median(r["tokens_per_cpu_s"] for r in found))
    base = results.get("trl_defaults")
    print(f"\nSFT, SmolLM2-135M + LoRA r=16 all-linear, {args.rows} BANKING77 rows, 1 epoch, batch 8, "
          f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"median of {args.repeats}\n")
    print("| configuration | steps | wall s | s/step | tokens/s | vs TRL defaults | cpu s | tokens/cpu s | "
          "train loss | trained tokens | peak RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(f"| {CONFIGS[name][0]} | {r['steps']} | {r['wall_s']:.1f} | {r['s_per_step']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {ratio} | {r['cpu_s']:.1f} | {r['tokens_per_cpu_s']:.0f} | "
              f"{r['train_loss']:.4f} | {r['trained_tokens']} | {r['peak_rss_mb']:.0f} | "
              f"{r['load_before']:.2f}-{r['load_after']:.2f} |")


if __name__ == "__main__":
    main()
