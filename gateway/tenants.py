"""Tenants and their API keys, in Redis.

Keys look like ``bk_<random>``; only their SHA-256 is stored (they carry 256 bits of randomness, so an
unsalted hash is enough and lets a lookup be one round trip). Layout:

- ``banyan:tenants`` SET of tenant ids, and the same ids in ``banyan:tenant_ids`` ZSET (all scores 0: ordered by
  id, for paging ``GET /admin/tenants``; rebuilt from the SET when the two differ, as after an upgrade from a
  version without it); ``banyan:tenant:<id>`` HASH of the tenant's fields (JSON values),
  among them ``uid`` (this incarnation of the id) and, only while it is being deleted, ``deleting``;
- ``banyan:tenant:<id>:keys`` HASH key_id -> JSON (name, created, hash); ``banyan:keyhash:<sha256>``
  STRING "<tenant>:<key_id>", the lookup used on every request.

Deleting a tenant is a tombstone, then cleanup, then the record removed last (:meth:`TenantStore.begin_delete`,
the admin service's cleanup, :meth:`TenantStore.finish_delete`). Each step can run again, so a failed delete is
finished by repeating it. While the tombstone stands the id cannot be created again, its keys do not
authenticate, no key can be added, and nothing can be committed under :meth:`TenantStore.fence` (the adapter
registry's uploads): these checks run in Redis in the same atomic step as the write they guard.

Revoking a key and tombstoning a tenant announce it on the invalidation channel in the same atomic step, so every
gateway's :class:`KeyCache` drops it (:mod:`gateway.invalidation`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from adapters.registry import CHANGES_CHANNEL, Fence
from gateway.invalidation import Change, TtlCache

KEY_PREFIX = "bk_"


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
    uid: str = ""
    """This incarnation of the id (one deleted and created again has another); empty in records written
    before uids existed."""
    deleting: bool = False
    """The tombstone: a delete has started and not finished."""
    fallback_to_base: bool = False
    """When one of its adapters cannot be loaded, its request is served by the base model instead of failing."""
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None
    """Tokens it may spend per calendar day / month (UTC) on generation (:mod:`gateway.quotas`)."""

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
    """The stored fields (``deleting`` is written only by :meth:`TenantStore.begin_delete`)."""
    return {k: json.dumps(v) for k, v in tenant.to_dict().items() if k != "deleting"}


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: dict[bytes | str, bytes | str]) -> Tenant:
    fields = {as_text(k): json.loads(v) for k, v in raw.items()}
    fields["name"] = fields.get("name") or fields["id"]  # a null name was once stored by PATCH
    return Tenant(**fields)


# A tenant record that is live: it exists and carries no tombstone (KEYS[1] its hash).
_LIVE = "redis.call('HEXISTS', KEYS[1], 'id') == 1 and redis.call('HEXISTS', KEYS[1], 'deleting') == 0"

# Create unless the record exists (a tombstoned one included). KEYS: the id set, the record, the ordered ids;
# ARGV: id, pairs.
_CREATE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Change fields of a live tenant (never recreate a deleted record). ARGV: field/value pairs.
_UPDATE = f"""
if not ({_LIVE}) then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Set the tombstone on an existing record (again, if it is set already) and announce it (ARGV[1]: the id).
_TOMBSTONE = f"""
if redis.call('HEXISTS', KEYS[1], 'id') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'deleting', 'true')
redis.call('PUBLISH', '{CHANGES_CHANNEL}', 'tenant ' .. ARGV[1])
return 1
"""

# Add a key to a live tenant. KEYS: the record, its keys hash, the lookup; ARGV: key_id, record, owner.
_CREATE_KEY = f"""
if not ({_LIVE}) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
return 1
"""

# The tenant a key belongs to if that tenant is live. KEYS[1] the lookup; ARGV[1] the record key's prefix.
_AUTHENTICATE = """
local owner = redis.call('GET', KEYS[1])
if not owner then return false end
local tenant = string.match(owner, '^([^:]+):')
if not tenant then return false end
local record = ARGV[1] .. tenant
if redis.call('HEXISTS', record, 'id') == 0 or redis.call('HEXISTS', record, 'deleting') == 1 then
  return false
end
return tenant
"""


