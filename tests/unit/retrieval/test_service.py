"""The retrieval service's own checks: validation before any I/O, batched embedding shared fairly between
tenants, document and chunk quotas checked before embedding."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from gateway.tenants import live_guard
from retrieval.documents import NewDocument
from retrieval.errors import DocumentTooLarge, InvalidDocument, InvalidQuery, QuotaExceeded, RetrievalUnavailable
from retrieval.index import ChunkRecord, CorpusQuota, CorpusSize, DocumentRecord, WriteGuard
from retrieval.service import DocumentService, EmbeddingQueue, RetrievalConfig
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


# -- fair embedding ------------------------------------------------------------------------------


class GatedEmbedder(HashingEmbedder):
    """Each batch announces itself (``started``) and then waits for a permit: the test runs the embedding
    thread one batch at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.started: queue.Queue[list[str]] = queue.Queue()
        self.permits = threading.Semaphore(0)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.started.put(list(texts))
        if not self.permits.acquire(timeout=30):
            raise TimeoutError("the test never let this batch run")
        return super().embed(texts)

    async def next_batch(self) -> list[str]:
        """The texts of the batch the thread starts next (waits for it)."""
        return await asyncio.to_thread(self.started.get, timeout=30)

    def run_one(self) -> None:
        self.permits.release()


async def _queued(embeddings: EmbeddingQueue, texts: int) -> None:
    """Let the tasks just created put their texts in the queue (event-loop turns, no clock)."""
    for _ in range(100):
        if embeddings.waiting() == texts:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{embeddings.waiting()} texts waiting, not {texts}")


@pytest.fixture
def gated() -> Iterator[GatedEmbedder]:
    embedder = GatedEmbedder()
    yield embedder
    embedder.permits.release(1000)  # a failed test must not leave the embedding thread waiting


async def test_a_query_runs_before_a_large_ingestion_of_another_tenant(gated: GatedEmbedder) -> None:
    embeddings = EmbeddingQueue(gated, batch_size=4)
    documents = [asyncio.create_task(embeddings.embed("acme", [f"acme {d} chunk {i}" for i in range(12)]))
                 for d in range(3)]  # 9 batches, as three documents sent at once would queue them
    assert await gated.next_batch() == [f"acme 0 chunk {i}" for i in range(4)]
    await _queued(embeddings, 32)
    query = asyncio.create_task(embeddings.embed("globex", ["where is the parking?"], query=True))
    await _queued(embeddings, 33)
    gated.run_one()
    assert await gated.next_batch() == ["where is the parking?"]  # next, ahead of acme's 8 batches
    gated.run_one()
    assert (await asyncio.wait_for(query, 30)).shape == (1, gated.dimension)
    assert not any(d.done() for d in documents)  # acme's ingestion still runs
    for _ in range(8):
        assert (await gated.next_batch())[0].startswith("acme")
        gated.run_one()
    assert [(await d).shape for d in documents] == [(12, gated.dimension)] * 3


async def test_tenants_ingest_in_turns(gated: GatedEmbedder) -> None:
    embeddings = EmbeddingQueue(gated, batch_size=2)
    large = [asyncio.create_task(embeddings.embed("acme", [f"acme {d} {i}" for i in range(6)])) for d in range(2)]
    assert await gated.next_batch() == ["acme 0 0", "acme 0 1"]
    await _queued(embeddings, 10)
    small = asyncio.create_task(embeddings.embed("globex", ["globex 0", "globex 1", "globex 2"]))
    await _queued(embeddings, 13)
    order = []
    for _ in range(3):
        gated.run_one()
        order.append(await gated.next_batch())
    assert order == [["globex 0", "globex 1"], ["acme 0 2", "acme 0 3"], ["globex 2", "acme 0 4"]]
    gated.run_one()
    assert (await asyncio.wait_for(small, 30)).shape == (3, gated.dimension)
    assert await gated.next_batch() == ["acme 0 5", "acme 1 0"]
    assert not any(d.done() for d in large)
    gated.permits.release(100)
    vectors = await asyncio.gather(*large)
    assert [v.shape for v in vectors] == [(6, gated.dimension)] * 2
    expected = np.vstack([HashingEmbedder().embed([f"acme 1 {i}" for i in range(6)])])
    assert np.allclose(vectors[1], expected)  # rows come back in order, whatever batches they rode in


