"""A small deterministic embedder behind the ``Embedder`` seam (bag of hashed words; a token is a word
or a punctuation mark, plus two special tokens, and it reads 256), and a Redis stand-in that fails the
test if anything touches it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Counts like a WordPiece tokenizer would on a text made of short common words."""

    def __init__(self, max_tokens: int = 256) -> None:
        self.max_tokens = max_tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(_TOKEN_RE.findall(text)) + 2 for text in texts]


class HashingEmbedder(WordTokenizer):
    """Each word adds a fixed pseudo-random direction: texts sharing words are similar."""

    def __init__(self, dimension: int = 64) -> None:
        super().__init__()
        self.dimension = dimension
        self.batches: list[int] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(len(texts))
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                rows[i] += np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
            norm = np.linalg.norm(rows[i])
            rows[i] = rows[i] / norm if norm else rows[i]
        return rows


class UntouchableRedis:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was used ({name}) where validation should have failed first")


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder()
