"""The real embedder counts tokens the way it reads them: special tokens included, nothing cut, and
it reads exactly ``max_tokens`` of them (what follows changes nothing; what comes before does)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.embedding import SentenceTransformerEmbedder


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def test_counts_include_the_special_tokens_and_are_never_cut(minilm: SentenceTransformerEmbedder) -> None:
    long = " ".join(f"item{i}" for i in range(400))
    assert minilm.count_tokens(["", "Hello world."]) == [2, 5]  # [CLS] hello world . [SEP]
    assert minilm.count_tokens([long])[0] > 3 * minilm.max_tokens
    assert minilm.count_tokens([]) == []


def test_the_model_reads_exactly_max_tokens(minilm: SentenceTransformerEmbedder) -> None:
    full = " ".join(["river"] * (minilm.max_tokens - 2))  # one token a word: exactly what it reads
    short = " ".join(["river"] * (minilm.max_tokens - 3))
    assert minilm.count_tokens([full, short]) == [minilm.max_tokens, minilm.max_tokens - 1]
    vectors = minilm.embed([short, short + " stone", full, full + " stone"])
    assert not np.allclose(vectors[0], vectors[1], atol=1e-4)  # the last token it reads counts
    np.testing.assert_allclose(vectors[2], vectors[3], atol=1e-5)  # the first one past it does not
