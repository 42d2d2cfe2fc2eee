"""The retrieval service's own checks: validation before any I/O, batched embedding."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.documents import NewDocument
from retrieval.errors import DocumentTooLarge, InvalidDocument, InvalidQuery
from retrieval.service import DocumentService, RetrievalConfig
from tests.unit.retrieval.conftest import HashingEmbedder, UntouchableRedis


def _service(embedder: HashingEmbedder, **config: int) -> DocumentService:
    return DocumentService(UntouchableRedis(), embedder, config=RetrievalConfig(**config))  # type: ignore[arg-type]


async def test_bad_documents_fail_before_embedding_or_redis(embedder: HashingEmbedder) -> None:
    service = _service(embedder, max_document_bytes=1024)
    with pytest.raises(DocumentTooLarge):
        await service.add("acme", NewDocument(text="x" * 1025))
    with pytest.raises(InvalidDocument):
        await service.add("acme", NewDocument(text="ok", timestamp="last tuesday"))
    assert embedder.batches == []


@pytest.mark.parametrize(("query", "top_k", "collection", "param"), [
    ("", 4, None, "query"), ("   ", 4, None, "query"), ("q" * 9000, 4, None, "query"), ("q", 0, None, "top_k"),
    ("q", 21, None, "top_k"), ("q", 4, "bad name", "collection"), ("q", 4, "x}|@tenant:{y", "collection"),
])
async def test_bad_queries_fail_before_embedding_or_redis(embedder: HashingEmbedder, query: str, top_k: int,
                                                          collection: str | None, param: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        await _service(embedder).retrieve("acme", query, top_k=top_k, collection=collection)
    assert info.value.param == param
    assert embedder.batches == []


async def test_embedding_runs_in_batches(embedder: HashingEmbedder) -> None:
    service = _service(embedder, embedding_batch_size=8)
    vectors = await service.embed([f"text {i}" for i in range(20)])
    assert vectors.shape == (20, embedder.dimension)
    assert embedder.batches == [8, 8, 4]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert (await service.embed([])).shape == (0, embedder.dimension)


def test_candidate_depth_grows_with_top_k() -> None:
    config = RetrievalConfig()
    assert config.candidates(1) == 24
    assert config.candidates(20) == 100
