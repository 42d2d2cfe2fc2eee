"""The hot path's caches and their invalidation over pub/sub, on a real Valkey: a key revoked or a version activated
through one replica reaches another replica's caches by message (no TTL wait), a write through a replica drops its
own entry at once, the training worker's plain registry announces too, every (re)subscription clears the caches,
an unsubscribed cache serves nothing older than the short TTL, the caches stay within their bounds, "no such
adapter" is never cached, a broken subscription never reaches a request, and the app runs one subscriber for both
caches (none when ``BANYAN_CACHE_INVALIDATION`` is off)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from adapters.registry import AdapterRegistry, Split, VersionMeta
from gateway.app import build_state, create_app
from gateway.dev.processes import free_port
from gateway.invalidation import Change, Invalidator, TtlCache
from gateway.model_cache import CachedRegistry, ServingCache
from gateway.settings import Settings
from gateway.tenants import KeyCache, TenantStore, hash_key
from tests.unit.gateway.conftest import FakeStore
from tests.unit.retrieval.conftest import HashingEmbedder

WAIT_S = 10.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Events:
    """The subscriber's observer: every event, and a waiter per event."""

    seen: list[str] = field(default_factory=list)
    subscribed_now: bool = False
    _waiters: list[tuple[str, int, asyncio.Event]] = field(default_factory=list)

    def invalidation_event(self, event: str) -> None:
        self.seen.append(event)
        for name, count, done in self._waiters:
            if name == event and self.seen.count(event) >= count:
                done.set()

    def invalidation_subscribed(self, subscribed: bool) -> None:
        self.subscribed_now = subscribed

    async def wait(self, event: str, *, count: int = 1) -> None:
        """Until ``event`` was seen ``count`` times in all."""
        done = asyncio.Event()
        if self.seen.count(event) >= count:
            return
        self._waiters.append((event, count, done))
        await asyncio.wait_for(done.wait(), WAIT_S)


def _meta(version: int) -> VersionMeta:
    return VersionMeta(version=version, uid=f"u{version}", sha256="0" * 64, rank=8, alpha=16.0,
                       target_modules=["q_proj", "v_proj"], size_bytes=1000, created=version)


@dataclass
class _Replica:
    """One gateway's stores and caches, with its subscriber running."""

    tenants: TenantStore
    adapters: CachedRegistry
    events: _Events
    invalidator: Invalidator


@pytest.fixture
async def replicas(valkey_url: str, redis: Redis) -> AsyncIterator[list[_Replica]]:
    made, tasks, clients = [], [], []
    for _ in range(2):
        client = Redis.from_url(valkey_url)
        clients.append(client)
        keys = KeyCache(ttl_s=30, max_entries=100, fallback_ttl_s=1)
        serving = ServingCache(ttl_s=30, max_entries=100, fallback_ttl_s=1)
        events = _Events()
        invalidator = Invalidator(client, [keys, serving], observer=events, heartbeat_s=0.2, retry_s=0.05)
        made.append(_Replica(TenantStore(client, key_cache=keys), CachedRegistry(AdapterRegistry(client), serving),
                             events, invalidator))
        tasks.append(asyncio.create_task(invalidator.run_forever()))
        await events.wait("subscribed")
    yield made
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.aclose()


async def _tenant_with_key(store: TenantStore) -> tuple[str, str]:
    assert await store.create("acme", name="Acme", limits={}) is not None
    made = await store.create_key("acme", name="k")
    assert made is not None
    return made[0].key_id, made[1]


async def test_a_key_revoked_through_one_replica_is_refused_by_the_other_by_message(
        replicas: list[_Replica]) -> None:
    a, b = replicas
    key_id, key = await _tenant_with_key(a.tenants)
    assert await b.tenants.authenticate(key) == "acme"
    assert len(b.tenants.key_cache) == 1  # cached for 30 s
    assert await a.tenants.revoke_key("acme", key_id)
    await b.events.wait("key")
    assert len(b.tenants.key_cache) == 0
    assert await b.tenants.authenticate(key) is None


async def test_a_tombstoned_tenant_is_refused_by_the_other_replica_by_message(replicas: list[_Replica]) -> None:
    a, b = replicas
    _, key = await _tenant_with_key(a.tenants)
    assert await b.tenants.authenticate(key) == "acme"
    assert await a.tenants.begin_delete("acme") is not None
    await b.events.wait("tenant")
    assert await b.tenants.authenticate(key) is None


async def test_an_activation_through_one_replica_is_served_by_the_other_by_message(replicas: list[_Replica]) -> None:
    a, b = replicas
    for v in (1, 2):
        assert await a.adapters.record_version("acme", "pirate", _meta(v), activate=v == 1)
    await b.events.wait("adapter", count=2)
    served = await b.adapters.serving("acme", "pirate")
    assert served is not None and served.active.version == 1
    assert len(b.adapters.cache) == 1
    await a.adapters.activate("acme", "pirate", 2)  # a roll forward
    await b.events.wait("adapter", count=3)
    served = await b.adapters.serving("acme", "pirate")
    assert served is not None and served.active.version == 2
    await a.adapters.activate("acme", "pirate", 2, canary=Split(version=1, percent=10))  # a split begins
    await b.events.wait("adapter", count=4)
    served = await b.adapters.serving("acme", "pirate")
    assert served is not None and served.canary is not None and (served.canary.version, served.percent) == (1, 10)
    await a.adapters.delete("acme", "pirate")
    await b.events.wait("adapter", count=5)
    assert await b.adapters.serving("acme", "pirate") is None


