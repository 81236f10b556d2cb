"""Model references, parsed in one place.

    local:smollm2                      the embedded SmolLM2-135M-Instruct
    local:/path/to/model               any transformers causal LM folder
    local:HuggingFaceTB/SmolLM2-360M   a hub id (downloaded by transformers when online)
    local:smollm2+.flywheel/ckpt/sft-3 a LoRA adapter on top of a base
    openai:gpt-4o-mini                 the OpenAI SDK (base_url for any compatible server)
"""

from __future__ import annotations

from typing import Any

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model, Sampling

__all__ = ["ChatRequest", "Completion", "Model", "Sampling", "load_model", "parse_model_ref"]

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


def load_model(ref: str, options: dict[str, Any] | None = None) -> Model:
    """Build a (lazily loading) model for a reference string."""
    options = dict(options or {})
    scheme, name, adapter = parse_model_ref(ref)
    if scheme == "local":
        from flywheel.models.local import LocalModel
        from flywheel.models.vision import VisionModel, is_vision_model

        if is_vision_model(name):  # a vision-language model: transformers' image-text-to-text classes
            return VisionModel(ref, name, adapter, **options)

        known = {"dtype", "batch_size", "device", "prefix_cache", "decoder"}
        unknown = set(options) - known
        if unknown:
            raise ModelError(f"model_options: unknown option(s) for local models: {', '.join(sorted(unknown))}")
        return LocalModel(ref, name, adapter, **options)
    if adapter:
        raise ModelError(f"{ref}: adapters apply to local models only")
    from flywheel.models.openai_backend import OpenAIModel

    return OpenAIModel(ref, name, **options)
