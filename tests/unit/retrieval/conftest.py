"""A small deterministic embedder behind the ``Embedder`` seam (bag of hashed words), and a Redis
stand-in that fails the test if anything touches it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest


class HashingEmbedder:
    """Each word adds a fixed pseudo-random direction: texts sharing words are similar."""

    def __init__(self, dimension: int = 64) -> None:
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
