"""The adapter registry in Redis: which versions exist per tenant adapter, and which one is active.

Layout (all keys scoped by tenant, which always comes from the authenticated caller):

- ``banyan:tenant:<tenant>:adapters`` SET of adapter names;
- ``banyan:adapter:<tenant>:<name>`` HASH: ``next`` (version counter), ``active`` (0 = none),
  ``canary`` (JSON ``{"version", "percent"}``, only while a traffic split holds; written with ``active``),
  ``v<N>`` (JSON metadata of version N, written once, never changed);
- ``banyan:uploads:pending`` ZSET of uploads whose files may be in object storage without a recorded
  version (being written, or of a version just deleted), for the sweep (:func:`adapters.layout.sweep_abandoned`).

Versions are numbered by ``HINCRBY`` so concurrent uploads of one name never collide, and the counter
survives deleting the adapter (only deleting the tenant resets it): a version number names one upload for
the adapter's whole life. A version is recorded only after its files are in object storage: the registry
entry is the commit point, and it can be fenced (:class:`Fence`) on a record outside the registry (the
gateway fences uploads on the tenant being live). Deleting an adapter removes its versions and marks their
uploads pending in one step, so files a failed delete left behind are swept.

A traffic split (a canary) sends ``percent`` % of an adapter's requests to another of its versions. It is stored
and cleared in the same atomic step as ``active`` (activating without a canary, or an upload activated, ends
it), read with the active version in one round trip (:meth:`AdapterRegistry.serving`), and ends by itself when
its version is gone (a split whose version is not recorded is never read).

Every write that can change what :meth:`AdapterRegistry.serving` answers announces it on :data:`CHANGES_CHANNEL`
(``adapter <tenant>:<name>``, ``adapters <tenant>``) in the same atomic step, so that gateways caching it drop
their copy (:mod:`gateway.invalidation`); whoever writes (a gateway, the training worker) announces.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, cast

from redis.asyncio import Redis

from adapters.layout import UploadRecords
from adapters.naming import AdapterRef

_PENDING = "banyan:uploads:pending"

CHANGES_CHANNEL = "banyan:invalidate"
"""The pub/sub channel committed changes are announced on (the message format: :class:`gateway.invalidation.Change`)."""

# Announce a change of the adapter whose hash is KEYS[1] ("banyan:adapter:<tenant>:<name>" -> "<tenant>:<name>").
_ANNOUNCE = (f"redis.call('PUBLISH', '{CHANGES_CHANNEL}', "
             f"'adapter ' .. string.sub(KEYS[1], {len('banyan:adapter:') + 1}))")


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
    base_model: str | None = None
    """The base model the version was validated against (and is served on); None in records written before
    several bases were served: those read as the default base model."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionMeta:
        data = json.loads(raw)  # keys it does not know are ignored (earlier versions wrote an empty "extra")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.name != "base_model"})


@dataclass(frozen=True, slots=True)
class Split:
    """``percent`` % of an adapter's requests go to its version ``version`` (the canary), the rest to the active
    one."""

    version: int
    percent: int

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "percent": self.percent}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Split:
        data = json.loads(raw)
        return cls(version=int(data["version"]), percent=int(data["percent"]))


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    tenant: str
    name: str
    active: int | None
    versions: dict[int, VersionMeta]
    canary: Split | None = None

    @property
    def active_meta(self) -> VersionMeta | None:
        return self.versions.get(self.active) if self.active else None


SPLIT_BUCKETS = 100
"""A split's granularity: whole percents."""


