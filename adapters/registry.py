"""The adapter registry in Redis: which versions exist per tenant adapter, and which one is active.

Layout (all keys scoped by tenant, which always comes from the authenticated caller):

- ``banyan:tenant:<tenant>:adapters`` SET of adapter names;
- ``banyan:adapter:<tenant>:<name>`` HASH: ``next`` (version counter), ``active`` (0 = none),
  ``v<N>`` (JSON metadata of version N, written once, never changed).

Versions are numbered by ``HINCRBY`` so concurrent uploads of one name never collide. A version is
recorded only after its files are in object storage: the registry entry is the commit point.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

from redis.asyncio import Redis

from adapters.naming import AdapterRef

_PENDING = "banyan:uploads:pending"


def _pending_member(ref: AdapterRef) -> str:
    return f"{ref.tenant}/{ref.name}/{ref.version}/{ref.uid}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _adapter_key(tenant: str, name: str) -> str:
    return f"banyan:adapter:{tenant}:{name}"


def _names_key(tenant: str) -> str:
    return f"banyan:tenant:{tenant}:adapters"


@dataclass(frozen=True, slots=True)
class VersionMeta:
    version: int
    uid: str
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionMeta:
        data = json.loads(raw)  # keys it does not know are ignored (earlier versions wrote an empty "extra")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    tenant: str
    name: str
    active: int | None
    versions: dict[int, VersionMeta]

    @property
    def active_meta(self) -> VersionMeta | None:
        return self.versions.get(self.active) if self.active else None


# The active version's metadata in one round trip (it is read on every request for an adapter).
_ACTIVE_META = """
local active = redis.call('HGET', KEYS[1], 'active')
if not active or active == '0' then return false end
return redis.call('HGET', KEYS[1], 'v' .. active)
"""


def _record(tenant: str, name: str, hash_: dict[Any, Any]) -> AdapterRecord | None:
    raw = {_text(k): v for k, v in hash_.items()}
    versions = {int(k[1:]): VersionMeta.from_json(v) for k, v in raw.items() if k.startswith("v")}
    if not versions:
        return None
    active = int(raw.get("active") or 0)
    return AdapterRecord(tenant=tenant, name=name, active=active or None, versions=versions)


class AdapterRegistry:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._active_meta: Any = redis.register_script(_ACTIVE_META)

    async def allocate_version(self, tenant: str, name: str) -> int:
        return int(await self._redis.hincrby(_adapter_key(tenant, name), "next", 1))

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool) -> None:
        key = _adapter_key(tenant, name)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, f"v{meta.version}", meta.to_json())
            if activate:
                pipe.hset(key, "active", meta.version)
            else:
                pipe.hsetnx(key, "active", 0)
            pipe.sadd(_names_key(tenant), name)
            await pipe.execute()

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None:
        """The active version of an adapter; None when it does not exist or no version is active."""
        raw = await self._active_meta(keys=[_adapter_key(tenant, name)])
        return VersionMeta.from_json(raw) if raw else None

    async def get(self, tenant: str, name: str) -> AdapterRecord | None:
        return _record(tenant, name, await self._redis.hgetall(_adapter_key(tenant, name)))

    async def names(self, tenant: str) -> list[str]:
        members = await self._redis.smembers(_names_key(tenant))
        return sorted(_text(m) for m in members)

    async def list_records(self, tenant: str) -> list[AdapterRecord]:
        names = await self.names(tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(_adapter_key(tenant, name))
            hashes = await pipe.execute()
        records = [_record(tenant, name, raw) for name, raw in zip(names, hashes, strict=True)]
        return [r for r in records if r is not None]

    async def activate(self, tenant: str, name: str, version: int) -> bool:
        """Make ``version`` active; False when that version does not exist."""
        key = _adapter_key(tenant, name)
        if not await self._redis.hexists(key, f"v{version}"):
            return False
        await self._redis.hset(key, "active", version)
        return True

    async def delete(self, tenant: str, name: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_adapter_key(tenant, name))
            pipe.srem(_names_key(tenant), name)
            await pipe.execute()

    async def mark_pending(self, ref: AdapterRef) -> None:
        """Note an upload whose files are being written: if the process dies before the version is
        recorded, :func:`abandoned` finds it so its files can be removed."""
        await self._redis.zadd(_PENDING, {_pending_member(ref): time.time()})

    async def clear_pending(self, ref: AdapterRef) -> None:
        await self._redis.zrem(_PENDING, _pending_member(ref))

    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]:
        members = await self._redis.zrangebyscore(_PENDING, "-inf", time.time() - older_than_s)
        refs = []
        for member in members:
            tenant, name, version, uid = _text(cast(bytes, member)).split("/")
            refs.append(AdapterRef(tenant, name, int(version), uid))
        return refs

    async def is_recorded(self, ref: AdapterRef) -> bool:
        raw = await self._redis.hget(_adapter_key(ref.tenant, ref.name), f"v{ref.version}")
        return raw is not None and VersionMeta.from_json(raw).uid == ref.uid

    async def delete_tenant(self, tenant: str) -> list[str]:
        names = await self.names(tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.delete(_adapter_key(tenant, name))
            pipe.delete(_names_key(tenant))
            await pipe.execute()
        return names
