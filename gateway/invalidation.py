"""The hot path's in-process caches, and their invalidation across gateway replicas over Redis pub/sub.

Two caches save the request path its Redis round trips: API key -> tenant (:class:`gateway.tenants.KeyCache`) and
an adapter's active version and split (:class:`gateway.model_cache.ServingCache`). Both are a :class:`TtlCache`:
a bounded LRU whose entries are trusted for ``ttl_s`` (long, e.g. 30 s) while this gateway's subscriber is
connected, and for ``fallback_ttl_s`` (short, e.g. 1 s) while it is not.

Every write that changes what one of them holds publishes a :class:`Change` on :data:`CHANNEL` after it commits,
in the same atomic step as the write (the ``PUBLISH`` is inside its Lua script or its ``MULTI`` pipeline, so no
extra round trip): a key revoked (``key <sha256>``), a tenant tombstoned (``tenant <id>``), an adapter version
recorded, activated, rolled back, its split changed or the adapter deleted (``adapter <tenant>:<name>``), all of
a tenant's adapters deleted (``adapters <tenant>``). Writers that are not gateways (the training worker recording a
version) publish through the same scripts.

Each gateway runs one :class:`Invalidator` task: it subscribes, and applies every message to its caches. Pub/sub
is fire-and-forget, so:

- on every (re)subscription it clears every cache first (messages may have been missed while it was away), and
  only then trusts entries for the long TTL;
- while it is not subscribed (not yet, or the connection broke) the caches serve nothing older than the short
  TTL; a connection that stays open but stops answering is noticed by a heartbeat (a ``PING`` on the subscription
  every ``heartbeat_s``; nothing heard for ``3 * heartbeat_s`` counts as a lost connection);
- a subscriber failure is logged and retried; it never reaches a request.

The guarantee: a change made through any gateway (or the trainer) reaches every gateway within the pub/sub delay
(``loadtests/invalidation_probe.py`` measures it), and within the short TTL (plus the heartbeat's detection time,
when the connection dies silently) when messages are lost; the gateway that made the change drops its own entry
at once. A read of Redis that started before an invalidation is never cached after it (the caches'
``generation``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from redis.asyncio import Redis

from adapters.registry import CHANGES_CHANNEL

log = logging.getLogger("banyan.invalidation")

CHANNEL = CHANGES_CHANNEL
"""The one pub/sub channel of cache invalidations."""

KINDS = ("key", "tenant", "adapter", "adapters")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change a cache may hold a stale copy of."""

    kind: str
    """``key`` (``key_hash``), ``tenant`` (tombstoned: its keys and adapters), ``adapter`` (``tenant``'s adapter
    ``name``), ``adapters`` (every adapter of ``tenant``)."""
    tenant: str = ""
    name: str = ""
    key_hash: str = ""

    def message(self) -> str:
        if self.kind == "key":
            return f"key {self.key_hash}"
        if self.kind == "adapter":
            return f"adapter {self.tenant}:{self.name}"
        return f"{self.kind} {self.tenant}"

    @classmethod
    def parse(cls, raw: bytes | str) -> Change | None:
        """The change a message announces; None for one this version does not know (a newer writer's)."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        kind, _, arg = text.partition(" ")
        if not arg:
            return None
        if kind == "key":
            return cls(kind, key_hash=arg)
        if kind == "adapter":
            tenant, sep, name = arg.partition(":")
            return cls(kind, tenant=tenant, name=name) if sep and tenant and name else None
        if kind in ("tenant", "adapters"):
            return cls(kind, tenant=arg)
        return None


class TtlCache(Generic[K, V]):
    """A bounded LRU of ``max_entries`` entries, each trusted for ``ttl_s`` seconds while :attr:`subscribed` (the
    invalidation subscriber is connected) and for ``min(ttl_s, fallback_ttl_s)`` while not (``fallback_ttl_s``
    None: always ``ttl_s``, for a cache nothing invalidates). ``observe`` is told every ``hit``, ``miss``,
    ``evict`` (the bound) and ``invalidate`` (an entry dropped by a change or a clear)."""

    def __init__(self, *, ttl_s: float, max_entries: int, fallback_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, observe: Callable[[str], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self.fallback_ttl_s = fallback_ttl_s
        self._max = max_entries
        self._clock = clock
        self._observe = observe or (lambda result: None)
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.subscribed = False
        """Set by the :class:`Invalidator` while its subscription is live (after clearing this cache)."""
        self.generation = 0
        """Bumped by every drop: a read that started before an invalidation does not cache what it read."""

    @property
    def max_age_s(self) -> float:
        """How old an entry may be and still be served, now."""
        if self.subscribed or self.fallback_ttl_s is None:
            return self.ttl_s
        return min(self.ttl_s, self.fallback_ttl_s)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry[1] >= self.max_age_s:
            if entry is not None:
                del self._entries[key]
            self._observe("miss")
            return None
        self._entries.move_to_end(key)
        self._observe("hit")
        return entry[0]

    def put(self, key: K, value: V, *, generation: int) -> None:
        """Cache what a read that started at ``generation`` found (nothing if something was dropped since)."""
        if self.ttl_s <= 0 or self._max <= 0 or generation != self.generation:
            return
        self._entries[key] = (value, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self._observe("evict")

    def drop(self, key: K) -> None:
        self.generation += 1
        if self._entries.pop(key, None) is not None:
            self._observe("invalidate")

    def drop_where(self, matches: Callable[[K, V], bool]) -> None:
        self.generation += 1
        for key in [k for k, (v, _) in self._entries.items() if matches(k, v)]:
            del self._entries[key]
            self._observe("invalidate")

    def clear(self) -> None:
        self.generation += 1
        for _ in range(len(self._entries)):
            self._observe("invalidate")
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Invalidated(Protocol):
    """A cache the :class:`Invalidator` keeps: told whether its subscription is live, cleared on every
    (re)subscription, and given every change."""

    subscribed: bool

    def clear(self) -> None: ...
    def invalidate(self, change: Change) -> None: ...


class InvalidationObserver(Protocol):
    """What the subscriber reports (:class:`gateway.metrics.Metrics`)."""

    def invalidation_event(self, event: str) -> None: ...
    def invalidation_subscribed(self, subscribed: bool) -> None: ...


class _Stale(ConnectionError):
    """Nothing heard on the subscription for too long."""


class Invalidator:
    """The one subscriber of a gateway: applies every :data:`CHANNEL` message to ``caches``; see the module doc."""

    def __init__(self, redis: Redis, caches: Sequence[Invalidated], *, heartbeat_s: float = 1.0,
                 retry_s: float = 0.5, observer: InvalidationObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self.caches = list(caches)
        self._heartbeat_s = heartbeat_s
        self._retry_s = retry_s
        self._observer = observer
        self._clock = clock
        self.subscribed = asyncio.Event()
        """Set while the subscription is live (the caches were cleared when it began)."""

    def _event(self, event: str) -> None:
        if self._observer is not None:
            self._observer.invalidation_event(event)

    def _set_subscribed(self, subscribed: bool) -> None:
        if subscribed:
            for cache in self.caches:
                cache.clear()  # what was missed while away is unknown: start over
                cache.subscribed = True
            self.subscribed.set()
        else:
            for cache in self.caches:
                cache.subscribed = False
            self.subscribed.clear()
        if self._observer is not None:
            self._observer.invalidation_subscribed(subscribed)

    def apply(self, raw: bytes | str) -> None:
        """Apply one message to every cache."""
        change = Change.parse(raw)
        if change is None:
            self._event("malformed")
            return
        self._event(change.kind)
        for cache in self.caches:
            cache.invalidate(change)

    def handle(self, message: dict[str, Any]) -> None:
        """One item the subscription delivered (a confirmation, a message, a heartbeat's answer)."""
        kind = message.get("type")
        if kind == "subscribe":
            self._set_subscribed(True)
            self._event("subscribed")
        elif kind == "message":
            self.apply(message["data"])

    async def run_forever(self) -> None:
        """Subscribe and apply messages until cancelled; after a failure, fall back to the short TTL and retry."""
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                self._set_subscribed(False)
                raise
            except Exception as e:  # a Redis outage: the caches fall back to the short TTL, requests go on
                if self.subscribed.is_set():
                    log.warning("the cache invalidation subscription was lost: %s %s", type(e).__name__, e)
                self._event("lost")
            self._set_subscribed(False)
            await asyncio.sleep(self._retry_s)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            last_heard = last_ping = self._clock()
            while True:
                message = await pubsub.get_message(timeout=self._heartbeat_s)
                now = self._clock()
                if message is not None:
                    last_heard = now
                    self.handle(message)
                if now - last_heard > 3 * self._heartbeat_s:
                    raise _Stale(f"nothing heard for {now - last_heard:.1f} s")
                if now - last_ping >= self._heartbeat_s:
                    await pubsub.ping()
                    last_ping = now
        finally:
            try:
                await pubsub.aclose()
            except Exception:  # the connection is gone already
                log.debug("closing the invalidation subscription failed", exc_info=True)