# Make the ordered ids the id set's members again. KEYS: the id set, the ordered ids.
_SYNC_IDS = """
local ids = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[2])
for i = 1, #ids, 500 do
  local args = {}
  for j = i, math.min(i + 499, #ids) do
    args[#args + 1] = 0
    args[#args + 1] = ids[j]
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
return #ids
"""

_IDS, _ORDERED_IDS = "banyan:tenants", "banyan:tenant_ids"


def _pairs(mapping: dict[str, str]) -> list[str]:
    return [x for item in mapping.items() for x in item]


class Tenants(Protocol):
    """The tenants and their API keys as the gateway uses them: the request path authenticates a key, the admin
    service does the rest (:class:`TenantStore`; the unit tests' in-memory fake)."""

    async def authenticate(self, key: str) -> str | None: ...
    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None],
                     fallback_to_base: bool = False) -> Tenant | None: ...
    async def get(self, tenant_id: str) -> Tenant | None: ...
    async def list_tenants(self, *, limit: int, after: str | None = None) -> tuple[list[Tenant], bool]: ...
    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None: ...
    async def begin_delete(self, tenant_id: str) -> Tenant | None: ...
    async def finish_delete(self, tenant_id: str) -> None: ...
    def fence(self, tenant: Tenant) -> Fence: ...
    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str] | None: ...
    async def list_keys(self, tenant_id: str) -> list[KeyInfo]: ...
    async def revoke_key(self, tenant_id: str, key_id: str) -> bool: ...


def live_guard(tenant_id: str) -> Fence:
    """What holds while ``tenant_id`` exists and no delete of it has begun: a write made under it (a document
    being added) cannot land once the tenant's deletion started."""
    return Fence(key=_tenant_key(tenant_id), equals={"id": json.dumps(tenant_id), "deleting": ""})


class KeyCache(TtlCache[str, str]):
    """Key hash -> tenant id of keys that authenticated lately, at most ``max_entries`` (least recently used
    evicted first): it saves the hot path its key-lookup round trip.

    Keyed by the key's SHA-256, never by the key. A count bound is a byte bound here: an entry is a 64-character
    hash and a tenant id of at most 64 characters (about 300 bytes with the dict's overhead), so 10,000 entries
    hold about 3 MB. Failed lookups are not cached (random keys would evict real ones).

    Revocation: the replica that revokes a key (or tombstones a tenant) drops it at once; the others drop it when
    the change's pub/sub message arrives (:mod:`gateway.invalidation`), and keep accepting it for at most the
    short TTL while their subscriber is not connected (``ttl_s`` alone without ``fallback_ttl_s``).
    """

    def drop_tenant(self, tenant_id: str) -> None:
        self.drop_where(lambda _, tenant: tenant == tenant_id)

    def invalidate(self, change: Change) -> None:
        if change.kind == "key":
            self.drop(change.key_hash)
        elif change.kind == "tenant":
            self.drop_tenant(change.tenant)


