"""A simulated app for examples/service: banking77 queries to `production` through the service's proxy.

    python examples/service/simulate.py --n 400 --base-url http://127.0.0.1:8080/v1
    python examples/service/simulate.py --n 400 --drift        # the same intents, chat-style phrasings

The app sends the true label in the request's metadata (as an app that learns the answer later
would), so the service's graders can score live answers; it never names a model other than the
alias, so nothing in it changes when the service switches models. Its queries are banking77's
train items that are not demonstrations in production's prompt (the eval's valid/test stay
unseen, and production is not asked the questions its demonstrations answer). `--drift` rewrites
each query as people type in a chat window (lower case, no punctuation, a greeting and a sign-off).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "evals" / "banking77" / "data.jsonl"
GREETINGS = ["hi", "hey there", "hello team", "quick q", "good morning", "yo"]
SIGN_OFFS = ["thx", "thanks in advance", "asap pls", "cheers", "??", "ty"]


@dataclass
class Traffic:
    """What the app saw: requests, right labels, and the usage and latency of each reply."""

    sent: int = 0
    right: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.right / self.sent if self.sent else float("nan")


def queries(drift: bool = False) -> list[dict[str, str]]:
    """The app's queries: train items that are no demonstration of production's prompt."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompt = HERE / "production_prompt.json"
    demos = {d["item_key"] for d in json.loads(prompt.read_text(encoding="utf-8")).get("demos", [])} \
        if prompt.is_file() else set()
    rows = [r for r in rows if r.get("split") == "train" and r["id"] not in demos]
    if drift:
        rng = random.Random(7)
        rows = [{**r, "text": f"{rng.choice(GREETINGS)} {re.sub(r'[^a-z0-9 ]', '', r['text'].lower())} "
                              f"{rng.choice(SIGN_OFFS)}"} for r in rows]
    return rows


def send(base_url: str, n: int, *, drift: bool = False, seed: int = 0, concurrency: int = 4) -> Traffic:
    """Send `n` labelled requests to `production` from `concurrency` threads; what came back."""
    import openai

    rows = queries(drift)
    rng = random.Random(seed)
    picks = [rng.choice(rows) for _ in range(n)]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=300)
    traffic, lock = Traffic(), threading.Lock()

    def one(row: dict[str, str]) -> None:
        started = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model="production", messages=[{"role": "user", "content": row["text"]}], temperature=0,
                max_tokens=12, metadata={"usecase": "banking", "label": row["label"]})
        except Exception:  # noqa: BLE001 - a lost request is counted, not raised
            with lock:
                traffic.sent += 1
                traffic.failed += 1
            return
        elapsed = time.perf_counter() - started
        with lock:
            traffic.sent += 1
            traffic.right += row["label"] in (reply.choices[0].message.content or "").lower()
            traffic.prompt_tokens += reply.usage.prompt_tokens if reply.usage else 0
            traffic.completion_tokens += reply.usage.completion_tokens if reply.usage else 0
            traffic.latencies_s.append(elapsed)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, picks))
    return traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--drift", action="store_true", help="Chat-style phrasings of the same intents.")
    args = parser.parse_args()
    t = send(args.base_url, args.n, drift=args.drift, seed=args.seed, concurrency=args.concurrency)
    print(f"{t.sent} requests, {t.right} answered with the right label ({t.accuracy:.1%}), {t.failed} failed, "
          f"{t.prompt_tokens / max(t.sent - t.failed, 1):.0f} prompt tokens per request")


if __name__ == "__main__":
    main()
