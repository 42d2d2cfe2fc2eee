"""The active-version cache: model resolution of an adapter without a Redis round trip.

:class:`CachedRegistry` is a :class:`adapters.registry.Registry` in front of the real one: ``serving`` (and
``active_meta``, which reads through it) answers from a :class:`ServingCache` of ``(tenant, name) ->``
:class:`~adapters.registry.Serving`; everything else goes straight through, and every write through it drops the
entry it changes at once (this gateway sees its own change immediately). Other writers' changes arrive as
invalidation messages (:mod:`gateway.invalidation`).

Only adapters that exist are cached. "No such adapter" is not: a negative answer costs one round trip on a request
that fails anyway (a 404), while caching it would let
random names from one tenant push real entries out, or need a second bound of its own; and an adapter just
uploaded is served by every gateway on its next request, whether or not its announcement has arrived.

Bound: ``max_entries`` entries. An entry is one or two version records (ids, hash, target module names) plus the
key: measured with ``tracemalloc``, about 1.4 KB (2.3 KB with a split) for an adapter of 7 target modules, so the
default 10,000 entries hold about 14-23 MB.
"""

from __future__ import annotations

from adapters.naming import AdapterRef
from adapters.registry import AdapterRecord, Fence, Registry, Serving, Split, VersionMeta
from gateway.invalidation import Change, TtlCache


class ServingCache(TtlCache[tuple[str, str], Serving]):
    """``(tenant, adapter name)`` -> what serves it, for adapters that have an active version."""

    def drop_tenant(self, tenant: str) -> None:
        self.drop_where(lambda key, _: key[0] == tenant)

    def invalidate(self, change: Change) -> None:
        if change.kind == "adapter":
            self.drop((change.tenant, change.name))
        elif change.kind in ("adapters", "tenant"):
            self.drop_tenant(change.tenant)


class CachedRegistry:
    """``inner`` with ``serving`` answered from ``cache`` (see the module doc)."""

    def __init__(self, inner: Registry, cache: ServingCache) -> None:
        self.inner = inner
        self.cache = cache

    async def serving(self, tenant: str, name: str) -> Serving | None:
        key = (tenant, name)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        generation = self.cache.generation
        found = await self.inner.serving(tenant, name)
        if found is not None:
            self.cache.put(key, found, generation=generation)
        return found

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None:
        serving = await self.serving(tenant, name)
        return serving.active if serving else None

    async def get(self, tenant: str, name: str) -> AdapterRecord | None:
        return await self.inner.get(tenant, name)

    async def list_records(self, tenant: str) -> list[AdapterRecord]:
        return await self.inner.list_records(tenant)

    async def allocate_version(self, tenant: str, name: str) -> int:
        return await self.inner.allocate_version(tenant, name)

    async def activate(self, tenant: str, name: str, version: int, *,
                       canary: Split | None = None) -> AdapterRecord:
        try:
            return await self.inner.activate(tenant, name, version, canary=canary)
        finally:
            self.cache.drop((tenant, name))

    async def delete(self, tenant: str, name: str) -> list[VersionMeta]:
        try:
            return await self.inner.delete(tenant, name)
        finally:
            self.cache.drop((tenant, name))

    async def delete_tenant(self, tenant: str) -> list[str]:
        try:
            return await self.inner.delete_tenant(tenant)
        finally:
            self.cache.drop_tenant(tenant)

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool,
                             fence: Fence | None = None) -> bool:
        try:
            return await self.inner.record_version(tenant, name, meta, activate=activate, fence=fence)
        finally:
            self.cache.drop((tenant, name))

    async def mark_pending(self, ref: AdapterRef) -> None:
        await self.inner.mark_pending(ref)

    async def clear_pending(self, ref: AdapterRef) -> None:
        await self.inner.clear_pending(ref)

    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]:
        return await self.inner.abandoned(older_than_s=older_than_s)

    async def is_recorded(self, ref: AdapterRef) -> bool:
        return await self.inner.is_recorded(ref)
