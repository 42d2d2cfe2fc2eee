"""Bulk import records and runs on a real throwaway Valkey: progress, paging, bounded concurrency, and taking over an
unfinished import after its gateway died without importing anything twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from adapters.imports import (
    MAX_ATTEMPTS,
    ImportItem,
    ImportRunner,
    ImportStore,
    ItemDone,
    ItemFailed,
    ItemResult,
    failure,
)
from adapters.naming import AdapterRef
from adapters.store import SourceCredentials

CREDENTIALS = SourceCredentials(access_key_id="AKIA-test", secret_access_key=SecretStr("s3cr3t-value"))


@dataclass
class FakeWorker:
    """Imports by counting: each run notes a version and records it (the registry), unless the name says ``bad``."""

    recorded: set[AdapterRef] = field(default_factory=set)
    runs: list[tuple[str, str]] = field(default_factory=list)
    credentials_seen: list[SourceCredentials | None] = field(default_factory=list)
    gate: asyncio.Event | None = None
    in_flight: int = 0
    most_in_flight: int = 0
    two_running: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, item: ImportItem, *, credentials: SourceCredentials | None,
                  note: Callable[[AdapterRef], Awaitable[None]]) -> ItemDone:
        self.runs.append((item.tenant, item.name))
        self.credentials_seen.append(credentials)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= 2:
            self.two_running.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if item.name.startswith("bad"):
                raise ItemFailed(failure(f"{item.source} is not an adapter", code="invalid_adapter"))
            version = 1 + sum(r.tenant == item.tenant and r.name == item.name for r in self.recorded)
            ref = AdapterRef(item.tenant, item.name, version, f"uid{version:09d}")
            await note(ref)
            self.recorded.add(ref)
            return ItemDone(version=version, active=item.activate)
        finally:
            self.in_flight -= 1

    async def landed(self, ref: AdapterRef) -> bool:
        return ref in self.recorded


def _items(count: int, *, bad: tuple[int, ...] = ()) -> list[ImportItem]:
    return [ImportItem(tenant=f"t{i % 3}", name=("bad" if i in bad else "user") + f"-{i}",
                       source=f"s3://src/{i}/") for i in range(count)]


@pytest.fixture
def store(redis: Redis) -> ImportStore:
    return ImportStore(redis, retention_s=3600)


async def test_an_import_runs_every_item_and_records_each_result(store: ImportStore, redis: Redis) -> None:
    runner, worker = ImportRunner(store, concurrency=3), FakeWorker()
    record = await runner.submit(_items(12, bad=(4, 9)), worker, credentials=None)
    assert (record.status, record.total, record.pending, record.credentials) == ("in_progress", 12, 12, "gateway")
    await runner.wait(record.id)

    done = await store.get(record.id)
    assert done is not None and (done.status, done.succeeded, done.failed, done.pending) == ("completed", 10, 2, 0)
    assert done.finished is not None and await store.unfinished() == []
    page = await store.page(record.id, after=-1, limit=5)
    assert [i for i, _, _ in page.items] == [0, 1, 2, 3, 4] and page.has_more
    assert page.items[4][2].status == "failed" and page.items[4][2].error["code"] == "invalid_adapter"  # type: ignore[index]
    assert page.items[0][2] == ItemResult(status="succeeded", attempts=1, version=1, active=True)
    last = await store.page(record.id, after=9, limit=5)
    assert [i for i, _, _ in last.items] == [10, 11] and not last.has_more
    failed = await store.page(record.id, after=-1, limit=1, failed_only=True)
    assert [i for i, _, _ in failed.items] == [4] and failed.has_more
    assert [i for i, _, _ in (await store.page(record.id, after=4, limit=5, failed_only=True)).items] == [9]
    assert 0 < await redis.ttl(f"banyan:import:{record.id}:results") <= 3600  # finished records expire
    assert sorted(worker.runs) == sorted((i.tenant, i.name) for i in _items(12, bad=(4, 9)))


async def test_items_in_flight_are_bounded(store: ImportStore) -> None:
    worker = FakeWorker(gate=asyncio.Event())
    runner = ImportRunner(store, concurrency=2)
    record = await runner.submit(_items(8), worker, credentials=None)
    await asyncio.wait_for(worker.two_running.wait(), timeout=10)
    assert worker.in_flight == 2
    assert worker.gate is not None
    worker.gate.set()
    await runner.wait(record.id)
    assert worker.most_in_flight == 2 and len(worker.runs) == 8


async def test_the_request_credentials_reach_the_worker_and_are_never_stored(store: ImportStore,
                                                                             redis: Redis) -> None:
    runner, worker = ImportRunner(store), FakeWorker()
    record = await runner.submit(_items(3), worker, credentials=CREDENTIALS)
    await runner.wait(record.id)
    assert worker.credentials_seen == [CREDENTIALS] * 3
    assert (await store.get(record.id)).credentials == "request"  # type: ignore[union-attr]
    for key in await redis.keys("banyan:import*"):
        raw_kind = await redis.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
        dump = str(await {"hash": redis.hgetall, "list": lambda k: redis.lrange(k, 0, -1),
                          "zset": lambda k: redis.zrange(k, 0, -1), "set": redis.smembers,
                          "string": redis.get}[kind](key))
        assert "s3cr3t" not in dump and "AKIA" not in dump


async def _crashed_import(store: ImportStore, items: list[ImportItem], *, with_credentials: bool = False) -> str:
    """An import whose gateway ('dead') finished item 0, had noted a version for items 1 and 2, then died."""
    record = await store.create(items, with_credentials=with_credentials, owner="dead", lease_s=60)
    assert await store.start_item(record.id, 0, owner="dead") == 1
    await store.finish_item(record.id, 0, ItemResult(status="succeeded", attempts=1, version=1))
    for index in (1, 2):
        assert await store.start_item(record.id, index, owner="dead") == 1
        assert await store.note(record.id, index, AdapterRef(items[index].tenant, items[index].name, 7, "uid000000007"),
                                owner="dead")
    await store.release(record.id, owner="dead")  # its lease lapses
    return record.id


async def test_a_gateway_that_starts_resumes_an_unfinished_import_without_importing_twice(store: ImportStore) -> None:
    items = _items(6)
    import_id = await _crashed_import(store, items)
    worker = FakeWorker(recorded={AdapterRef(items[1].tenant, items[1].name, 7, "uid000000007")})  # 1 landed, 2 not
    runner = ImportRunner(store)
    assert await runner.resume_once(worker) == [import_id]
    await runner.wait(import_id)

    assert sorted(worker.runs) == sorted((i.tenant, i.name) for i in items[2:])  # items 0 and 1 were done
    record = await store.get(import_id)
    assert record is not None and (record.status, record.succeeded, record.failed) == ("completed", 6, 0)
    results = {i: r for i, _, r in (await store.page(import_id, after=-1, limit=10)).items}
    assert (results[1].version, results[1].attempts) == (7, 1)
    assert results[2].attempts == 2 and results[2].version == 1
    assert await runner.resume_once(worker) == []  # finished: nothing to take over


async def test_an_import_another_gateway_runs_is_left_alone(store: ImportStore) -> None:
    record = await store.create(_items(2), with_credentials=False, owner="alive", lease_s=60)
    runner, worker = ImportRunner(store), FakeWorker()
    assert await runner.resume_once(worker) == []
    assert await store.start_item(record.id, 0, owner=runner.owner) == -1  # not its lease: it may not start items
    assert worker.runs == []


async def test_an_import_whose_credentials_died_with_its_gateway_is_interrupted(store: ImportStore) -> None:
    items = _items(4)
    import_id = await _crashed_import(store, items, with_credentials=True)
    worker = FakeWorker(recorded={AdapterRef(items[1].tenant, items[1].name, 7, "uid000000007")})
    runner = ImportRunner(store)
    await runner.resume_once(worker)
    await runner.wait(import_id)
    assert worker.runs == []  # nothing can be read without the credentials
    record = await store.get(import_id)
    assert record is not None and (record.status, record.succeeded, record.failed) == ("interrupted", 2, 2)
    results = {i: r for i, _, r in (await store.page(import_id, after=-1, limit=10)).items}
    assert [results[i].status for i in range(4)] == ["succeeded", "succeeded", "failed", "failed"]
    assert results[3].error is not None and results[3].error["code"] == "credentials_unavailable"


async def test_an_item_its_gateways_keep_dying_on_fails_instead_of_looping(store: ImportStore) -> None:
    record = await store.create(_items(1), with_credentials=False, owner="dead", lease_s=60)
    for _ in range(MAX_ATTEMPTS):
        assert await store.start_item(record.id, 0, owner="dead") == 1
    await store.release(record.id, owner="dead")
    runner, worker = ImportRunner(store), FakeWorker()
    await runner.resume_once(worker)
    await runner.wait(record.id)
    assert worker.runs == []
    page = await store.page(record.id, after=-1, limit=1)
    assert page.items[0][2].status == "failed" and page.items[0][2].error["code"] == "import_interrupted"  # type: ignore[index]


async def test_a_result_is_final_once_written(store: ImportStore) -> None:
    record = await store.create(_items(2), with_credentials=False, owner="me", lease_s=60)
    written, progress = await store.finish_item(record.id, 0, ItemResult(status="succeeded", version=1))
    assert written and (progress.succeeded, progress.failed) == (1, 0)
    written, progress = await store.finish_item(record.id, 0, ItemResult(status="failed", error={"code": "x"}))
    assert not written and (progress.succeeded, progress.failed) == (1, 0)
    assert await store.start_item(record.id, 0, owner="me") == 0
