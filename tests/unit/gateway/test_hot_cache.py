"""The hot path's key -> tenant cache on a real Valkey: a cached key costs no round trip, a key revoked (or a tenant
tombstoned) through this replica stops at once, one revoked through another replica stops within the TTL, the
cache stays within its bound, and a lookup that raced a revocation does not cache what it read."""

from __future__ import annotations

from redis.asyncio import Redis

from gateway.tenants import KeyCache, TenantStore, hash_key


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _store_with_key(redis: Redis, *, ttl_s: float = 1.0, clock: _Clock | None = None,
                          results: list[str] | None = None) -> tuple[TenantStore, str, str]:
    cache = KeyCache(ttl_s=ttl_s, max_entries=100, clock=clock or _Clock(),
                     observe=results.append if results is not None else None)
    store = TenantStore(redis, key_cache=cache)
    assert await store.create("acme", name="Acme", limits={}) is not None
    made = await store.create_key("acme", name="k")
    assert made is not None
    return store, made[0].key_id, made[1]


async def test_a_cached_key_needs_no_round_trip(redis: Redis) -> None:
    results: list[str] = []
    store, _, key = await _store_with_key(redis, results=results)
    assert await store.authenticate(key) == "acme"
    await redis.flushall()  # nothing left in Redis: only the cache can answer
    assert await store.authenticate(key) == "acme"
    assert results == ["miss", "hit"]


async def test_a_key_revoked_elsewhere_stops_within_the_ttl(redis: Redis) -> None:
    clock = _Clock()
    store, key_id, key = await _store_with_key(redis, ttl_s=1.0, clock=clock)
    other_replica = TenantStore(redis)
    assert await store.authenticate(key) == "acme"
    assert await other_replica.revoke_key("acme", key_id)
    clock.now += 0.9
    assert await store.authenticate(key) == "acme"  # still trusted: within the TTL
    clock.now += 0.1
    assert await store.authenticate(key) is None


async def test_a_key_revoked_or_tombstoned_here_stops_at_once(redis: Redis) -> None:
    store, key_id, key = await _store_with_key(redis)
    assert await store.authenticate(key) == "acme"
    assert await store.revoke_key("acme", key_id)
    assert await store.authenticate(key) is None
    made = await store.create_key("acme", name="second")
    assert made is not None
    assert await store.authenticate(made[1]) == "acme"
    assert await store.begin_delete("acme") is not None
    assert await store.authenticate(made[1]) is None


async def test_unknown_keys_are_not_cached(redis: Redis) -> None:
    store, _, _ = await _store_with_key(redis)
    assert await store.authenticate("bk_" + "x" * 43) is None
    assert len(store.key_cache) == 0


async def test_zero_ttl_checks_every_request(redis: Redis) -> None:
    store, key_id, key = await _store_with_key(redis, ttl_s=0)
    assert await store.authenticate(key) == "acme"
    assert await TenantStore(redis).revoke_key("acme", key_id)
    assert await store.authenticate(key) is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    results: list[str] = []
    cache = KeyCache(ttl_s=10, max_entries=2, clock=_Clock(), observe=results.append)
    cache.put("a", "t1", generation=cache.generation)
    cache.put("b", "t2", generation=cache.generation)
    assert cache.get("a") == "t1"  # "b" is now the least recently used
    cache.put("c", "t3", generation=cache.generation)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == ("t1", "t3")
    assert results.count("evict") == 1


def test_a_lookup_that_raced_a_revocation_is_not_cached() -> None:
    cache = KeyCache(ttl_s=10, max_entries=10, clock=_Clock())
    started = cache.generation  # a lookup reads Redis ...
    cache.drop(hash_key("bk_" + "r" * 43))  # ... while the key is revoked here
    cache.put(hash_key("bk_" + "r" * 43), "acme", generation=started)
    assert cache.get(hash_key("bk_" + "r" * 43)) is None
    cache.drop_tenant("someone")
    cache.put("h", "acme", generation=started)
    assert cache.get("h") is None
