"""Models: `load_model(ref)` for every scheme (`local:`, `openai:`; the reference syntax, adapters and
their weights are in flywheel.models.refs), and the one model cache per process (`cached_model`)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model, Sampling
from flywheel.models.openai_backend import OpenAIModel
from flywheel.models.refs import format_model_ref, parse_adapters, parse_model_ref

__all__ = ["ChatRequest", "Completion", "Model", "ModelCache", "Sampling", "cached_model", "format_model_ref",
           "load_model", "parse_adapters", "parse_model_ref"]


def load_model(ref: str, options: dict[str, Any] | None = None) -> Model:
    """Build a (lazily loading) model for a reference string."""
    options = dict(options or {})
    scheme, name, adapter = parse_model_ref(ref)
    if scheme == "local":
        from flywheel.models.loading import is_vision_model
        from flywheel.models.vision import VisionModel

        if is_vision_model(name):  # a vision-language model: transformers' image-text-to-text classes
            return VisionModel(ref, name, adapter, **options)
        from flywheel.models.engines import build_local_model  # the engine registry (model_options.engine)

        return build_local_model(ref, name, adapter, options)
    if adapter:
        raise ModelError(f"{ref}: adapters apply to local models only")

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
