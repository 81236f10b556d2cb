"""The KV cache's name in transformers, in one place: 5.x renamed the `past_key_values` argument and
output field to `cache`, and the old name logs a deprecation warning on every model command. Every
caller that passes or reads a cache (local generation, continuous decoding, scoring) goes through here.

    model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    cache = output_cache(model(input_ids=ids, use_cache=True))
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(hf_model: Any) -> str:
    """`cache` when the model's forward takes it (recent transformers), else `past_key_values`; the
    same name is what `generate` takes."""
    forward = getattr(hf_model, "forward", None)
    try:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, read by its current name (the old one warns)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values
