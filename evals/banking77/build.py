"""Rebuild data.jsonl: a stratified, seeded subset of BANKING77 (CC-BY-4.0).

    python evals/banking77/build.py ../shared/data/banking77

Ten distinct intents; per intent 40 train + 10 valid rows drawn from the source's train.csv and
20 test rows drawn from its test.csv; texts present in both files are kept out of train/valid, so
`test` never overlaps what optimisation may read.

unlabelled.jsonl: per intent 30 more texts of the source's train.csv, none in data.jsonl or in
test.csv, **without their labels** — the traffic a deployed classifier sees, which the wheel's
capture stage labels by the prompted system's self-consistency for distillation.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

INTENTS = [
    "card_arrival", "lost_or_stolen_card", "exchange_rate", "pin_blocked", "top_up_limits",
    "cancel_transfer", "age_limit", "apple_pay_or_google_pay", "terminate_account", "atm_support",
]
PER_INTENT = {"train": 40, "valid": 10, "test": 20, "unlabelled": 30}
SEED = 77


def build(source: Path, target: Path) -> int:
    rng = random.Random(SEED)
    pools = {}
    for name in ("train", "test"):
        with (source / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.DictReader(handle) if r["category"] in INTENTS]
        pools[name] = {i: sorted({r["text"].strip() for r in rows if r["category"] == i}) for i in INTENTS}
    # BANKING77's train and test files share some texts: keep those in test only.
    test_texts = {t for texts in pools["test"].values() for t in texts}
    out, unlabelled = [], []
    for intent in INTENTS:
        train_pool = [t for t in pools["train"][intent] if t not in test_texts]
        rng.shuffle(train_pool)
        test_pool = list(pools["test"][intent])
        rng.shuffle(test_pool)
        picks = {
            "train": train_pool[:PER_INTENT["train"]],
            "valid": train_pool[PER_INTENT["train"]:PER_INTENT["train"] + PER_INTENT["valid"]],
            "test": test_pool[:PER_INTENT["test"]],
        }
        start = PER_INTENT["train"] + PER_INTENT["valid"]
        unlabelled.extend(train_pool[start:start + PER_INTENT["unlabelled"]])
        for split, texts in picks.items():
            out.extend({"text": t, "label": intent, "split": split} for t in texts)
    rng.shuffle(out)
    rng.shuffle(unlabelled)
    with target.with_name("unlabelled.jsonl").open("w", encoding="utf-8") as handle:
        for index, text in enumerate(unlabelled, start=1):
            handle.write(json.dumps({"id": f"u77-{index:04d}", "text": text}, ensure_ascii=False) + "\n")
    with target.open("w", encoding="utf-8") as handle:
        for index, row in enumerate(out, start=1):
            handle.write(json.dumps({"id": f"b77-{index:04d}", **row}, ensure_ascii=False) + "\n")
    return len(out)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/banking77")
    print(build(src, Path(__file__).with_name("data.jsonl")), "rows")