async def test_deleting_a_tenants_adapters_reaches_the_other_replica(replicas: list[_Replica]) -> None:
    a, b = replicas
    for tenant, name in (("acme", "one"), ("acme", "two"), ("other", "one")):
        await a.adapters.record_version(tenant, name, _meta(1), activate=True)
    await b.events.wait("adapter", count=3)
    for tenant, name in (("acme", "one"), ("acme", "two"), ("other", "one")):
        assert await b.adapters.serving(tenant, name) is not None
    assert len(b.adapters.cache) == 3
    await a.adapters.delete_tenant("acme")
    await b.events.wait("adapters")
    assert len(b.adapters.cache) == 1
    assert await b.adapters.serving("acme", "one") is None
    assert await b.adapters.serving("other", "one") is not None


async def test_the_trainers_plain_registry_announces_its_versions(redis: Redis, replicas: list[_Replica]) -> None:
    _, b = replicas
    trainer = AdapterRegistry(redis)  # as adapters.training.worker records a finished job
    await trainer.record_version("acme", "pirate", _meta(1), activate=True)
    await b.events.wait("adapter")
    served = await b.adapters.serving("acme", "pirate")
    assert served is not None and served.active.version == 1
    await trainer.record_version("acme", "pirate", _meta(2), activate=True)
    await b.events.wait("adapter", count=2)
    served = await b.adapters.serving("acme", "pirate")
    assert served is not None and served.active.version == 2


async def test_a_write_through_a_replica_is_seen_there_at_once_without_a_subscriber(redis: Redis) -> None:
    cache = ServingCache(ttl_s=30, max_entries=10, fallback_ttl_s=30)  # nothing subscribed: only the write drops
    registry = CachedRegistry(AdapterRegistry(redis), cache)
    for v in (1, 2):
        await registry.record_version("acme", "pirate", _meta(v), activate=v == 1)
    assert (await registry.serving("acme", "pirate")).active.version == 1  # type: ignore[union-attr]
    await registry.activate("acme", "pirate", 2)
    assert (await registry.serving("acme", "pirate")).active.version == 2  # type: ignore[union-attr]
    await registry.delete("acme", "pirate")
    assert await registry.active_meta("acme", "pirate") is None


async def test_a_cached_active_version_needs_no_round_trip(redis: Redis) -> None:
    results: list[str] = []
    registry = CachedRegistry(AdapterRegistry(redis), ServingCache(ttl_s=30, max_entries=10, observe=results.append))
    await registry.record_version("acme", "pirate", _meta(1), activate=True)
    assert await registry.active_meta("acme", "pirate") is not None
    await redis.flushall()  # nothing left in Redis: only the cache can answer
    meta = await registry.active_meta("acme", "pirate")
    assert meta is not None and meta.version == 1
    assert results == ["miss", "hit"]


async def test_no_such_adapter_is_never_cached_and_cannot_evict_real_entries(redis: Redis) -> None:
    registry = CachedRegistry(AdapterRegistry(redis), ServingCache(ttl_s=30, max_entries=2))
    await registry.record_version("acme", "real", _meta(1), activate=True)
    assert await registry.serving("acme", "real") is not None
    for i in range(50):
        assert await registry.serving("acme", f"random-{i}") is None
    assert len(registry.cache) == 1
    await registry.record_version("acme", "random-0", _meta(1), activate=True)
    assert await AdapterRegistry(redis).serving("acme", "random-0") is not None


async def test_every_resubscription_clears_the_caches(valkey_url: str, redis: Redis,
                                                      replicas: list[_Replica]) -> None:
    a, b = replicas
    _, key = await _tenant_with_key(a.tenants)
    await a.adapters.record_version("acme", "pirate", _meta(1), activate=True)
    await b.events.wait("adapter")
    assert await b.tenants.authenticate(key) == "acme"
    assert await b.adapters.serving("acme", "pirate") is not None
    assert (len(b.tenants.key_cache), len(b.adapters.cache)) == (1, 1)
    subscribed = b.events.seen.count("subscribed")
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # both replicas' subscriptions drop
    await b.events.wait("subscribed", count=subscribed + 1)
    assert (len(b.tenants.key_cache), len(b.adapters.cache)) == (0, 0)
    assert b.events.subscribed_now and b.tenants.key_cache.subscribed
    assert await b.tenants.authenticate(key) == "acme"  # and caching again


