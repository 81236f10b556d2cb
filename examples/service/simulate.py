"""A simulated app for examples/service: banking77 queries to `production` through the service's proxy.

    python examples/service/simulate.py --n 200 --base-url http://127.0.0.1:8080/v1

The app sends the true label in the request's metadata (as an app that learns the answer later
would), so the service's graders can score live answers; it never names a model other than the
alias, so nothing in it changes when the service switches models.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import openai

DATA = Path(__file__).resolve().parents[2] / "evals" / "banking77" / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "train"]  # the eval's valid/test stay unseen
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=2)
    rng = random.Random(args.seed)
    right = 0
    for _ in range(args.n):
        row = rng.choice(rows)
        reply = client.chat.completions.create(
            model="production", messages=[{"role": "user", "content": row["text"]}], temperature=0, max_tokens=12,
            metadata={"usecase": "banking", "label": row["label"]})
        right += row["label"] in (reply.choices[0].message.content or "").lower()
    print(f"{args.n} requests, {right} answered with the right label")


if __name__ == "__main__":
    main()
