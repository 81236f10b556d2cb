"""GPU check (issue 30): Flywheel's generation engines and LoRA SFT trainer on one GPU, no network.

    python benchmarks/gpu_check.py                       # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --wheels wheels/      # first install what the machine lacks (trl) from wheels
    python benchmarks/gpu_check.py --dry-run             # the whole script on CPU, tiny shapes, < 60 s (the test)

Models are random-weight models with the PUBLISHED shapes of Qwen2.5-0.5B and Qwen2.5-1.5B
(benchmarks/gpu_shapes/*.json: hidden size, layers, heads, KV heads, intermediate size, vocabulary,
copied from the models' public config.json), built here in bf16: nothing is downloaded. The tokenizer
is a byte-level one written here (one token per byte) with a ChatML template, so prompts render and
tokenise through the same code as real models (token counts are what they are: bytes). Throughput does not depend on the weights'
values (except where a random model stops early: every engine counts the tokens it really made).

It prints one table:
- generation new tokens/s (greedy, the same prompts) for each engine behind `model_options.engine`:
  `continuous` (Flywheel's decoder), `hf` (transformers `generate`), `hf` + `compile: true` (static
  cache, torch.compile with CUDA graphs), and `vllm` when the vllm package is importable;
- LoRA SFT tokens/s and MFU for Flywheel's trainer (flywheel.train.sft.build_sft_trainer: padding-free
  packing, bf16, Liger when installed, checkpointing by memory) against TRL's SFTTrainer with its
  defaults (same LoRA adapter, same rows, bf16 as Flywheel's); MFU counts 4·N FLOPs per token (a LoRA
  step: forward plus the backward through frozen weights; attention not counted) over the GPU's dense
  bf16 peak;
- peak GPU memory of each row (torch.cuda.max_memory_allocated).

Bringing trl to a machine without network (the GPU machine has torch, transformers, peft, accelerate):

    pip download --no-deps --only-binary=:all: -d wheels/ trl==1.16.0   # here, online; also `datasets`
    # and its small pure-Python dependencies if the machine lacks them (pip reports what is missing)
    python benchmarks/gpu_check.py --wheels wheels/                      # there: pip install --no-index

The check keeps to its time budget (`--budget-s`, default 420 s): a section that would start after it
is reported as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = ROOT / "benchmarks" / "gpu_shapes"
# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def install_wheels(folder: str) -> None:
    """pip install trl (and whatever it lacks) from carried wheels, without an index."""
    if importlib.util.find_spec("trl") is not None:
        return
    log(f"installing trl from {folder} (no index)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", folder, "trl"],
                   check=False)


def byte_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte) and a ChatML template. Byte-level, because
    transformers 5 loads a `qwen2` folder's tokenizer as Qwen2's byte-level BPE whatever tokenizer.json says."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def build_model(shape_file: Path, target: Path, dtype) -> tuple[Path, int, dict]:
    """A random-weight model with the shape file's shapes, saved with the word tokenizer in `target`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in json.loads(shape_file.read_text()).items() if not k.startswith("_")}
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    return target, params, shape