class TenantStore:
    def __init__(self, redis: Redis, *, key_cache: KeyCache | None = None) -> None:
        self._redis = redis
        self.key_cache = key_cache if key_cache is not None else KeyCache(ttl_s=0, max_entries=0)
        self._create: Any = redis.register_script(_CREATE)
        self._update: Any = redis.register_script(_UPDATE)
        self._tombstone: Any = redis.register_script(_TOMBSTONE)
        self._create_key: Any = redis.register_script(_CREATE_KEY)
        self._authenticate: Any = redis.register_script(_AUTHENTICATE)
        self._sync_ids: Any = redis.register_script(_SYNC_IDS)

    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None],
                     fallback_to_base: bool = False) -> Tenant | None:
        """Create a tenant; None when the id is taken (also while a delete of it has not finished)."""
        tenant = Tenant(id=tenant_id, name=name, created=int(time.time()), uid=secrets.token_hex(8),
                        rpm=limits.get("rpm"), tpm=limits.get("tpm"), max_concurrency=limits.get("max_concurrency"),
                        fallback_to_base=fallback_to_base, daily_token_budget=limits.get("daily_token_budget"),
                        monthly_token_budget=limits.get("monthly_token_budget"))
        done = await self._create(keys=[_IDS, _tenant_key(tenant_id), _ORDERED_IDS],
                                  args=[tenant_id, *_pairs(_encode(tenant))])
        return tenant if done else None

    async def get(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.hgetall(_tenant_key(tenant_id))
        return _decode(raw) if raw else None

    async def list_tenants(self, *, limit: int, after: str | None = None) -> tuple[list[Tenant], bool]:
        """Up to ``limit`` tenants by id, after the id ``after``, and whether more follow: two round trips
        (the page's ids, then their records), whatever the number of tenants."""
        low = f"({after}" if after else "-"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(_ORDERED_IDS, low, "+", bylex=True, offset=0, num=limit + 1)
            pipe.zcard(_ORDERED_IDS)
            pipe.scard(_IDS)
            found, ordered, members = await pipe.execute()
        if ordered != members:  # ids created before the ordered set existed (or by a gateway that predates it)
            await self._sync_ids(keys=[_IDS, _ORDERED_IDS])
            found = await self._redis.zrange(_ORDERED_IDS, low, "+", bylex=True, offset=0, num=limit + 1)
        ids = [as_text(i) for i in found]
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id in ids[:limit]:
                pipe.hgetall(_tenant_key(tenant_id))
            raws = await pipe.execute()
        return [_decode(raw) for raw in raws if raw], len(ids) > limit

    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None:
        """Change a live tenant's fields; None when there is no such tenant or it is being deleted."""
        if not await self._update(keys=[_tenant_key(tenant_id)],
                                  args=_pairs({k: json.dumps(v) for k, v in changes.items()})):
            return None
        return await self.get(tenant_id)

    async def begin_delete(self, tenant_id: str) -> Tenant | None:
        """Set the tombstone (again, when a delete is being repeated) and revoke every key; the tenant, or None
        when there is no such tenant. From here on nothing new can be added for it."""
        if not await self._tombstone(keys=[_tenant_key(tenant_id)], args=[tenant_id]):
            return None
        self.key_cache.drop_tenant(tenant_id)
        records = (await self._redis.hgetall(_keys_key(tenant_id))).values()
        async with self._redis.pipeline(transaction=True) as pipe:
            for record in records:
                pipe.delete(_lookup_key(json.loads(record)["hash"]))
            pipe.delete(_keys_key(tenant_id))
            await pipe.execute()
        return await self.get(tenant_id)

    async def finish_delete(self, tenant_id: str) -> None:
        """Remove the record, last, once everything else of the tenant is gone: the id can be created again."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(_IDS, tenant_id)
            pipe.zrem(_ORDERED_IDS, tenant_id)
            pipe.delete(_tenant_key(tenant_id), _keys_key(tenant_id))
            await pipe.execute()

    def fence(self, tenant: Tenant) -> Fence:
        """What holds while this incarnation of ``tenant`` is live (a commit under it is refused once a delete
        has started, or after the id was deleted and created again)."""
        return Fence(key=_tenant_key(tenant.id), equals={
            "id": json.dumps(tenant.id), "uid": json.dumps(tenant.uid) if tenant.uid else "", "deleting": ""})

    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str] | None:
        """A new key and its secret (shown once); None when the tenant is not live."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_hash = hash_key(secret)
        info = KeyInfo(key_id="key_" + secrets.token_hex(8), name=name, created=int(time.time()),
                       prefix=secret[:7])
        record = json.dumps({**asdict(info), "hash": key_hash})
        done = await self._create_key(keys=[_tenant_key(tenant_id), _keys_key(tenant_id), _lookup_key(key_hash)],
                                      args=[info.key_id, record, f"{tenant_id}:{info.key_id}"])
        return (info, secret) if done else None

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
        key_hash = json.loads(raw)["hash"]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(_keys_key(tenant_id), key_id)
            pipe.delete(_lookup_key(key_hash))
            pipe.publish(CHANGES_CHANNEL, Change("key", key_hash=key_hash).message())
            await pipe.execute()
        self.key_cache.drop(key_hash)
        return True

    async def authenticate(self, key: str) -> str | None:
        """The tenant id a key belongs to, or None (also when that tenant is being deleted)."""
        if not looks_like_key(key):
            return None
        key_hash = hash_key(key)
        cached = self.key_cache.get(key_hash)
        if cached is not None:
            return cached
        generation = self.key_cache.generation
        raw = await self._authenticate(keys=[_lookup_key(key_hash)], args=[_tenant_key("")])
        if not raw:
            return None
        tenant = as_text(raw)
        self.key_cache.put(key_hash, tenant, generation=generation)
        return tenant
