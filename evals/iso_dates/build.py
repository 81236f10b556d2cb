"""Build data.jsonl: dates written the way people write them -> ISO 8601 (YYYY-MM-DD).

    python evals/iso_dates/build.py

Every row is generated here (no outside data): a date between 1950 and 2035 drawn with a fixed
seed, written in one of several everyday formats; the answer is its ISO form, checked with
string_check `eq`. 240 train, 60 valid, 60 test.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SPLITS = {"train": 240, "valid": 60, "test": 60}
SEED = 3


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
]


def build(target: Path) -> int:
    rng = random.Random(SEED)
    start, span = dt.date(1950, 1, 1), (dt.date(2035, 12, 31) - dt.date(1950, 1, 1)).days
    rows, seen = [], set()
    for split, count in SPLITS.items():
        made = 0
        while made < count:
            date = start + dt.timedelta(days=rng.randrange(span))
            text = rng.choice(FORMATS)(date)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"id": f"d-{len(rows) + 1:04d}", "text": text, "answer": date.isoformat(), "split": split})
            made += 1
    with target.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows)


if __name__ == "__main__":
    print(build(Path(__file__).with_name("data.jsonl")), "rows")