def words(rng: random.Random, n: int, vocab: int) -> str:
    """`n` random lowercase words of 1-7 letters (about 5 tokens each with the byte tokenizer)."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(1, 8)))
                    for _ in range(n))


class Memory:
    """Peak GPU memory of a section (0 on CPU)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.peak = 0
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def bench_generation(folder: Path, engine: str, options: dict, args, vocab: int, cuda: bool) -> dict:
    """New tokens/s of one engine on `args.prompts` greedy requests (a warm-up batch first, untimed)."""
    from flywheel.models import ChatRequest, Sampling, load_model

    rng = random.Random(0)
    requests = [ChatRequest([{"role": "user", "content": words(rng, args.prompt_words, vocab)}],
                            Sampling(max_tokens=args.new_tokens)) for _ in range(args.prompts)]
    model = load_model(f"local:{folder}", {"engine": engine, **options})
    try:
        model.generate(requests[: max(2, len(requests) // 8)])  # load, allocate, compile
        with Memory(cuda) as memory:
            started = time.perf_counter()
            completions = model.generate(requests)
            wall = time.perf_counter() - started
        errors = [c.error for c in completions if getattr(c, "error", None)]
        if errors:
            raise RuntimeError(errors[0])
        tokens = sum(c.completion_tokens for c in completions)
        return {"new_tokens_s": tokens / wall, "tokens": tokens, "wall_s": wall, "peak_bytes": memory.peak}
    finally:
        model.close()
        del model
        free(cuda)


def sft_rows(args, vocab: int) -> list[dict]:
    rng = random.Random(1)
    return [{"messages": [
        {"role": "system", "content": words(rng, 20, vocab)},
        {"role": "user", "content": words(rng, rng.randrange(args.row_words // 4, args.row_words), vocab)},
        {"role": "assistant", "content": words(rng, rng.randrange(4, 40), vocab)}]} for _ in range(args.rows)]


def bench_sft(folder: Path, flywheel: bool, args, vocab: int, params: int, cuda: bool, peak_flops: float | None,
              work: Path) -> dict:
    """LoRA SFT tokens/s (after `args.skip_steps` warm-up steps) and MFU of one trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    bf16 = cuda
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda" if cuda else "cpu")
    rows = sft_rows(args, vocab)
    out = work / ("flywheel" if flywheel else "trl")
    if flywheel:
        from flywheel.train import SFTSpec, TrainingSet
        from flywheel.train.sft import build_sft_trainer

        config = SFTSpec(precision="bf16" if bf16 else "fp32", packing=True, batch_size=args.sft_batch,
                         max_length=args.max_length, max_steps=args.sft_steps, logging_steps=1, learning_rate=1e-4)
        trainer = build_sft_trainer(model, tokenizer, TrainingSet("sft", rows), config, out, bf16=bf16,
                                    quiet=True).trainer
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             args=SFTConfig(output_dir=str(out), max_steps=args.sft_steps, logging_steps=1,
                                            report_to=[], bf16=bf16, use_cpu=not cuda, disable_tqdm=True),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        start = end = None

        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == args.skip_steps:
                if cuda:
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.end = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    try:
        with Memory(cuda) as memory:
            trainer.train()
        logged = {entry["step"]: entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry}
        tokens = logged[max(logged)] - logged.get(args.skip_steps, 0)
        tokens_s = tokens / (clock.end - clock.start)
        return {"tokens_s": tokens_s, "tokens": tokens, "peak_bytes": memory.peak,
                "mfu": tokens_s * 4 * params / peak_flops if peak_flops else None,
                "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
                "liger": bool(trainer.args.use_liger_kernel), "packing": bool(getattr(trainer.args, "packing", False))}
    finally:
        del trainer, model
        free(cuda)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few steps: checks the script")
    parser.add_argument("--shapes", nargs="*", default=None, help="shape files (default: the Qwen2.5 0.5B and 1.5B)")
    parser.add_argument("--wheels", help="folder of wheels to install trl from (pip --no-index)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)
    if args.wheels:
        install_wheels(args.wheels)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: torch sees no CUDA GPU here; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 1
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = dict(prompts=8, prompt_words=8, new_tokens=8, rows=24, row_words=16, sft_steps=3, skip_steps=1,
                 sft_batch=4, max_length=256, batch=4) if args.dry_run else \
        dict(prompts=256, prompt_words=50, new_tokens=128, rows=512, row_words=150, sft_steps=12, skip_steps=3,
             sft_batch=8, max_length=2048, batch=32)
    for key, value in sizes.items():
        setattr(args, key, value)
    shapes = [Path(s) for s in args.shapes] if args.shapes else (
        [SHAPES / "tiny-dry-run.json"] if args.dry_run else [SHAPES / "qwen2.5-0.5b.json", SHAPES / "qwen2.5-1.5b.json"])
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    peak = next((flops for key, flops in PEAK_BF16.items() if key in device_name), None) if cuda else None
    dtype_name = "bf16" if cuda else "fp32"
    engines = [("continuous", {"batch_size": args.batch}), ("hf", {"batch_size": args.batch * 2})]
    if cuda:
        engines.append(("hf+compile", {"batch_size": args.batch * 2, "compile": True}))
        if importlib.util.find_spec("vllm") is not None:
            engines.append(("vllm", {"gpu_memory_utilization": 0.45}))
    trainers = [("flywheel", True)] + ([("trl defaults", False)] if importlib.util.find_spec("trl") else [])
    started = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        for shape_file in shapes:
            name = shape_file.stem
            folder, params, shape = build_model(shape_file, Path(scratch) / name, torch.bfloat16 if cuda else torch.float32)
            log(f"{name}: {params / 1e6:.0f}M parameters, {device_name}")
            for engine, options in engines:
                row = {"shape": name, "what": f"generation, engine {engine}"}
                if time.perf_counter() - started > args.budget_s:
                    row["skipped"] = "time budget"
                else:
                    log(f"{name}: generation with {engine}")
                    base = engine.split("+")[0]
                    opts = {"dtype": dtype_name, "device": "cuda" if cuda else "cpu", **options}
                    if base == "vllm":
                        opts.pop("device")
                    try:
                        row.update(bench_generation(folder, base, opts, args, shape["vocab_size"], cuda))
                    except Exception as exc:  # a failing engine is a row of the table, not the end of the check
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                results.append(row)
            for label, flywheel in trainers:
                row = {"shape": name, "what": f"LoRA SFT, {label}"}
                if time.perf_counter() - started > args.budget_s:
                    row["skipped"] = "time budget"
                else:
                    log(f"{name}: SFT with {label}")
                    try:
                        row.update(bench_sft(folder, flywheel, args, shape["vocab_size"], params, cuda, peak,
                                             Path(scratch)))
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                results.append(row)
            if not importlib.util.find_spec("trl"):
                results.append({"shape": name, "what": "LoRA SFT, trl defaults", "skipped": "trl not installed"})
    total = time.perf_counter() - started
    print(f"\nGPU check on {device_name}, torch {torch.__version__}, {total:.0f} s in all"
          + ("" if peak else " (no dense bf16 peak known for this device: MFU not computed)"))
    print("\n| shape | what | new tokens/s | SFT tokens/s | MFU | peak GPU memory | notes |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        gen = f"{row['new_tokens_s']:,.0f}" if "new_tokens_s" in row else ""
        sft = f"{row['tokens_s']:,.0f}" if "tokens_s" in row else ""
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""
        memory = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else ""
        notes = row.get("error") or row.get("skipped") or ", ".join(
            key for key in ("packing", "liger", "gradient_checkpointing") if row.get(key))
        print(f"| {row['shape']} | {row['what']} | {gen} | {sft} | {mfu} | {memory} | {notes} |")
    if not any(e == "vllm" for e, _ in engines):
        print("\nvLLM: not importable here, no row (pip install 'flywheel[vllm]' where its wheels fit).")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": device_name, "total_s": total, "rows": results}, indent=1))
    return 0 if not any("error" in row for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
