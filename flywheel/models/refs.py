"""Model references, parsed in one place.

    local:smollm2                      the embedded SmolLM2-135M-Instruct
    local:/path/to/model               any transformers causal LM folder
    local:HuggingFaceTB/SmolLM2-360M   a hub id (downloaded by transformers when online)
    local:smollm2+.flywheel/ckpt/sft-3 a LoRA adapter on top of a base
    local:smollm2+A+B                  several adapters, combined (PEFT add_weighted_adapter, "cat")
    local:smollm2+A*0.7+B*0.3          ... with weights (default 1: the adapters' deltas add up)
    openai:gpt-4o-mini                 the OpenAI SDK (base_url for any compatible server)
"""

from __future__ import annotations

import math

from flywheel.errors import ModelError

SCHEMES = ("local", "openai")


def parse_model_ref(ref: str) -> tuple[str, str, str | None]:
    """Split `scheme:name[+adapter]` into its parts; ModelError names what is wrong.

    >>> parse_model_ref("local:smollm2+.flywheel/ckpt/sft-3")
    ('local', 'smollm2', '.flywheel/ckpt/sft-3')
    """
    scheme, sep, rest = ref.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ModelError(
            f"unknown model reference {ref!r}: expected one of "
            + ", ".join(f"{s}:NAME" for s in SCHEMES)
            + " (e.g. local:smollm2)"
        )
    name, plus, adapter = rest.partition("+")
    return scheme, name, (adapter or None) if plus else None


def parse_adapters(adapters: str | None, ref: str = "") -> list[tuple[str, float]]:
    """The adapter part of a reference as (folder, weight) pairs, in order.

    >>> parse_adapters("ckpt/a+ckpt/b*0.3")
    [('ckpt/a', 1.0), ('ckpt/b', 0.3)]
    """
    if not adapters:
        return []
    out: list[tuple[str, float]] = []
    for part in adapters.split("+"):
        path, star, weight_text = part.rpartition("*") if "*" in part else (part, "", "")
        weight = 1.0
        if star:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise ModelError(f"{ref or adapters}: adapter weight {weight_text!r} of {path!r} is not a number "
                                 "(write ADAPTER*0.5)")
        if not path:
            raise ModelError(f"{ref or adapters}: empty adapter in {adapters!r} (write BASE+ADAPTER[*W]+ADAPTER[*W])")
        out.append((path, weight))
    return out


def format_model_ref(scheme: str, name: str, adapters: list[tuple[str, float]] | None = None) -> str:
    """The reference string for parts that `parse_model_ref` + `parse_adapters` return (weight 1 unwritten).

    >>> format_model_ref("local", "smollm2", [("a", 1.0), ("b", 0.3)])
    'local:smollm2+a+b*0.3'
    """
    tail = "".join(f"+{path}" + ("" if weight == 1.0 else f"*{weight!r}") for path, weight in adapters or [])
    return f"{scheme}:{name}{tail}"
