"""Tenants and their API keys, in Redis.

Keys look like ``bk_<random>``; only their SHA-256 is stored (they carry 256 bits of randomness, so an
unsalted hash is enough and lets a lookup be one GET). Layout:

- ``banyan:tenants`` SET of tenant ids; ``banyan:tenant:<id>`` HASH of the tenant's fields;
- ``banyan:tenant:<id>:keys`` HASH key_id -> JSON (name, created, hash); ``banyan:keyhash:<sha256>``
  STRING "<tenant>:<key_id>", the lookup used on every request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

KEY_PREFIX = "bk_"
_TENANT_FIELDS = ("rpm", "tpm", "max_concurrency")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 128 and value[3:].replace("-", "").replace(
        "_", "").isalnum()


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    created: int
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    name: str
    created: int
    prefix: str


def _tenant_key(tenant_id: str) -> str:
    return f"banyan:tenant:{tenant_id}"


def _keys_key(tenant_id: str) -> str:
    return f"banyan:tenant:{tenant_id}:keys"


def _lookup_key(key_hash: str) -> str:
    return f"banyan:keyhash:{key_hash}"


def _encode(tenant: Tenant) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in tenant.to_dict().items()}


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: dict[bytes | str, bytes | str]) -> Tenant:
    fields = {as_text(k): json.loads(v) for k, v in raw.items()}
    return Tenant(**fields)


class Tenants(Protocol):
    """The tenants and their API keys as the gateway uses them: the request path authenticates a key, the admin
    service does the rest (:class:`TenantStore`; the unit tests' in-memory fake)."""

    async def authenticate(self, key: str) -> str | None: ...
    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None]) -> Tenant | None: ...
    async def get(self, tenant_id: str) -> Tenant | None: ...
    async def list_tenants(self) -> list[Tenant]: ...
    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None: ...
    async def delete(self, tenant_id: str) -> bool: ...
    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str]: ...
    async def list_keys(self, tenant_id: str) -> list[KeyInfo]: ...
    async def revoke_key(self, tenant_id: str, key_id: str) -> bool: ...


class TenantStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None]) -> Tenant | None:
        """Create a tenant; None when the id is taken."""
        if not await self._redis.sadd("banyan:tenants", tenant_id):
            return None
        tenant = Tenant(id=tenant_id, name=name, created=int(time.time()),
                        **{k: limits.get(k) for k in _TENANT_FIELDS})
        await self._redis.hset(_tenant_key(tenant_id), mapping=_encode(tenant))  # type: ignore[arg-type]
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.hgetall(_tenant_key(tenant_id))
        return _decode(raw) if raw else None

    async def list_tenants(self) -> list[Tenant]:
        ids = sorted(as_text(m) for m in await self._redis.smembers("banyan:tenants"))
        tenants = [await self.get(i) for i in ids]
        return [t for t in tenants if t is not None]

    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None:
        if not await self._redis.exists(_tenant_key(tenant_id)):
            return None
        if changes:
            await self._redis.hset(_tenant_key(tenant_id),
                                   mapping={k: json.dumps(v) for k, v in changes.items()})
        return await self.get(tenant_id)

    async def delete(self, tenant_id: str) -> bool:
        """Remove the tenant and revoke all of its keys."""
        hashes = [json.loads(v)["hash"] for v in (await self._redis.hgetall(_keys_key(tenant_id))).values()]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem("banyan:tenants", tenant_id)
            pipe.delete(_tenant_key(tenant_id), _keys_key(tenant_id))
            for h in hashes:
                pipe.delete(_lookup_key(h))
            removed = await pipe.execute()
        return bool(removed[0])

    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str]:
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_hash = hash_key(secret)
        info = KeyInfo(key_id="key_" + secrets.token_hex(8), name=name, created=int(time.time()),
                       prefix=secret[:7])
        record = json.dumps({**asdict(info), "hash": key_hash})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_keys_key(tenant_id), info.key_id, record)
            pipe.set(_lookup_key(key_hash), f"{tenant_id}:{info.key_id}")
            await pipe.execute()
        return info, secret

    async def list_keys(self, tenant_id: str) -> list[KeyInfo]:
        raw = await self._redis.hgetall(_keys_key(tenant_id))
        infos = []
        for value in raw.values():
            record = json.loads(value)
            record.pop("hash", None)
            infos.append(KeyInfo(**record))
        return sorted(infos, key=lambda k: (k.created, k.key_id))

    async def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        raw = await self._redis.hget(_keys_key(tenant_id), key_id)
        if raw is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(_keys_key(tenant_id), key_id)
            pipe.delete(_lookup_key(json.loads(raw)["hash"]))
            await pipe.execute()
        return True

    async def authenticate(self, key: str) -> str | None:
        """The tenant id a key belongs to, or None."""
        if not looks_like_key(key):
            return None
        raw = await self._redis.get(_lookup_key(hash_key(key)))
        return as_text(raw).split(":", 1)[0] if raw else None
