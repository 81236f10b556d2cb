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

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model, Sampling

__all__ = ["ChatRequest", "Completion", "Model", "ModelCache", "Sampling", "cached_model", "format_model_ref",
           "load_model", "parse_adapters", "parse_model_ref"]

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


def load_model(ref: str, options: dict[str, Any] | None = None) -> Model:
    """Build a (lazily loading) model for a reference string."""
    options = dict(options or {})
    scheme, name, adapter = parse_model_ref(ref)
    if scheme == "local":
        from flywheel.models.loading import is_vision_model
        from flywheel.models.local import LocalModel
        from flywheel.models.vision import VisionModel

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


# -- one model cache per process -------------------------------------------------------------------
KEEP_LOADED = 3  # models kept per process: a wheel's incumbent and candidate, and one more (chat)


class ModelCache:
    """Models by (reference, options), the least recently used dropped first: the wheel, the API's
    chat and its eval workers share one (`cached_model`), so a model is loaded once per process.

    Safe across threads: the cache's lock covers only the lookup (building a model reads no
    weights); each model loads once under its own lock and generates one call at a time. A dropped
    model is not closed (a thread may still be using it); it goes when its last user lets it go.
    A local model whose folders changed on disk since it was cached (same path, new weights) is
    built again, so a cached model never answers with weights that are no longer there."""

    def __init__(self, keep: int = KEEP_LOADED):
        self.keep = keep
        self._models: OrderedDict[str, tuple[tuple, Model]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str, options: dict[str, Any] | None = None) -> Model:
        """The cached model for `ref` with `options`, built with `load_model` on first use."""
        options = dict(options or {})
        try:
            key = json.dumps([ref, options], sort_keys=True)
        except (TypeError, ValueError):
            raise ModelError(f"{ref}: model_options must be JSON values (strings, numbers, lists, objects)") from None
        stamp = _disk_stamp(ref)
        with self._lock:
            found = self._models.get(key)
            if found is not None and found[0] == stamp:
                self._models.move_to_end(key)
                return found[1]
            model = load_model(ref, options)
            self._models[key] = (stamp, model)
            self._models.move_to_end(key)
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
            return model

    def clear(self) -> None:
        """Forget every model (each goes when its last user lets it go)."""
        with self._lock:
            self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


_CACHE = ModelCache()


def cached_model(ref: str, options: dict[str, Any] | None = None) -> Model:
    """THE process's model for `ref` with `options`: loaded once, shared by the wheel and the API.

    >>> cached_model("local:smollm2") is cached_model("local:smollm2")
    True
    """
    return _CACHE.get(ref, options)


def model_cache() -> ModelCache:
    """The process's one `ModelCache` (tests clear it; `cached_model` reads it)."""
    return _CACHE


def _disk_stamp(ref: str) -> tuple:
    """(path, size, mtime) of every file in a local reference's base folder and adapter folders:
    cheap (no reads), and different when weights are rewritten in place. Empty for other models."""
    scheme, base, adapters = parse_model_ref(ref)
    if scheme != "local":
        return ()
    folders = [Path(base)] + [Path(path) for path, _ in parse_adapters(adapters, ref)]
    stamp = []
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    stamp.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(stamp)
