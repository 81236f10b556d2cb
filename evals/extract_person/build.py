"""Build data.jsonl: one-sentence notes about people -> JSON {"name", "age", "city"}.

    python evals/extract_person/build.py

Every row is generated here from small word lists (no outside data, nothing to license): a name,
an age and a city are drawn with a fixed seed and written into one of several sentence shapes, so
the answer is known exactly. 240 train, 60 valid, 60 test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Maria", "James", "Aiko", "Olu", "Priya", "Lukas", "Fatima", "Diego", "Ingrid", "Chen", "Amara", "Tomas",
         "Leila", "Noah", "Sofia", "Kwame", "Elena", "Ravi", "Hana", "Mateo", "Zoe", "Ibrahim", "Clara", "Yusuf"]
LAST = ["Lopez", "Okafor", "Tanaka", "Schmidt", "Patel", "Novak", "Haddad", "Silva", "Berg", "Wang", "Mensah",
        "Costa", "Rahman", "Dubois", "Moreau", "Kowalski", "Nakamura", "Ortiz", "Larsen", "Adeyemi"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lima", "Dublin", "Hanoi", "Cairo", "Oslo", "Quito",
          "Porto", "Accra", "Seville", "Bergen", "Busan", "Tunis", "Leeds", "Austin", "Perth"]
SHAPES = [
    "{name}, {age}, moved to {city} last spring.",
    "Met {name} ({age}) at a conference; lives in {city} now.",
    "{name} is {age} years old and works in {city}.",
    "New member: {name}. Age {age}. Based in {city}.",
    "From {city}: {name}, aged {age}, asked about the refund.",
    "Our driver in {city} today was {name}, who turns {age} next week.",
]
SPLITS = {"train": 240, "valid": 60, "test": 60}
SEED = 11


def build(target: Path) -> int:
    rng = random.Random(SEED)
    rows, seen = [], set()
    for split, count in SPLITS.items():
        made = 0
        while made < count:
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            age, city = rng.randint(18, 79), rng.choice(CITIES)
            text = rng.choice(SHAPES).format(name=name, age=age, city=city)
            if text in seen:
                continue
            seen.add(text)
            answer = json.dumps({"name": name, "age": age, "city": city})
            rows.append({"id": f"p-{len(rows) + 1:04d}", "text": text, "answer": answer, "split": split})
            made += 1
    with target.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


if __name__ == "__main__":
    print(build(Path(__file__).with_name("data.jsonl")), "rows")
