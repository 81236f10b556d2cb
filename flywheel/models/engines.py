"""Generation engines for `local:` models: `model_options.engine` picks one, from ONE table (`ENGINES`).

    continuous  flywheel.models.decoding's continuous-batching loop (the default)
    hf          transformers `generate` per fixed batch; `compile: true` adds a static KV cache and
                torch.compile (CUDA graphs on a GPU)
    vllm        vLLM's offline `LLM` class in this process, prefix caching on (optional extra:
                pip install 'flywheel[vllm]'; it pulls CUDA wheels, so `make test` does not install it)

The engine is part of a model's fingerprint (and so of the completion cache key): outputs computed
by one engine never answer for another.

    >>> sorted(ENGINES)
    ['continuous', 'hf', 'vllm']
    >>> engine_named("hf").description.split(":")[0]
    'transformers generate per batch'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel.errors import ModelError
from flywheel.models.base import Model
from flywheel.models.local import LocalModel
from flywheel.models.vllm_engine import VllmModel

DEFAULT_ENGINE = "continuous"


@dataclass(frozen=True)
class Engine:
    """One way to generate with a local model: its name, what it is, the options it takes, the
    Python package it needs (None: always here) with the pip extra that brings it, and its builder
    `build(ref, base, adapter, options) -> Model`."""

    name: str
    description: str
    options: frozenset[str]
    build: Callable[[str, str, str | None, dict[str, Any]], Model]
    package: str | None = None
    extra: str | None = None

    def available(self) -> bool:
        """Whether the engine's package is importable here (without importing it)."""
        return self.package is None or importlib.util.find_spec(self.package) is not None


_LOCAL_OPTIONS = frozenset({"dtype", "batch_size", "device", "prefix_cache"})


def _local(decoder: str):
    def build(ref: str, base: str, adapter: str | None, options: dict[str, Any]) -> Model:
        return LocalModel(ref, base, adapter, decoder=decoder, **options)

    return build


def _vllm(ref: str, base: str, adapter: str | None, options: dict[str, Any]) -> Model:
    return VllmModel(ref, base, adapter, **options)


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("continuous", "continuous batching: one running batch that requests join and leave, finished rows "
           "returned as they finish (flywheel.models.decoding)", _LOCAL_OPTIONS, _local("continuous")),
    Engine("hf", "transformers generate per batch: length-sorted fixed batches; compile: true adds a static "
           "KV cache and torch.compile (CUDA graphs on a GPU)", _LOCAL_OPTIONS | {"compile"}, _local("hf")),
    Engine("vllm", "vLLM's offline LLM class in this process, prefix caching on (a GPU; evals and capture)",
           frozenset({"dtype", "batch_size", "device", "prefix_cache", "gpu_memory_utilization", "max_model_len"}),
           _vllm, package="vllm", extra="vllm"),
)}


def engine_named(name: Any, ref: str = "") -> Engine:
    """The engine called `name`, ready to build: ModelError (one line) for an unknown name or an
    engine whose package is not installed, naming the extra that brings it."""
    where = f"{ref}: " if ref else ""
    engine = ENGINES.get(name) if isinstance(name, str) else None
    if engine is None:
        raise ModelError(f"{where}model_options.engine: unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if not engine.available():
        raise ModelError(f"{where}model_options.engine={name} needs the {engine.package} package, not installed "
                         f"here: pip install 'flywheel[{engine.extra}]' (on a machine with a GPU), or use "
                         f"engine {DEFAULT_ENGINE}")
    return engine


def build_local_model(ref: str, base: str, adapter: str | None, options: dict[str, Any]) -> Model:
    """The `local:` text model for `ref` on the engine `options["engine"]` names (default continuous),
    after checking every other option is one that engine takes."""
    options = dict(options)
    engine = engine_named(options.pop("engine", DEFAULT_ENGINE), ref)
    unknown = set(options) - engine.options
    if unknown:
        raise ModelError(f"{ref}: model_options: unknown option(s) for local models on engine {engine.name}: "
                         f"{', '.join(sorted(unknown))} (known: engine, {', '.join(sorted(engine.options))})")
    return engine.build(ref, base, adapter, options)