def split_bucket(tenant: str, name: str, user: str | None) -> int:
    """Which of :data:`SPLIT_BUCKETS` buckets a request falls in: a stable hash of tenant, adapter and ``user``
    (the same user always lands in the same bucket, so a split keeps each user on one version, and raising a
    canary's percent only moves more users to it); a random one for a request without ``user``."""
    if user is None:
        return random.randrange(SPLIT_BUCKETS)
    digest = hashlib.sha256(f"{tenant}\0{name}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SPLIT_BUCKETS


@dataclass(frozen=True, slots=True)
class Serving:
    """What serves an adapter's requests: its active version, and the canary version with its share while a
    split holds."""

    active: VersionMeta
    canary: VersionMeta | None = None
    percent: int = 0

    def pick(self, bucket: int) -> tuple[VersionMeta, bool]:
        """The version for a request in ``bucket`` (:func:`split_bucket`), and whether it is the canary."""
        if self.canary is not None and bucket < self.percent:
            return self.canary, True
        return self.active, False


class UnknownVersion(LookupError):
    """Activation named a version the adapter does not have (or the adapter is gone)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"no version {version}")
        self.version = version


@dataclass(frozen=True, slots=True)
class Fence:
    """A condition a commit is made under: the Redis hash ``key`` holds exactly these field values (``""``:
    the field is absent). Checked in the same atomic step as the write."""

    key: str
    equals: Mapping[str, str] = field(default_factory=dict)

    def args(self) -> list[str]:
        return [str(len(self.equals)), *(x for item in self.equals.items() for x in item)]


# The active version's metadata and, while a split holds, the canary's metadata and percent: in one round trip
# (read on every request for an adapter). A split whose version is gone is left out.
_SERVING = """
local state = redis.call('HMGET', KEYS[1], 'active', 'canary')
local active = state[1]
if not active or active == '0' then return false end
local meta = redis.call('HGET', KEYS[1], 'v' .. active)
if not meta then return false end
if not state[2] then return {meta} end
local split = cjson.decode(state[2])
local canary = redis.call('HGET', KEYS[1], 'v' .. split['version'])
if not canary then return {meta} end
return {meta, canary, tostring(split['percent'])}
"""

# Record a version if the fence holds (KEYS[3]; ARGV[5] = number of fields, then field/value pairs).
_RECORD = f"""
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  if (redis.call('HGET', KEYS[3], ARGV[6 + 2 * i]) or '') ~= ARGV[7 + 2 * i] then return 0 end
end
redis.call('HSET', KEYS[1], 'v' .. ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'active', ARGV[1])
  redis.call('HDEL', KEYS[1], 'canary')
else redis.call('HSETNX', KEYS[1], 'active', 0) end
redis.call('SADD', KEYS[2], ARGV[4])
{_ANNOUNCE}
return 1
"""

# Make version ARGV[1] active and set the split (ARGV[2]: its JSON, '' for none) if the versions exist: the
# adapter's hash afterwards, or the number of the version that does not exist.
_ACTIVATE = f"""
if redis.call('HEXISTS', KEYS[1], 'v' .. ARGV[1]) == 0 then return tonumber(ARGV[1]) end
if ARGV[2] ~= '' then
  local canary = cjson.decode(ARGV[2])['version']
  if redis.call('HEXISTS', KEYS[1], 'v' .. canary) == 0 then return canary end
  redis.call('HSET', KEYS[1], 'active', ARGV[1], 'canary', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'active', ARGV[1])
  redis.call('HDEL', KEYS[1], 'canary')
end
{_ANNOUNCE}
return redis.call('HGETALL', KEYS[1])
"""

# Remove every version of an adapter but keep its counter; mark each removed upload pending (score 0: the
# next sweep removes its files unless the deleter does first). The metadata of the removed versions.
_DELETE = f"""
local all = redis.call('HGETALL', KEYS[1])
local removed = {{}}
for i = 1, #all, 2 do
  local f = all[i]
  if f ~= 'next' then
    redis.call('HDEL', KEYS[1], f)
    if string.sub(f, 1, 1) == 'v' then
      local meta = cjson.decode(all[i + 1])
      redis.call('ZADD', KEYS[3], 0, ARGV[2] .. '/' .. ARGV[1] .. '/' .. meta['version'] .. '/' .. meta['uid'])
      table.insert(removed, all[i + 1])
    end
  end
end
redis.call('SREM', KEYS[2], ARGV[1])
{_ANNOUNCE}
return removed
"""


def _record(tenant: str, name: str, hash_: dict[Any, Any]) -> AdapterRecord | None:
    raw = {_text(k): v for k, v in hash_.items()}
    versions = {int(k[1:]): VersionMeta.from_json(v) for k, v in raw.items() if k.startswith("v")}
    if not versions:
        return None
    active = int(raw.get("active") or 0)
    canary = Split.from_json(raw["canary"]) if "canary" in raw else None
    if canary is not None and canary.version not in versions:
        canary = None
    return AdapterRecord(tenant=tenant, name=name, active=active or None, versions=versions, canary=canary)


class Registry(UploadRecords, Protocol):
    """The registry as the gateway uses it: the request path reads the active version (and split) and the list,
    the admin service allocates, activates and deletes, and publishing and sweeping an upload use
    :class:`UploadRecords` (:class:`AdapterRegistry`; the unit tests' in-memory fake)."""

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None: ...
    async def serving(self, tenant: str, name: str) -> Serving | None: ...
    async def get(self, tenant: str, name: str) -> AdapterRecord | None: ...
    async def list_records(self, tenant: str) -> list[AdapterRecord]: ...
    async def allocate_version(self, tenant: str, name: str) -> int: ...
    async def activate(self, tenant: str, name: str, version: int, *,
                       canary: Split | None = None) -> AdapterRecord: ...
    async def delete(self, tenant: str, name: str) -> list[VersionMeta]: ...
    async def delete_tenant(self, tenant: str) -> list[str]: ...


class AdapterRegistry:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._serving: Any = redis.register_script(_SERVING)
        self._record: Any = redis.register_script(_RECORD)
        self._activate: Any = redis.register_script(_ACTIVATE)
        self._delete: Any = redis.register_script(_DELETE)

    async def allocate_version(self, tenant: str, name: str) -> int:
        return int(await self._redis.hincrby(_adapter_key(tenant, name), "next", 1))

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool,
                             fence: Fence | None = None) -> bool:
        """Record version ``meta`` (making it active if asked), atomically and only while ``fence`` holds;
        False when it did not."""
        fence = fence or Fence(key=_adapter_key(tenant, name))  # no fields: always holds
        done = await self._record(keys=[_adapter_key(tenant, name), _names_key(tenant), fence.key],
                                  args=[meta.version, meta.to_json(), int(activate), name, *fence.args()])
        return bool(done)

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None:
        """The active version of an adapter; None when it does not exist or no version is active."""
        serving = await self.serving(tenant, name)
        return serving.active if serving else None

    async def serving(self, tenant: str, name: str) -> Serving | None:
        """The active version of an adapter and its split, if any, in one round trip; None when the adapter does
        not exist or no version is active."""
        raw = await self._serving(keys=[_adapter_key(tenant, name)])
        if not raw:
            return None
        active = VersionMeta.from_json(raw[0])
        if len(raw) < 3:
            return Serving(active=active)
        return Serving(active=active, canary=VersionMeta.from_json(raw[1]), percent=int(raw[2]))

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

    async def activate(self, tenant: str, name: str, version: int, *, canary: Split | None = None) -> AdapterRecord:
        """Make ``version`` active with ``canary`` as its split (None ends a split), atomically and only if both
        versions exist (never on a deleted adapter: :class:`UnknownVersion`); the adapter's record afterwards."""
        split = canary.to_json() if canary else ""
        raw = await self._activate(keys=[_adapter_key(tenant, name)], args=[version, split])
        if isinstance(raw, int):
            raise UnknownVersion(raw)
        hash_ = dict(zip(raw[::2], raw[1::2], strict=True))
        record = _record(tenant, name, hash_)
        if record is None:
            raise UnknownVersion(version)
        return record

    async def delete(self, tenant: str, name: str) -> list[VersionMeta]:
        """Remove every version of an adapter (its version counter stays, so numbers are never reused) and
        mark their uploads pending, so the sweep removes their files if the caller cannot; the versions
        removed (none when there were none). The caller removes their files and then :meth:`clear_pending`."""
        removed = await self._delete(keys=[_adapter_key(tenant, name), _names_key(tenant), _PENDING],
                                     args=[name, tenant])
        return sorted((VersionMeta.from_json(raw) for raw in removed), key=lambda m: m.version)

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
        """Forget every adapter of a tenant, version counters included (the tenant is being deleted, no
        upload of it can commit); the names that had versions."""
        names = await self.names(tenant)
        keys = {_adapter_key(tenant, name) for name in names}
        # Adapters deleted earlier keep only their counter and are no longer listed in the names.
        keys.update([_text(k) async for k in self._redis.scan_iter(match=_adapter_key(tenant, "*"), count=1000)])
        async with self._redis.pipeline(transaction=True) as pipe:
            for key in sorted(keys):
                pipe.delete(key)
            pipe.delete(_names_key(tenant))
            pipe.publish(CHANGES_CHANNEL, f"adapters {tenant}")
            await pipe.execute()
        return names
