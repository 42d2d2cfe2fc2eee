"""Reading a tenant's documents back whole (the source of ``from_documents`` training sets), on a real Valkey:
chunks joined without their overlap, oldest first, one collection, bounded by the document cap, pipelined."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from retrieval.chunking import ChunkingConfig, chunk_document
from retrieval.documents import join_chunks
from retrieval.errors import InvalidQuery
from retrieval.index import ChunkIndex, ChunkRecord, DocumentRecord
from retrieval.service import DocumentService, RetrievalConfig
from tests.unit.retrieval.conftest import HashingEmbedder, WordTokenizer

SMALL = ChunkingConfig(min_tokens=12, target_tokens=16, max_tokens=24, overlap_tokens=10, max_title_tokens=8)


def _prose(tag: str, sentences: int) -> str:
    return " ".join(f"Fact {tag}{i} of the {tag} file is number {i}." for i in range(sentences))


async def _store(index: ChunkIndex, tenant: str, number: int, text: str, *, timestamp: float,
                 collection: str = "default", config: ChunkingConfig = SMALL) -> DocumentRecord:
    chunks = chunk_document(text, title=f"Doc {number}", tokenizer=WordTokenizer(), config=config)
    record = DocumentRecord(id=f"doc_{number:024x}", tenant=tenant, title=f"Doc {number}", timestamp=timestamp,
                            collection=collection, chunks=len(chunks), created=float(number))
    await index.add_document(record, [ChunkRecord(number=n, text=c.text, vector=np.ones(64, dtype=np.float32) / 8)
                                      for n, c in enumerate(chunks)])
    return record


def _service(redis: Redis, **config: Any) -> DocumentService:
    return DocumentService(redis, HashingEmbedder(), config=RetrievalConfig(**config))


def _words(text: str) -> list[str]:
    return text.split()


def test_overlapping_chunks_join_into_the_text_once() -> None:
    text = _prose("a", 12) + "\n\n" + _prose("b", 7) + " Is it over? Then it ended!"
    chunks = [c.text for c in chunk_document(text, title=None, tokenizer=WordTokenizer(), config=SMALL)]
    assert len(chunks) > 4
    assert sum(len(_words(c)) for c in chunks) > len(_words(text))  # the chunks do overlap
    assert _words(join_chunks(chunks)) == _words(text)


def test_a_chunk_that_only_repeats_words_keeps_them() -> None:
    assert join_chunks(["It is late.", "late. Go home."]) == "It is late.\n\nGo home."
    assert join_chunks(["Was it late?", "It is late. Go."]) == "Was it late?\n\nIt is late. Go."


async def test_export_reads_whole_documents_oldest_first(redis: Redis) -> None:
    service = _service(redis)
    texts = {1: _prose("x", 9), 2: "A short one.", 3: _prose("z", 14)}
    await _store(service.index, "acme", 1, texts[1], timestamp=300.0)
    await _store(service.index, "acme", 2, texts[2], timestamp=100.0, collection="notes")
    await _store(service.index, "acme", 3, texts[3], timestamp=200.0)
    await _store(service.index, "other", 4, "Not yours.", timestamp=50.0)
    exported = await service.export("acme")
    assert [d.id for d in exported] == [f"doc_{n:024x}" for n in (2, 3, 1)]
    assert [_words(d.text) for d in exported] == [_words(texts[n]) for n in (2, 3, 1)]
    assert exported[0].title == "Doc 2" and exported[0].timestamp == 100.0 and exported[0].collection == "notes"
    assert [d.id for d in await service.export("acme", collection="notes")] == [f"doc_{2:024x}"]
    assert await service.export("acme", collection="none-here") == []
    assert await service.export("nobody") == []
    with pytest.raises(InvalidQuery):
        await service.export("acme", collection="bad name")


async def test_export_is_bounded_by_the_document_cap(redis: Redis) -> None:
    service = _service(redis, max_documents_per_tenant=3)
    for n in range(5):
        await _store(service.index, "acme", n, f"Document {n}.", timestamp=1000.0 - n)
    exported = await service.export("acme")
    assert len(exported) == 3
    assert {d.text for d in exported} == {"Document 0.", "Document 1.", "Document 2."}  # the first added


async def test_export_reads_in_pipelines_not_per_chunk(redis: Redis) -> None:
    service = _service(redis)
    for n in range(6):
        await _store(service.index, "acme", n, _prose(str(n), 20), timestamp=float(n))
    chunks = sum(r.chunks for r in (await service.index.list_documents("acme", limit=10, after=None))[0])
    assert chunks > 40
    round_trips: list[str] = []
    execute_command, pipeline = redis.execute_command, redis.pipeline

    async def one_command(*args: Any, **options: Any) -> Any:
        round_trips.append(str(args[0]))
        return await execute_command(*args, **options)

    def counted_pipeline(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        async def counted_execute(*a: Any, **k: Any) -> Any:
            round_trips.append("pipeline")
            return await execute(*a, **k)

        pipe.execute = counted_execute  # type: ignore[method-assign]
        return pipe

    redis.execute_command = one_command  # type: ignore[method-assign]
    redis.pipeline = counted_pipeline  # type: ignore[method-assign]
    exported = await service.index.export_documents("acme", collection=None, limit=None, batch=16)
    assert [len(texts) for _, texts in exported] == [r.chunks for r, _ in exported]
    assert round_trips == ["ZRANGE"] + ["pipeline"] * (1 + (chunks + 15) // 16)
