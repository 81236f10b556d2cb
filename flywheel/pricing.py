"""What a remote model call costs: a price table in USD per million tokens, user-overridable.

    >>> price = find_price("gpt-4o-mini-2024-07-18")      # longest known prefix: gpt-4o-mini
    >>> round(price.cost(prompt_tokens=1200, completion_tokens=80, cached_tokens=1024), 8)
    0.0001512

The built-in table holds the public list prices of common OpenAI chat models (standard tier, as
published in 2026), and of inference on their fine-tunes (`ft:gpt-4o-mini-2024-07-18:org::id`
finds `ft:gpt-4o-mini`). Prices change: override them per model in the eval spec
(`model_options.prices: {input: 0.15, output: 0.6, cached_input: 0.075}`), or for many models in a
YAML/JSON file named by `$FLYWHEEL_PRICES` (`{model-name: {input: ..., output: ...}}`). A model
with no known price costs 0 (a local or self-hosted server), which reports show as such.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import ModelError

PER_TOKENS = 1_000_000


@dataclass(frozen=True)
class Price:
    """USD per million tokens. `cached_input` defaults to `input` when unknown."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return ((prompt_tokens - cached) * self.input + cached * cached_rate
                + completion_tokens * self.output) / PER_TOKENS


# model name prefix -> price; the longest matching prefix wins, so dated snapshots
# (gpt-4o-mini-2024-07-18) find their family and gpt-4o-mini is not priced as gpt-4o.
PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00, 0.125),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00, 7.50),
    "o3": Price(2.00, 8.00, 0.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o4-mini": Price(1.10, 4.40, 0.275),
}

# Inference on a fine-tuned model (`ft:BASE:org:suffix:id`) is billed at its own, higher rate.
# UNVERIFIED: these are the platform's published fine-tuned inference list prices (USD per 1M
# tokens, standard tier) as recalled for 2026-12; the project's reference material
# (../shared/reference/openai-platform.md) records no prices, so they were not checked against a
# source. Check them against the platform's pricing page before quoting a cost, and override them
# (`teacher_options.prices` in a rescue spec, `model_options.prices`, or $FLYWHEEL_PRICES).
# `flywheel rescue` says so wherever it prints a cost from this table (UNVERIFIED_NOTE).
FINE_TUNED: dict[str, Price] = {
    "ft:gpt-4o": Price(3.75, 15.00, 1.875),
    "ft:gpt-4o-mini": Price(0.30, 1.20, 0.15),
    "ft:gpt-4.1": Price(3.00, 12.00, 0.75),
    "ft:gpt-4.1-mini": Price(0.80, 3.20, 0.20),
    "ft:gpt-4.1-nano": Price(0.20, 0.80, 0.05),
}
PRICES.update(FINE_TUNED)
UNVERIFIED_NOTE = ("fine-tuned list prices from flywheel/pricing.py, unverified (as recalled for 2026-12): check the "
                   "platform's pricing page, or set teacher_options.prices")

FREE = Price(0.0, 0.0, 0.0)


def parse_price(raw: Any, where: str) -> Price:
    """A Price from `{input, output, cached_input?}`; ModelError names `where` on bad input."""
    if isinstance(raw, Price):
        return raw
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: expected a mapping with input and output prices per 1M tokens")
    unknown = set(raw) - {"input", "output", "cached_input"}
    if unknown or "input" not in raw or "output" not in raw:
        raise ModelError(f"{where}: expected keys input, output (and optionally cached_input), "
                         f"got {', '.join(sorted(raw)) or 'nothing'}")
    try:
        values = {k: float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ModelError(f"{where}: prices must be numbers (USD per 1M tokens)") from None
    if any(v < 0 for v in values.values()):
        raise ModelError(f"{where}: prices must not be negative")
    return Price(values["input"], values["output"], values.get("cached_input"))


def load_price_file(path: str | os.PathLike) -> dict[str, Price]:
    """Read `{model: {input, output, cached_input?}}` from a YAML or JSON file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.suffix != ".json" \
            else json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: price file not found (named by $FLYWHEEL_PRICES)") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read price file: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a mapping of model name -> prices")
    return {str(name): parse_price(raw, f"{path}: {name}") for name, raw in data.items()}


def price_table() -> dict[str, Price]:
    """The built-in prices, updated by the file that `$FLYWHEEL_PRICES` names (if any)."""
    table = dict(PRICES)
    env = os.environ.get("FLYWHEEL_PRICES")
    if env:
        table.update(load_price_file(env))
    return table


def find_price(model: str, override: Any = None, table: dict[str, Price] | None = None) -> Price:
    """The price of `model`: the override if given, else the longest table prefix, else free."""
    if override is not None:
        return parse_price(override, f"model_options.prices ({model})")
    table = price_table() if table is None else table
    if model in table:
        return table[model]
    matches = [name for name in table if model.startswith((name + "-", name + ":"))]
    return table[max(matches, key=len)] if matches else FREE


def unverified_price(model: str, override: Any = None) -> bool:
    """Whether `find_price(model, override)` comes from the unverified fine-tuned table (FINE_TUNED)."""
    if override is not None:
        return False
    price = find_price(model)
    return price != FREE and price == find_price(model, table=FINE_TUNED)
