"""Vision: local VLM generation batched vs one image at a time, and the cached rerun of a vision eval.

    .venv/bin/python benchmarks/vision.py                      # the tests' tiny LLaVA, 64 images
    .venv/bin/python benchmarks/vision.py --size small --images 32

No VLM weights can be downloaded here, so the model is a random LLaVA built from its config
(tests/vision_helpers.py): `tiny` (hidden 32, 2 layers, 32 px images, 16 image tokens, the tests'
model) or `small` (hidden 256, 4 layers, 224 px images, 196 image tokens). Random weights mean the
texts are noise; the figures are about the path: processor, batching, generate, store, cache.

Part 1 generates a caption for N distinct images (random colours) twice with the same model
object, interleaved in chunks so both see the same machine load: (a) one request per `generate`
call, (b) `model.generate` on the chunk (left-padded batches of `batch_size`); it compares
images/s and checks that both give the same texts (greedy). Part 2 runs a vision eval through the
harness on a fresh store, then the identical eval again: the rerun must make 0 model calls.
Prints a markdown table and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from flywheel.harness import run_eval  # noqa: E402
from flywheel.images import check_image_bytes, image_part  # noqa: E402
from flywheel.models import ChatRequest, Sampling, load_model  # noqa: E402
from flywheel.models.loading import materialise_embedded  # noqa: E402
from flywheel.spec import load_eval_spec  # noqa: E402
from flywheel.store import Store  # noqa: E402
from vision_helpers import build_tiny_vlm, image_bytes, vision_spec  # noqa: E402

SIZES = {"tiny": dict(hidden=32, layers=2, image_size=32, patch=8),
         "small": dict(hidden=256, layers=4, image_size=224, patch=16)}


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def requests_for(n: int, max_tokens: int, seed: int = 0) -> list[ChatRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        part = image_part(check_image_bytes(image_bytes(colour, size=(64, 48))))
        out.append(ChatRequest(messages=[{"role": "system", "content": "Describe the image."},
                                         {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
                               sampling=Sampling(max_tokens=max_tokens)))
    return out


def part1(model, n: int, chunk: int, max_tokens: int) -> dict:
    requests = requests_for(n, max_tokens)
    model.generate(requests[:2])  # warm up: weights loaded, first-call allocations done
    single_s = batched_s = 0.0
    single_texts, batched_texts = [], []
    for start in range(0, n, chunk):
        part = requests[start:start + chunk]
        began = time.perf_counter()
        single_texts += [model.generate([r])[0].text for r in part]
        single_s += time.perf_counter() - began
        began = time.perf_counter()
        batched_texts += [c.text for c in model.generate(part)]
        batched_s += time.perf_counter() - began
    same = sum(a == b for a, b in zip(single_texts, batched_texts))
    return {"single_s": single_s, "batched_s": batched_s, "same": same, "n": n}


def part2(model_dir: Path, folder: Path, n_items: int, batch_size: int) -> dict:
    import yaml

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    rng = random.Random(1)
    for i in range(n_items):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (folder / "images" / f"{i}.png").write_bytes(image_bytes(colour, size=(64, 48)))
        rows.append({"id": f"t{i}", "image": f"images/{i}.png", "label": "red", "split": "test"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.yaml").write_text(yaml.safe_dump(vision_spec(
        f"local:{model_dir}", model_options={"batch_size": batch_size, "dtype": "fp32"})))
    spec = load_eval_spec(folder / "eval.yaml")
    store = Store.open(folder / "flywheel.db")
    try:
        began = time.perf_counter()
        first = run_eval(spec, store, split="test")
        first_s = time.perf_counter() - began
        began = time.perf_counter()
        again = run_eval(spec, store, split="test")
        again_s = time.perf_counter() - began
    finally:
        store.close()
    return {"n": n_items, "first_calls": first.model_calls, "first_s": first_s,
            "rerun_calls": again.model_calls, "rerun_hits": again.cache_hits, "rerun_s": again_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--images", type=int, default=64, help="images in part 1")
    parser.add_argument("--chunk", type=int, default=16, help="interleaving chunk (and batch size)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--eval-items", type=int, default=48, help="items in part 2 (0 skips it)")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_vlm(Path(tmp) / "vlm", materialise_embedded("smollm2"), **SIZES[args.size])
        model = load_model(f"local:{model_dir}", {"batch_size": args.chunk, "dtype": "fp32"})
        load_before = load()
        one = part1(model, args.images, args.chunk, args.max_tokens)
        load_after = load()
        print(f"## Vision: {args.size} random LLaVA ({SIZES[args.size]}), fp32, {torch.get_num_threads()} threads\n")
        print("| path | images | seconds | images/s | ratio |")
        print("|---|---:|---:|---:|---:|")
        print(f"| one image per generate call | {one['n']} | {one['single_s']:.2f} | {one['n'] / one['single_s']:.1f} | 1.0× |")
        print(f"| batched (batch {args.chunk}) | {one['n']} | {one['batched_s']:.2f} | {one['n'] / one['batched_s']:.1f} | "
              f"**{one['single_s'] / one['batched_s']:.1f}×** |")
        print(f"\nsame greedy texts: {one['same']}/{one['n']}; load average before {load_before}, after {load_after}\n")
        if args.eval_items:
            two = part2(model_dir, Path(tmp) / "eval", args.eval_items, args.chunk)
            print("| eval run | items | model calls | cache hits | seconds |")
            print("|---|---:|---:|---:|---:|")
            print(f"| first | {two['n']} | {two['first_calls']} | 0 | {two['first_s']:.2f} |")
            print(f"| unchanged rerun | {two['n']} | {two['rerun_calls']} | {two['rerun_hits']} | {two['rerun_s']:.2f} |")
            print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