async def test_a_caller_that_leaves_has_nothing_more_embedded(gated: GatedEmbedder) -> None:
    embeddings = EmbeddingQueue(gated, batch_size=2)
    leaving = asyncio.create_task(embeddings.embed("acme", [f"acme {i}" for i in range(10)]))
    assert await gated.next_batch() == ["acme 0", "acme 1"]
    staying = asyncio.create_task(embeddings.embed("globex", ["globex 0"]))
    await _queued(embeddings, 9)
    leaving.cancel()
    gated.run_one()
    assert await gated.next_batch() == ["globex 0"]
    gated.run_one()
    assert (await asyncio.wait_for(staying, 30)).shape == (1, gated.dimension)
    assert embeddings.waiting() == 0 and gated.started.empty()


async def test_an_embedding_failure_reaches_the_callers_of_its_batch(embedder: HashingEmbedder) -> None:
    class Broken(HashingEmbedder):
        def embed(self, texts: Sequence[str]) -> np.ndarray:
            raise RetrievalUnavailable("no model")

    embeddings = EmbeddingQueue(Broken(), batch_size=4)
    with pytest.raises(RetrievalUnavailable):
        await embeddings.embed("acme", ["a", "b"])
    await embeddings.aclose()
    assert (await EmbeddingQueue(embedder, batch_size=4).embed("acme", ["a"])).shape == (1, embedder.dimension)


# -- document and chunk quotas -------------------------------------------------------------------


class FakeIndex:
    """The index as ``DocumentService.add`` uses it, holding one tenant's counts."""

    def __init__(self, size: CorpusSize) -> None:
        self.held = size
        self.added: list[tuple[DocumentRecord, int, CorpusQuota | None]] = []
        self.guards: list[WriteGuard | None] = []

    async def ensure(self) -> bool:
        return False

    async def size(self, tenant: str) -> CorpusSize:
        return self.held

    async def add_document(self, document: DocumentRecord, chunks: Sequence[ChunkRecord], *,
                           quota: CorpusQuota | None = None, guard: WriteGuard | None = None) -> None:
        self.guards.append(guard)
        if quota is not None:
            quota.check(self.held, adding_chunks=len(chunks))
        self.added.append((document, len(chunks), quota))


def _with_index(embedder: HashingEmbedder, index: FakeIndex, **config: int) -> DocumentService:
    service = _service(embedder, **config)
    service.index = index  # type: ignore[assignment]
    return service


def _paragraphs(count: int) -> str:
    return "\n\n".join(f"Paragraph {i} says something. " * 30 for i in range(count))


async def test_a_document_of_too_many_chunks_is_refused_before_embedding(embedder: HashingEmbedder) -> None:
    index = FakeIndex(CorpusSize(documents=0, chunks=0))
    service = _with_index(embedder, index, max_chunks_per_document=3)
    with pytest.raises(DocumentTooLarge) as info:
        await service.add("acme", NewDocument(text=_paragraphs(6)))
    assert info.value.param == "text" and "chunks" in info.value.message
    assert embedder.batches == [] and index.added == []
    guard = live_guard("acme")
    record = await service.add("acme", NewDocument(text=_paragraphs(2)), guard=guard)
    assert 1 <= record.chunks <= 3 and len(index.added) == 1
    assert index.guards == [guard]  # the write is made under the caller's guard


@pytest.mark.parametrize(("held", "text", "refused"), [
    (CorpusSize(documents=4, chunks=0), "Short.", True),  # the fifth document
    (CorpusSize(documents=3, chunks=10), "Short.", True),  # the eleventh chunk
    (CorpusSize(documents=3, chunks=9), "Short.", False),
])
async def test_a_tenant_over_its_quota_is_refused_before_embedding(embedder: HashingEmbedder, held: CorpusSize,
                                                                  text: str, refused: bool) -> None:
    index = FakeIndex(held)
    service = _with_index(embedder, index, max_documents_per_tenant=4, max_chunks_per_tenant=10)
    if refused:
        with pytest.raises(QuotaExceeded):
            await service.add("acme", NewDocument(text=text))
        assert embedder.batches == [] and index.added == []
    else:
        await service.add("acme", NewDocument(text=text))
        assert index.added[0][2] == CorpusQuota(max_documents=4, max_chunks=10)  # checked again at the write


def test_quota_checks() -> None:
    quota = CorpusQuota(max_documents=2, max_chunks=100)
    quota.check(CorpusSize(documents=1, chunks=60), adding_chunks=40)
    with pytest.raises(QuotaExceeded, match="2 documents"):
        quota.check(CorpusSize(documents=2, chunks=0), adding_chunks=1)
    with pytest.raises(QuotaExceeded, match="100 chunks"):
        quota.check(CorpusSize(documents=0, chunks=60), adding_chunks=41)
    CorpusQuota().check(CorpusSize(documents=10**9, chunks=10**9), adding_chunks=10**9)