def test_an_unsubscribed_cache_serves_nothing_older_than_the_short_ttl() -> None:
    clock = _Clock()
    cache: TtlCache[str, str] = TtlCache(ttl_s=30, max_entries=10, fallback_ttl_s=1, clock=clock)
    cache.subscribed = True
    cache.put("a", "x", generation=cache.generation)
    clock.now += 20
    assert cache.get("a") == "x"  # subscribed: trusted for 30 s
    cache.put("b", "y", generation=cache.generation)
    clock.now += 0.5
    cache.subscribed = False  # the subscription is lost
    assert cache.get("a") is None  # 20.5 s old: beyond the short TTL
    assert cache.get("b") == "y"  # 0.5 s old
    clock.now += 0.5
    assert cache.get("b") is None
    cache.put("c", "z", generation=cache.generation)
    clock.now += 0.9
    assert cache.get("c") == "z"
    clock.now += 0.1
    assert cache.get("c") is None


def test_the_caches_are_bounded_and_count_what_they_drop() -> None:
    results: list[str] = []
    cache = ServingCache(ttl_s=30, max_entries=2, clock=_Clock(), observe=results.append)
    for name in ("a", "b", "c"):
        cache.put(("t", name), object(), generation=cache.generation)  # type: ignore[arg-type]
    assert len(cache) == 2 and results == ["evict"]
    cache.invalidate(Change("adapter", tenant="t", name="b"))
    cache.invalidate(Change("adapter", tenant="t", name="gone"))  # nothing cached: nothing counted
    assert len(cache) == 1 and results == ["evict", "invalidate"]
    cache.clear()
    assert len(cache) == 0 and results == ["evict", "invalidate", "invalidate"]


def test_a_read_that_raced_an_invalidation_is_not_cached() -> None:
    cache = ServingCache(ttl_s=30, max_entries=10)
    started = cache.generation  # a read of Redis begins ...
    cache.invalidate(Change("adapter", tenant="t", name="x"))  # ... and the message of a change arrives
    cache.put(("t", "x"), object(), generation=started)  # type: ignore[arg-type]
    assert len(cache) == 0
    keys = KeyCache(ttl_s=30, max_entries=10)
    started = keys.generation
    keys.invalidate(Change("tenant", tenant="acme"))
    keys.put(hash_key("bk_" + "r" * 43), "acme", generation=started)
    assert len(keys) == 0


def test_messages_round_trip_and_unknown_ones_are_ignored() -> None:
    for change in (Change("key", key_hash="ab" * 32), Change("tenant", tenant="acme"),
                   Change("adapter", tenant="acme", name="pirate-2"), Change("adapters", tenant="acme")):
        assert Change.parse(change.message().encode()) == change
    for raw in (b"adapter acme", b"adapter :x", b"key", b"future-kind acme", b""):
        assert Change.parse(raw) is None
    events = _Events()
    cache = KeyCache(ttl_s=30, max_entries=10)
    cache.put("h", "acme", generation=cache.generation)
    invalidator = Invalidator(Redis(), [cache], observer=events)
    invalidator.apply(b"future-kind acme")
    invalidator.apply(b"tenant acme")
    assert events.seen == ["malformed", "tenant"] and len(cache) == 0


async def test_an_unreachable_redis_never_breaks_the_subscriber(redis: Redis) -> None:
    events = _Events()
    cache = KeyCache(ttl_s=30, max_entries=10, fallback_ttl_s=1)
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    invalidator = Invalidator(dead, [cache], observer=events, retry_s=0.01)
    task = asyncio.create_task(invalidator.run_forever())
    try:
        await events.wait("lost", count=3)  # it keeps retrying
        assert not task.done() and not cache.subscribed and not events.subscribed_now
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dead.aclose()


async def test_the_app_runs_one_subscriber_for_both_caches_and_the_switch_turns_it_off(redis: Redis) -> None:
    settings = Settings(mode="dev", admin_key=SecretStr("adm_" + "x" * 20))
    state = build_state(settings, redis=redis, store=FakeStore(), embedder=HashingEmbedder())
    assert isinstance(state.adapters, CachedRegistry) and state.invalidation is not None
    assert isinstance(state.tenants, TenantStore)
    assert state.invalidation.caches == [state.tenants.key_cache, state.adapters.cache]
    assert state.tenants.key_cache.max_age_s == settings.cache_fallback_ttl_s  # not subscribed yet: the short TTL
    app = create_app(settings, state=state)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(state.invalidation.subscribed.wait(), WAIT_S)
        assert state.tenants.key_cache.max_age_s == settings.key_cache_ttl_s == 30
        assert state.adapters.cache.max_age_s == settings.adapter_cache_ttl_s == 30
        assert state.metrics.registry.get_sample_value("banyan_invalidation_subscribed") == 1
    assert not state.invalidation.subscribed.is_set()  # stopped with the app
    off = build_state(settings.model_copy(update={"cache_invalidation": False}), redis=redis, store=FakeStore(),
                      embedder=HashingEmbedder())
    assert off.invalidation is None and isinstance(off.tenants, TenantStore)
    assert off.tenants.key_cache.max_age_s == 1
