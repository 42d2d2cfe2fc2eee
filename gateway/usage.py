"""Per-tenant usage (requests, prompt and completion tokens), per model and in total, in Redis.

Counted here rather than as metric labels, so the number of tenants never bounds the metrics. The tokens
are charged to the tenant's ``tpm`` window and budgets by its admission (:meth:`gateway.quotas.Admission.spend`).

- ``banyan:usage:<tenant>`` HASH ``requests``, ``prompt_tokens``, ``completion_tokens``;
- ``banyan:usage:<tenant>:models`` HASH ``<model>|requests``, ``<model>|prompt_tokens``, ...
  (``<model>`` is the adapter name, or the base model id).

Usage over time is kept in buckets aligned to UTC hours and days, both written by the same request (so reading a
day never sums 24 hours, and each width keeps its own retention): for a width ``1h`` or ``1d`` and a bucket's
start ``<t>`` (unix seconds),

- ``banyan:usage:<tenant>:<width>:<t>`` HASH ``<model>|<user>|requests``, ``...|prompt_tokens``, ...
  (``<user>`` is the request's ``user``, empty without one);
- ``banyan:usage:<tenant>:<width>:<t>:users`` SET of the users named in that bucket: at most
  ``max_users_per_bucket`` of them, the requests of any further user counted without a user (so one tenant's
  end users cannot grow a bucket without bound);
- ``banyan:usage:<width>:<t>:tenants`` SET of the tenants with usage in that bucket (the cross-tenant view).

Each of them expires a retention period after its bucket ends (``EXPIREAT``): older buckets read as empty. The
totals and the buckets are written by one script (``EVALSHA``): recording is one command and one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from redis.asyncio import Redis

from gateway.redis_batch import ScriptBatcher
from gateway.tenants import as_text

_FIELDS = ("requests", "prompt_tokens", "completion_tokens")

BucketWidth = Literal["1h", "1d"]
WIDTH_S: dict[BucketWidth, int] = {"1h": 3600, "1d": 86400}
"""Bucket widths in seconds; buckets start at multiples of them (UTC hours and days: unix time has no leap
seconds)."""

# Count one request in the tenant's totals (all models and per model) and in its hour and day buckets, its user
# named unless the bucket already names as many users as the cap allows. KEYS: hour hash, hour users, day hash, day
# users, hour tenants, day tenants, totals, per-model totals (and the batcher's once-mark: a repeat counts nothing).
# ARGV: tenant, model, user ('' for none), prompt tokens, completion tokens, cap, hour keys' expiry, day keys'
# expiry (unix s).
_RECORD = """
local function count(hash, users, expire_at)
  local user = ARGV[3]
  if user ~= '' and redis.call('SISMEMBER', users, user) == 0 then
    if redis.call('SCARD', users) >= tonumber(ARGV[6]) then
      user = ''
    else
      redis.call('SADD', users, user)
      redis.call('EXPIREAT', users, expire_at)
    end
  end
  local prefix = ARGV[2] .. '|' .. user .. '|'
  redis.call('HINCRBY', hash, prefix .. 'requests', 1)
  redis.call('HINCRBY', hash, prefix .. 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', hash, prefix .. 'completion_tokens', ARGV[5])
  redis.call('EXPIREAT', hash, expire_at)
end
count(KEYS[1], KEYS[2], ARGV[7])
count(KEYS[3], KEYS[4], ARGV[8])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('EXPIREAT', KEYS[5], ARGV[7])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('EXPIREAT', KEYS[6], ARGV[8])
redis.call('HINCRBY', KEYS[7], 'requests', 1)
redis.call('HINCRBY', KEYS[7], 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[7], 'completion_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[8], ARGV[2] .. '|requests', 1)
redis.call('HINCRBY', KEYS[8], ARGV[2] .. '|prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[8], ARGV[2] .. '|completion_tokens', ARGV[5])
return 1
"""


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


@dataclass
class TenantUsage:
    total: Counts
    models: dict[str, Counts] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One model's (and one user's: None for requests without a user, or beyond the bucket's cap of users) counts
    in a bucket; ``tenant`` in the cross-tenant view."""

    model: str
    user: str | None
    counts: Counts
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Bucket:
    start_time: int
    end_time: int
    rows: list[UsageRow]


def bucket_start(t: float, width: BucketWidth) -> int:
    """The start of the ``width`` bucket that holds unix time ``t``."""
    return int(t) // WIDTH_S[width] * WIDTH_S[width]


def _bucket_key(tenant: str, width: BucketWidth, start: int) -> str:
    return f"banyan:usage:{tenant}:{width}:{start}"


def _tenants_key(width: BucketWidth, start: int) -> str:
    return f"banyan:usage:{width}:{start}:tenants"


def _rows(raw: dict[bytes | str, bytes | str], *, tenant: str | None = None) -> list[UsageRow]:
    """A bucket hash's counts by (model, user), sorted. A model id has no ``|``; a user may."""
    grouped: dict[tuple[str, str], Counts] = {}
    for key, value in raw.items():
        model, _, rest = as_text(key).partition("|")
        user, _, name = rest.rpartition("|")
        if name in _FIELDS:
            setattr(grouped.setdefault((model, user), Counts()), name, int(value))
    return [UsageRow(model=model, user=user or None, counts=counts, tenant=tenant)
            for (model, user), counts in sorted(grouped.items())]


class Usage(Protocol):
    """Per-tenant usage as the gateway uses it: the request path records, the admin service reads and deletes
    (:class:`UsageStore`; the unit tests' in-memory fake)."""

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int,
                     user: str | None = None, record_id: str | None = None) -> None: ...
    async def get(self, tenant: str) -> TenantUsage: ...
    async def delete(self, tenant: str) -> None: ...
    async def buckets(self, tenant: str, *, width: BucketWidth, starts: list[int]) -> list[Bucket]: ...
    async def tenants_in(self, *, width: BucketWidth, starts: list[int]) -> list[list[str]]: ...
    async def tenant_buckets(self, pairs: list[tuple[str, int]], *, width: BucketWidth) -> list[list[UsageRow]]: ...


class UsageStore:
    def __init__(self, redis: Redis, *, hourly_retention_s: int = 31 * 86400, daily_retention_s: int = 400 * 86400,
                 max_users_per_bucket: int = 100, clock: Callable[[], float] = time.time,
                 batcher: ScriptBatcher | None = None) -> None:
        self._redis = redis
        self._retention_s: dict[BucketWidth, int] = {"1h": hourly_retention_s, "1d": daily_retention_s}
        self._max_users = max_users_per_bucket
        self._clock = clock
        self._batch = batcher or ScriptBatcher(redis)
        self._record = self._batch.script(_RECORD, once="usage")

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int,
                     user: str | None = None, record_id: str | None = None) -> None:
        """Count one request in the totals and in its time buckets (with its ``user``): one script, sent with the
        other scripts of the moment (:class:`gateway.redis_batch.ScriptBatcher`). A record is counted once per
        ``record_id`` (a caller that tries again passes the same one; default: a new one, which still covers the
        client's own re-send of the script)."""
        totals, per_model = f"banyan:usage:{tenant}", f"banyan:usage:{tenant}:models"
        now = self._clock()
        hour, day = bucket_start(now, "1h"), bucket_start(now, "1d")
        hour_expiry = hour + WIDTH_S["1h"] + self._retention_s["1h"]
        day_expiry = day + WIDTH_S["1d"] + self._retention_s["1d"]
        hour_key, day_key = _bucket_key(tenant, "1h", hour), _bucket_key(tenant, "1d", day)
        await self._batch.run(
            self._record, keys=[hour_key, f"{hour_key}:users", day_key, f"{day_key}:users", _tenants_key("1h", hour),
                  _tenants_key("1d", day), totals, per_model],
            args=[tenant, model, user or "", prompt_tokens, completion_tokens, self._max_users, hour_expiry,
                  day_expiry], run_id=record_id)

    async def get(self, tenant: str) -> TenantUsage:
        raw_total = await self._redis.hgetall(f"banyan:usage:{tenant}")
        total = Counts(**{f: int(v) for k, v in raw_total.items() if (f := as_text(k)) in _FIELDS})
        models: dict[str, Counts] = {}
        for key, value in (await self._redis.hgetall(f"banyan:usage:{tenant}:models")).items():
            model, _, name = as_text(key).rpartition("|")
            if name in _FIELDS:
                setattr(models.setdefault(model, Counts()), name, int(value))
        return TenantUsage(total=total, models=dict(sorted(models.items())))

    async def delete(self, tenant: str) -> None:
        """Remove the tenant's totals and every bucket still within its retention (their names are known: no scan
        of the keyspace). Each bucket's tenant set keeps the id until it expires; reading it finds no hash."""
        now = self._clock()
        keys = [f"banyan:usage:{tenant}", f"banyan:usage:{tenant}:models"]
        for width, size in WIDTH_S.items():
            newest = bucket_start(now, width)
            for start in range(newest - self._retention_s[width] - size, newest + size, size):
                keys += [_bucket_key(tenant, width, start), f"{_bucket_key(tenant, width, start)}:users"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), 1000):
                pipe.unlink(*keys[i:i + 1000])
            await pipe.execute()

    async def buckets(self, tenant: str, *, width: BucketWidth, starts: list[int]) -> list[Bucket]:
        """The tenant's buckets that start at ``starts`` (empty ones included), read in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.hgetall(_bucket_key(tenant, width, start))
            raws = await pipe.execute()
        return [Bucket(start_time=start, end_time=start + WIDTH_S[width], rows=_rows(raw))
                for start, raw in zip(starts, raws, strict=True)]

    async def tenants_in(self, *, width: BucketWidth, starts: list[int]) -> list[list[str]]:
        """For each bucket start, the tenants with usage in it, sorted (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.smembers(_tenants_key(width, start))
            members = await pipe.execute()
        return [sorted(as_text(m) for m in found) for found in members]

    async def tenant_buckets(self, pairs: list[tuple[str, int]], *, width: BucketWidth) -> list[list[UsageRow]]:
        """The rows of each (tenant, bucket start), with their tenant (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, start in pairs:
                pipe.hgetall(_bucket_key(tenant, width, start))
            raws = await pipe.execute()
        return [_rows(raw, tenant=tenant) for (tenant, _), raw in zip(pairs, raws, strict=True)]

