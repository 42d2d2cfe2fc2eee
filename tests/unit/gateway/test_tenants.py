"""Paging the tenants on a real Valkey: pages by id with ``after`` and ``has_more``, a constant number of round trips
whatever the number of tenants, deleted tenants gone from the pages, and ids stored before paging existed found."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from gateway.tenants import TenantStore


async def _pages(store: TenantStore, *, limit: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        tenants, more = await store.list_tenants(limit=limit, after=after)
        pages.append([t.id for t in tenants])
        if not more:
            return pages
        after = tenants[-1].id


async def test_tenants_page_by_id(redis: Redis) -> None:
    store = TenantStore(redis)
    for tenant_id in ("delta", "alpha", "charlie", "bravo", "echo"):
        assert await store.create(tenant_id, name=tenant_id, limits={}) is not None
    assert await _pages(store, limit=2) == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]
    assert await _pages(store, limit=5) == [["alpha", "bravo", "charlie", "delta", "echo"]]
    assert await store.list_tenants(limit=3, after="echo") == ([], False)
    await store.begin_delete("bravo")
    assert [(t.id, t.deleting) for t in (await store.list_tenants(limit=2))[0]] == [("alpha", False), ("bravo", True)]
    await store.finish_delete("bravo")
    assert await _pages(store, limit=2) == [["alpha", "charlie"], ["delta", "echo"]]


async def test_a_page_is_two_round_trips_however_many_tenants(redis: Redis) -> None:
    store = TenantStore(redis)
    for i in range(300):
        await store.create(f"t{i:03d}", name="x", limits={})
    calls: list[Any] = []
    original = redis.connection_pool.get_connection

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await original(*args, **kwargs)

    redis.connection_pool.get_connection = counting  # type: ignore[method-assign]
    tenants, more = await store.list_tenants(limit=200, after="t050")
    assert (tenants[0].id, tenants[-1].id, len(tenants), more) == ("t051", "t250", 200, True)
    assert len(calls) == 2


async def test_ids_stored_before_the_ordered_index_are_paged(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.create("new", name="new", limits={})
    for old in ("old-a", "old-b"):  # as a gateway without paging wrote them
        await redis.sadd("banyan:tenants", old)
        await redis.hset(f"banyan:tenant:{old}", mapping={"id": f'"{old}"', "name": f'"{old}"', "created": "1"})
    await redis.zadd("banyan:tenant_ids", {"gone": 0})  # deleted by such a gateway: in the index only
    assert await _pages(store, limit=2) == [["new", "old-a"], ["old-b"]]
    assert await redis.zcard("banyan:tenant_ids") == 3
