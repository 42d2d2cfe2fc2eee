"""Writing a document on a real Valkey: the guard that keeps a document out of a tenant being deleted."""

from __future__ import annotations

import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.tenants import live_guard
from retrieval.errors import WriteRefused
from retrieval.index import ChunkIndex, ChunkRecord, CorpusQuota, DocumentRecord


def _document(number: int) -> tuple[DocumentRecord, list[ChunkRecord]]:
    record = DocumentRecord(id=f"doc_{number:024x}", tenant="acme", title="T", timestamp=1.0, collection="default",
                            chunks=1, created=float(number))
    return record, [ChunkRecord(number=0, text="text", vector=np.ones(4, dtype=np.float32) / 2)]


async def test_a_document_lands_only_while_its_tenant_is_live(redis: Redis) -> None:
    index = ChunkIndex(redis, dimension=4)
    guard = live_guard("acme")
    record, chunks = _document(1)
    with pytest.raises(WriteRefused):  # no tenant record (deleted, its record removed last)
        await index.add_document(record, chunks, guard=guard)
    await redis.hset(guard.key, mapping={"id": '"acme"', "name": '"Acme"'})
    await index.add_document(record, chunks, guard=guard, quota=CorpusQuota(max_documents=5))
    assert await index.get_document("acme", record.id) is not None
    await redis.hset(guard.key, "deleting", "1")  # the tombstone of a delete that has begun
    later, later_chunks = _document(2)
    with pytest.raises(WriteRefused):
        await index.add_document(later, later_chunks, guard=guard, quota=CorpusQuota(max_documents=5))
    assert await index.get_document("acme", later.id) is None
    assert (await index.size("acme")).documents == 1
