"""The index's vector type (FLOAT16 or FLOAT32): how vectors are encoded and read back, an index of the other type
refused at start, and bulk writes (``add_documents``) storing what ``add_document`` stores. On a real Valkey with
the search module (a throwaway server on a free loopback port, per module)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.dev.processes import free_port
from gateway.dev.stack import search_module
from retrieval.index import (
    VECTOR_TYPES,
    ChunkIndex,
    ChunkRecord,
    DocumentRecord,
    IndexMismatch,
    decode_vector,
    encode_vector,
)
from retrieval.service import DocumentService, RetrievalConfig
from tests.unit.conftest import throwaway_valkey
from tests.unit.retrieval.conftest import HashingEmbedder

DIM = 16


@pytest.fixture(scope="module")
def search_url() -> Iterator[str]:
    yield from throwaway_valkey("--loadmodule", str(search_module()))


@pytest.fixture
async def search(search_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(search_url)
    await client.flushdb()
    for name in await client.execute_command("FT._LIST"):
        await client.execute_command("FT.DROPINDEX", name)
    yield client
    await client.aclose()


def _unit(seed: int, n: int = 1) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _document(number: int, *, tenant: str = "acme", chunks: int = 2,
              title: str = "Quarterly report") -> tuple[DocumentRecord, list[ChunkRecord]]:
    record = DocumentRecord(id=f"doc_{number:024x}", tenant=tenant, title=title, timestamp=1.7e9 + number,
                            collection="default" if number % 2 else "notes", chunks=chunks, created=float(number))
    vectors = _unit(number, chunks)
    texts = [f"alpha beta gamma{number} delta{j} shared words here" for j in range(chunks)]
    return record, [ChunkRecord(number=j, text=texts[j], vector=vectors[j]) for j in range(chunks)]


# -- encoding ---------------------------------------------------------------------------------------


def test_float16_takes_half_the_bytes_and_reads_back_within_half_precision() -> None:
    vector = _unit(1)[0]
    half, full = encode_vector(vector, "FLOAT16"), encode_vector(vector, "FLOAT32")
    assert len(half) == 2 * DIM and len(full) == 4 * DIM
    assert half == vector.astype("<f2").tobytes()  # little-endian IEEE half, as the search module reads it
    back = decode_vector(half, "FLOAT16", DIM)
    assert back is not None and back.dtype == np.float32
    assert np.max(np.abs(back - vector)) < 1e-3
    assert float(back @ vector) / float(np.linalg.norm(back)) > 0.99999  # the direction is what cosine reads
    exact = decode_vector(full, "FLOAT32", DIM)
    assert exact is not None and np.array_equal(exact, vector)


def test_bytes_of_the_other_type_or_size_are_not_read_as_a_vector() -> None:
    vector = _unit(2)[0]
    assert decode_vector(encode_vector(vector, "FLOAT32"), "FLOAT16", DIM) is None  # twice the bytes expected
    assert decode_vector(encode_vector(vector, "FLOAT16"), "FLOAT32", DIM) is None  # half
    assert decode_vector(b"", "FLOAT16", DIM) is None


def test_an_unknown_vector_type_is_refused() -> None:
    with pytest.raises(ValueError, match="FLOAT16"):
        ChunkIndex(Redis(), dimension=DIM, vector_type="BFLOAT16")
    assert set(VECTOR_TYPES) == {"FLOAT16", "FLOAT32"}


# -- the index in Redis -----------------------------------------------------------------------------


@pytest.mark.parametrize("vector_type", ["FLOAT16", "FLOAT32"])
async def test_chunks_are_indexed_and_found_in_either_type(search: Redis, vector_type: str) -> None:
    index = ChunkIndex(search, dimension=DIM, vector_type=vector_type)
    assert await index.ensure()
    assert await index.vector_field() == (vector_type, DIM)
    for number in range(1, 6):
        await index.add_document(*_document(number))
    info = await search.execute_command("FT.INFO", index.name)
    assert int(info[b"num_docs"]) == 10 and int(info[b"hash_indexing_failures"]) == 0
    record, chunks = _document(3)
    hits = await index.knn("acme", chunks[1].vector, k=3, collection=None, policy="ADHOC_BF")
    assert (hits[0].document_id, hits[0].number) == (record.id, 1)
    assert np.max(np.abs(hits[0].vector - chunks[1].vector)) < (1e-3 if vector_type == "FLOAT16" else 1e-7)
    stored = await search.hget(index.chunk_key("acme", record.id, 1), "embedding")
    assert stored is not None and len(stored) == DIM * VECTOR_TYPES[vector_type].itemsize


async def test_an_index_of_the_other_type_is_refused_naming_the_setting(search: Redis) -> None:
    assert await ChunkIndex(search, dimension=DIM, vector_type="FLOAT32").ensure()
    await ChunkIndex(search, dimension=DIM, vector_type="FLOAT32").add_document(*_document(1))
    with pytest.raises(IndexMismatch) as refused:
        await ChunkIndex(search, dimension=DIM, vector_type="FLOAT16").ensure()
    assert "BANYAN_RETRIEVAL_VECTOR_TYPE=FLOAT32" in refused.value.message
    assert "stores FLOAT32 vectors" in refused.value.message
    # Nothing was changed: the index is still FLOAT32 and holds its chunks.
    assert await ChunkIndex(search, dimension=DIM, vector_type="FLOAT32").vector_field() == ("FLOAT32", DIM)
    info = await search.execute_command("FT.INFO", "banyan-chunks")
    assert int(info[b"num_docs"]) == 2
    assert not await ChunkIndex(search, dimension=DIM, vector_type="FLOAT32").ensure()  # the same type: fine


async def test_an_index_of_another_dimension_is_refused(search: Redis) -> None:
    assert await ChunkIndex(search, dimension=DIM, vector_type="FLOAT16").ensure()
    with pytest.raises(IndexMismatch, match="dimension 16"):
        await ChunkIndex(search, dimension=32, vector_type="FLOAT16").ensure()


async def test_the_service_refuses_to_start_on_a_mismatched_index(search: Redis) -> None:
    embedder = HashingEmbedder(dimension=DIM)
    await DocumentService(search, embedder, config=RetrievalConfig(vector_type="FLOAT32")).start()
    service = DocumentService(search, embedder, config=RetrievalConfig(vector_type="FLOAT16"))
    with pytest.raises(IndexMismatch, match="BANYAN_RETRIEVAL_VECTOR_TYPE"):
        await service.start()
    await service.aclose()


async def test_a_redis_outage_at_start_is_still_only_logged(search_url: str) -> None:
    # The refusal above is for a mismatch only: an unreachable Redis must not stop the gateway starting.
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    service = DocumentService(unreachable, HashingEmbedder(dimension=DIM))
    await service.start()
    await service.aclose()
    await unreachable.aclose()


async def test_bulk_writes_store_exactly_what_single_writes_store(search: Redis) -> None:
    single = ChunkIndex(search, name="single", prefix="one", dimension=DIM)
    bulk = ChunkIndex(search, name="bulk", prefix="two", dimension=DIM)
    await single.ensure()
    await bulk.ensure()
    documents = [_document(n, tenant="acme" if n < 5 else "beta", chunks=1 + n % 3) for n in range(1, 9)]
    for record, chunks in documents:
        await single.add_document(record, chunks)
    await bulk.add_documents(documents[:3])
    await bulk.add_documents(documents[3:])

    async def contents(prefix: str) -> dict[str, object]:
        out: dict[str, object] = {}
        async for key in search.scan_iter(match=f"{prefix}:*"):
            name = key.decode().removeprefix(f"{prefix}:")
            kind = await search.type(key)
            out[name] = (await search.hgetall(key) if kind in (b"hash", "hash")
                         else await search.zrange(key, 0, -1, withscores=True))
        return out

    one, two = await contents("one"), await contents("two")
    assert one == two
    assert one["stats:acme"] == {b"chunks": b"8", b"chunks:default": b"3", b"chunks:notes": b"5"}
    assert one["df:beta"][b"shared"] == b"9"  # type: ignore[index]
    assert (await bulk.size("beta")).chunks == 9
