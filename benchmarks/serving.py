"""Serving: serve-model's micro-batching vs one-at-a-time, and the capture proxy's added latency.

    .venv/bin/python benchmarks/serving.py                  # 64 requests, 300 proxy round trips
    .venv/bin/python benchmarks/serving.py --requests 32 --round-trips 100

Part 1 starts `flywheel serve-model local:smollm2` (defaults: bf16 where the CPU has it, batch 32,
max wait 10 ms) and sends the first N BANKING77 demo test prompts (greedy, max_tokens 16) with the
openai SDK: one after another, and all N at once (AsyncOpenAI + gather). The two are interleaved
in rounds (each round: a quarter of the prompts one by one, then all N at once), so both see the
same background load; the ratio of sequential total to the median all-at-once time is what the
micro-batcher buys (goal >= 4x). Other work on the machine slows batch-1 decoding far more than
batched decoding (torch's OpenMP threads wait on each other when a core is taken away), so the
load average is printed after each round: trust a run on a quiet machine.

Part 2 starts a canned upstream (a Starlette app that answers every chat call at once with a fixed
completion, so model time does not drown the measurement) and `flywheel proxy` in front of it,
each in its own process, and times round trips from one keep-alive HTTP client, alternating direct
and proxied calls. The proxy's added latency is the difference of the medians (goal < 5 ms); it
includes reading the body, forwarding, and committing the capture row to SQLite before replying.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "evals" / "banking77" / "eval.yaml"

CANNED = {
    "id": "chatcmpl-canned", "object": "chat.completion", "created": 0, "model": "canned",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "card_arrival"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 61, "completion_tokens": 4, "total_tokens": 65},
}


def canned_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        await request.body()
        return JSONResponse(CANNED)

    async def health(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], health_url: str, timeout: float = 300.0) -> subprocess.Popen:
    import httpx2

    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{' '.join(args)} exited: {log.read().decode()[-2000:]}")
        try:
            if httpx2.get(health_url, timeout=1).status_code < 500:
                return process
        except httpx2.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"{' '.join(args)} did not come up")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def demo_prompts(n: int) -> list[list[dict[str, str]]]:
    from flywheel.data import load_dataset
    from flywheel.harness import render_messages, select_items
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(DEMO)
    items = select_items(load_dataset(spec), "test", None)
    items = (items * (n // len(items) + 1))[:n]
    return [render_messages(spec.messages(), item) for item in items]


def bench_serve_model(n: int, max_tokens: int, rounds: int) -> list[tuple[str, str]]:
    """Sequential and all-at-once, interleaved in `rounds` so that both see the same machine load:
    each round sends 1/rounds of the prompts one after another, then all n at once."""
    import openai

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start([sys.executable, "-m", "flywheel", "serve-model", "local:smollm2", "--port", str(port)],
                    base + "/health")
    prompts = demo_prompts(n)
    params = dict(model="smollm2", temperature=0, max_tokens=max_tokens)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                      timeout=600) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(messages=p, **params)
                                          for p in prompts))

    sequential, sequential_s, concurrent_s, loads = [], 0.0, [], [os.getloadavg()[0]]
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        client.chat.completions.create(messages=prompts[0], **params)  # warm-up
        share = -(-n // rounds)
        for r in range(rounds):
            started = time.perf_counter()
            sequential += [client.chat.completions.create(messages=p, **params)
                           for p in prompts[r * share:(r + 1) * share]]
            sequential_s += time.perf_counter() - started
            started = time.perf_counter()
            concurrent = asyncio.run(all_at_once())
            concurrent_s.append(time.perf_counter() - started)
            loads.append(os.getloadavg()[0])
    finally:
        stop(process)
    tokens = sum(r.usage.completion_tokens for r in sequential)
    tokens_c = sum(r.usage.completion_tokens for r in concurrent)
    concurrent_median = statistics.median(concurrent_s)
    same = sum(a.choices[0].message.content == b.choices[0].message.content for a, b in zip(sequential, concurrent))
    return [
        (f"{n} chat requests, one after another", f"{sequential_s:.1f} s  ({tokens / sequential_s:.0f} new tokens/s)"),
        (f"the same {n}, all at once (micro-batched), median of {rounds}",
         f"{concurrent_median:.1f} s  ({tokens_c / concurrent_median:.0f} new tokens/s)"),
        ("speed-up (goal >= 4x)", f"**{sequential_s / concurrent_median:.1f}x**"),
        ("identical replies, sequential vs batched (greedy, bf16)", f"{same}/{n}"),
        ("1-min load average at start and after each round", " / ".join(f"{x:.1f}" for x in loads)),
    ]


def bench_proxy(round_trips: int) -> list[tuple[str, str]]:
    import httpx2

    upstream_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    upstream_proc = start([sys.executable, __file__, "--canned-upstream", str(upstream_port)], upstream + "/health")
    db = Path(tempfile.mkdtemp()) / "captures.db"
    proxy = f"http://127.0.0.1:{proxy_port}"
    proxy_proc = start([sys.executable, "-m", "flywheel", "proxy", "--upstream", upstream + "/v1",
                        "--port", str(proxy_port), "--db", str(db)], proxy + "/v1/health")
    body = json.dumps({"model": "canned", "messages": demo_prompts(1)[0], "temperature": 0, "max_tokens": 16,
                       "metadata": {"usecase": "benchmark"}}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    direct, proxied = [], []
    try:
        with httpx2.Client() as client:
            for _ in range(20):  # warm both paths and their connections
                client.post(upstream + "/v1/chat/completions", content=body, headers=headers)
                client.post(proxy + "/v1/chat/completions", content=body, headers=headers)
            for _ in range(round_trips):
                for url, times in ((upstream, direct), (proxy, proxied)):
                    started = time.perf_counter()
                    response = client.post(url + "/v1/chat/completions", content=body, headers=headers)
                    times.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
    finally:
        stop(proxy_proc)
        stop(upstream_proc)
    from flywheel.store import Store

    store = Store.open(db)
    recorded = store.db.execute("select count(*) from captures where status = 200").fetchone()[0]
    store.close()
    ms = lambda values, q: 1000 * statistics.quantiles(values, n=20)[q]  # noqa: E731
    median_direct, median_proxy = (1000 * statistics.median(v) for v in (direct, proxied))
    return [
        (f"direct to upstream, median of {round_trips} (p90)", f"{median_direct:.2f} ms ({ms(direct, 17):.2f})"),
        ("through flywheel proxy, median (p90)", f"{median_proxy:.2f} ms ({ms(proxied, 17):.2f})"),
        ("added latency, median (goal < 5 ms)", f"**{median_proxy - median_direct:.2f} ms**"),
        ("calls recorded", f"{recorded}/{round_trips + 20}"),
    ]


def table(title: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"| {title} | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved sequential/concurrent rounds.")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--skip-model", action="store_true", help="Only the proxy part.")
    parser.add_argument("--canned-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned_upstream:
        import uvicorn

        uvicorn.run(canned_app(), host="127.0.0.1", port=args.canned_upstream, log_level="warning")
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start\n")
    if not args.skip_model:
        print(table("serve-model local:smollm2", bench_serve_model(args.requests, args.max_tokens, args.rounds)) + "\n")
    print(table("capture proxy", bench_proxy(args.round_trips)))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
