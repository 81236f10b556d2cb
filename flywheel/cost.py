"""What a system costs per item: prompt and completion tokens, latency and money.

Every iteration's samples carry their tokens, latency and cost; `CostPerItem` is their mean per
sample, the unit a run spec's cost goal is stated in (`goal.minimise`). A sample's latency is its own
request's time (flywheel.models.decoding.DecodeResult), not a batch's wall time shared out:

    cost = store.iteration_cost(iteration_id)      # CostPerItem
    cost.value("prompt_tokens"), cost.describe("prompt_tokens")   # 31.2, '31 prompt tokens/item'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Minimise = Literal["prompt_tokens", "tokens", "latency_s", "money"]
MINIMISE: tuple[str, ...] = ("prompt_tokens", "tokens", "latency_s", "money")
_UNITS = {"prompt_tokens": "prompt tokens/item", "tokens": "tokens/item", "latency_s": "s/item",
          "money": "per 1,000 items"}


@dataclass(frozen=True)
class CostPerItem:
    """Mean cost of one sample of an iteration (money is per 1,000 items, in the price table's currency)."""

    n: int = 0
    prompt_tokens: float = math.nan
    completion_tokens: float = math.nan
    latency_s: float = math.nan
    money_per_1k: float = math.nan

    def value(self, minimise: str) -> float:
        """The figure a goal minimises: prompt tokens, all tokens, latency (s) or money per 1,000 items."""
        if minimise == "prompt_tokens":
            return self.prompt_tokens
        if minimise == "tokens":
            return self.prompt_tokens + self.completion_tokens
        if minimise == "latency_s":
            return self.latency_s
        if minimise == "money":
            return self.money_per_1k
        raise ValueError(f"unknown cost measure {minimise!r}; known: {', '.join(MINIMISE)}")

    def describe(self, minimise: str) -> str:
        """'31 prompt tokens/item', '0.012 s/item', '$0.42 per 1,000 items'."""
        value = self.value(minimise)
        if math.isnan(value):
            return f"– {_UNITS[minimise]}"
        if minimise == "money":
            return f"{value:.4g} {_UNITS[minimise]}"
        if minimise == "latency_s":
            return f"{value:.3g} {_UNITS[minimise]}"
        return f"{value:.0f} {_UNITS[minimise]}"

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CostPerItem":
        data = data or {}
        return cls(n=int(data.get("n") or 0), **{k: math.nan if data.get(k) is None else float(data[k])
                                                 for k in ("prompt_tokens", "completion_tokens", "latency_s",
                                                           "money_per_1k")})


def cheaper(candidate: CostPerItem, incumbent: CostPerItem, minimise: str) -> bool:
    """Strictly cheaper on the goal's measure (an unknown cost is never cheaper)."""
    a, b = candidate.value(minimise), incumbent.value(minimise)
    return not (math.isnan(a) or math.isnan(b)) and a < b
