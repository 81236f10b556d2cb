"""Faker-made support messages with known PII spans, and per-kind recall/precision of a detector.

Used by tests/test_privacy_redact.py (loose assertions) and benchmarks/privacy.py (the table).
Names appear both introduced ("my name is X", "Regards, X") and bare ("forward it to X"), so the
measured person recall is what a user would see, not what the cued recogniser was built for.
Other numbers (order ids, amounts, dates) are mixed in to measure precision.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR"]


@dataclass
class FakeMessage:
    text: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, start, end)


def fake_messages(n: int = 240, seed: int = 7, *, min_chars: int = 0) -> list[FakeMessage]:
    """`n` messages; each mixes 2-5 PII-bearing sentences with filler. `min_chars` pads with filler."""
    from faker import Faker

    fakers = {loc: Faker(loc) for loc in LOCALES}
    for i, f in enumerate(fakers.values()):
        f.seed_instance(seed * 100 + i)
    rng = random.Random(seed)

    def card(f: Any) -> str:
        number = f.credit_card_number(card_type=rng.choice(["visa", "mastercard", "amex", "discover"]))
        if rng.random() < 0.4 and len(number) == 16:
            number = " ".join(number[i:i + 4] for i in range(0, 16, 4))
        return number

    def iban(f: Any) -> str:
        value = f.iban()
        if rng.random() < 0.5:
            value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
        return value

    def person(f: Any) -> str:
        return f"{f.first_name()} {f.last_name()}"

    templates = [
        [("Hi, my name is ", None), ("PERSON", person), (".", None)],
        [("Dear ", None), ("PERSON", person), (",", None)],
        [("Kind regards,\n", None), ("PERSON", person)],
        [("Please forward this to ", None), ("PERSON", person), (" in accounting.", None)],
        [("", None), ("PERSON", person), (" called us yesterday about the delay.", None)],
        [("You can reach me at ", None), ("EMAIL_ADDRESS", lambda f: f.email()), (".", None)],
        [("My email is ", None), ("EMAIL_ADDRESS", lambda f: f.free_email()), (" if you need it.", None)],
        [("cc ", None), ("EMAIL_ADDRESS", lambda f: f.company_email()), (" on the reply", None)],
        [("Call me on ", None), ("PHONE_NUMBER", lambda f: f.phone_number()), (" after 5pm.", None)],
        [("My mobile: ", None), ("PHONE_NUMBER", lambda f: f.phone_number()), (None, None)],
        [("The card ending wrong was ", None), ("CREDIT_CARD", card), (", please refund it.", None)],
        [("Charge it to card ", None), ("CREDIT_CARD", card), (".", None)],
        [("Send the money to IBAN ", None), ("IBAN_CODE", iban), (" today.", None)],
        [("My account is ", None), ("IBAN_CODE", iban), (".", None)],
        [("The login came from ", None), ("IP_ADDRESS", lambda f: f.ipv4()), (" this morning.", None)],
        [("Blocked address: ", None), ("IP_ADDRESS", lambda f: f.ipv4_public()), (".", None)],
    ]
    fillers = [
        lambda: f"My order #{rng.randint(100000, 999999)} has not arrived.",
        lambda: f"I paid {rng.randint(5, 900)}.{rng.randint(10, 99)} EUR on {rng.randint(1, 28)}/{rng.randint(1, 12)}/2026.",
        lambda: f"Tracking number {rng.randint(10**9, 10**10 - 1)} shows no update.",
        lambda: "The app keeps crashing when I open the statement page.",
        lambda: "Thanks for the quick answer last time, it helped a lot.",
        lambda: f"Version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)} still has the bug.",
        lambda: "Could you also check why my transfer is pending?",
    ]
    out = []
    for _ in range(n):
        f = fakers[rng.choice(LOCALES)]
        parts: list[tuple[str | None, Any]] = []
        chosen = [rng.choice(templates) for _ in range(rng.randint(2, 5))]
        pieces = chosen + [[(filler(), None)] for filler in rng.sample(fillers, rng.randint(1, 3))]
        rng.shuffle(pieces)
        for piece in pieces:
            parts.extend(piece)
            parts.append((" ", None))
        msg = FakeMessage("")
        text = ""
        for kind, make in parts:
            if make is None:
                text += kind or ""
            else:
                value = make(f)
                msg.spans.append((kind, len(text), len(text) + len(value)))
                text += value
        while len(text) < min_chars:
            text += " " + rng.choice(fillers)()
        msg.text = text.strip() if not min_chars else text[:max(min_chars, msg.spans[-1][2] if msg.spans else 0)]
        out.append(msg)
    return out


def score(detector: Any, messages: list[FakeMessage]) -> dict[str, dict[str, float]]:
    """Per entity kind: truth count, predicted count, recall and precision (span overlap, same kind)."""
    truth_n: dict[str, int] = defaultdict(int)
    hit: dict[str, int] = defaultdict(int)
    pred_n: dict[str, int] = defaultdict(int)
    pred_ok: dict[str, int] = defaultdict(int)
    for msg in messages:
        found = detector.detect(msg.text)
        for kind, start, end in msg.spans:
            truth_n[kind] += 1
            hit[kind] += any(e.kind == kind and e.start < end and start < e.end for e in found)
        for e in found:
            pred_n[e.kind] += 1
            pred_ok[e.kind] += any(k == e.kind and e.start < end and start < e.end for k, start, end in msg.spans)
    kinds = sorted(set(truth_n) | set(pred_n))
    return {k: {"truth": truth_n[k], "predicted": pred_n[k],
                "recall": hit[k] / truth_n[k] if truth_n[k] else float("nan"),
                "precision": pred_ok[k] / pred_n[k] if pred_n[k] else float("nan")} for k in kinds}
