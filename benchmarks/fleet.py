"""Evals on a fleet: `openai:` over 2 `flywheel serve-model` processes vs 1, 64 requests in flight.

    .venv/bin/python benchmarks/fleet.py                     # 256 requests per round, 3 rounds
    .venv/bin/python benchmarks/fleet.py --requests 128 --rounds 2 --model local:smollm2

Starts two `flywheel serve-model` processes on 127.0.0.1 (by default a tiny random Llama built
from SmolLM2's tokenizer, so the figure is about serving and scheduling, not model quality), each
limited to `--threads` torch threads. Each round sends the same N distinct greedy prompts through
the `openai:` backend twice: once to server 1 alone (concurrency 64), once to the fleet of both
(concurrency 32 per server: 64 in flight in all). The two are interleaved so both see the same
background load; the load average is printed after each round. Prints a markdown table: items/s
per configuration (median of rounds) and the ratio fleet / single.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_tiny(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flywheel.models.loading import materialise_embedded

    tokenizer = AutoTokenizer.from_pretrained(materialise_embedded("smollm2"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.2)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_ref: str, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "flywheel", "serve-model", model_ref, "--name", "m",
                                "-o", "dtype=fp32", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve-model exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("serve-model did not come up")


def items_per_s(base_url, concurrency: int, n: int, max_tokens: int) -> float:
    from flywheel.models import ChatRequest, Sampling, load_model

    model = load_model("openai:m", {"base_url": base_url, "concurrency": concurrency, "max_retries": 0})
    requests = [ChatRequest(messages=[{"role": "user", "content": f"question {i}: where is my card?"}],
                            sampling=Sampling(temperature=0, max_tokens=max_tokens)) for i in range(n)]
    try:
        model.generate(requests[:4])  # connections up
        started = time.perf_counter()
        out = model.generate(requests)
        wall = time.perf_counter() - started
    finally:
        model.close()
    errors = sum(1 for c in out if c.error)
    if errors:
        raise SystemExit(f"{errors} requests failed, e.g. {next(c.error for c in out if c.error)}")
    return n / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--model", default=None, help="model ref to serve (default: a tiny random Llama)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_ref = args.model or f"local:{build_tiny(Path(tmp) / 'tiny')}"
        servers = [start_server(model_ref, args.threads) for _ in range(2)]
        urls = [url for _, url in servers]
        single, fleet = [], []
        try:
            for round_ in range(args.rounds):
                single.append(items_per_s(urls[0], 64, args.requests, args.max_tokens))
                fleet.append(items_per_s(urls, 32, args.requests, args.max_tokens))
                print(f"round {round_ + 1}: single {single[-1]:.1f} items/s, fleet {fleet[-1]:.1f} items/s, "
                      f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
        finally:
            for process, _ in servers:
                process.kill()
                process.wait(timeout=30)
    s, f = statistics.median(single), statistics.median(fleet)
    print(f"\n{args.requests} requests, 64 in flight, max_tokens {args.max_tokens}, "
          f"{args.threads} torch thread(s) per server, model {args.model or 'tiny random Llama'}\n")
    print("| configuration | items/s (median of %d) |" % args.rounds)
    print("|---|---|")
    print(f"| 1 server, concurrency 64 | {s:.1f} |")
    print(f"| 2-server fleet, concurrency 32 each | {f:.1f} |")
    print(f"| ratio fleet / single | {f / s:.2f}x |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
