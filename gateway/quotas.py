"""Per-tenant limits, enforced in Redis so every gateway replica shares them.

A tenant may have ``rpm`` (requests per minute), ``tpm`` (prompt + completion tokens per minute) and
``max_concurrency`` (requests in flight). One Lua script checks all three and, only when all pass, counts
the request, reserves its tokens and takes a concurrency lease, atomically in one round trip: a refused
attempt changes nothing.

- ``tpm``: a request reserves its worst case (``reserve_tokens``, see :mod:`gateway.openai_api.limits`) in the
  minute's window at admission, and is let in only if the window has room for it; a request that could never
  fit (its worst case alone is over ``tpm``) is refused outright. The real usage is added to the window once
  known (:mod:`gateway.usage`) and the reservation taken back out of the window it went into when the
  request is released; so the window holds what was used plus what requests in flight may still use.
- ``max_concurrency``: per-request leases, a sorted set of request ids scored by their expiry. Admission
  drops expired leases, counts the rest and adds its own; release removes its own (a release after its
  lease expired removes nothing). The replica holding a lease renews it every third of its lifetime
  (``lease_s``); a replica that died mid-request stops renewing and its leases fall out by themselves.
  Nothing is a counter that can go negative, and a refused attempt renews nothing.

Window keys expire on their own (120 s), and so does a leases key (its longest lease).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import RateLimited
from gateway.metrics import Metrics

log = logging.getLogger("banyan.quotas")

_ADMIT = """
local function limit(field)
  local raw = redis.call('HGET', KEYS[1], field)
  if raw == false or raw == 'null' then return nil end
  return tonumber(raw)
end
local rpm, tpm, conc = limit('rpm'), limit('tpm'), limit('max_concurrency')
local now, reserve = tonumber(ARGV[1]), tonumber(ARGV[3])
if tpm then
  if reserve > tpm then return {4, 0, 0} end
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= tpm or used + reserve > tpm then return {2, 0, 0} end
end
if rpm and tonumber(redis.call('GET', KEYS[2]) or '0') >= rpm then return {1, 0, 0} end
if conc then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= conc then return {3, 0, 0} end
end
if rpm and redis.call('INCR', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], 120) end
local reserved = 0
if tpm and reserve > 0 then
  redis.call('INCRBY', KEYS[3], reserve)
  redis.call('EXPIRE', KEYS[3], 120)
  reserved = reserve
end
if conc then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('PEXPIRE', KEYS[4], math.ceil(tonumber(ARGV[4]) * 1000))
  return {0, 1, reserved}
end
return {0, 0, reserved}
"""
"""KEYS: the tenant's record, its rpm window, its tpm window, its leases. ARGV: now (s), the lease id, the
tokens to reserve, the lease lifetime (s). Returns {verdict, lease taken, tokens reserved}."""

_RELEASE = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local reserved = tonumber(ARGV[2])
if reserved > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('DECRBY', KEYS[2], reserved) < 0 then redis.call('SET', KEYS[2], 0, 'KEEPTTL') end
end
return 0
"""
"""KEYS: the leases, the tpm window the reservation went into. ARGV: the lease id ('' for none), the tokens to
give back."""

_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
"""KEYS: the leases. ARGV: the new expiry (s), the lease id, the lease lifetime (ms). Renews only a lease that is
still there (an expired one is gone for good)."""

_REASONS = {1: ("rpm", "requests per minute"), 2: ("tpm", "tokens per minute"),
            3: ("concurrency", "concurrent requests")}


def _minute(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // 60)


def tpm_key(tenant: str, minute: int | None = None) -> str:
    return f"banyan:rl:{tenant}:tpm:{minute if minute is not None else _minute()}"


def leases_key(tenant: str) -> str:
    return f"banyan:rl:{tenant}:leases"


class Limiter(Protocol):
    """What the request path needs of the tenant limits (:class:`Quotas`; the unit tests' in-memory fake)."""

    async def admit(self, tenant: str, *, reserve_tokens: int = 0) -> Admission:
        """Let a request of ``tenant`` in, reserving ``reserve_tokens`` against its ``tpm``, or raise
        :class:`RateLimited`."""
        ...


@dataclass
class Admission:
    """A request let in. :meth:`release` (idempotent) gives back its concurrency lease and the tokens it
    reserved; an admission without ``quotas`` holds nothing."""

    tenant: str
    quotas: Quotas | None = None
    lease: str | None = None
    reserved: int = 0
    window: str = ""
    """The tpm window the reservation went into."""
    renewal: asyncio.Task[None] | None = field(default=None, repr=False)

    def keep_reservation(self) -> None:
        """Leave the reserved tokens in the tpm window (the request's real usage is unknown)."""
        self.reserved = 0

    async def release(self) -> None:
        quotas, self.quotas = self.quotas, None
        if self.renewal is not None:
            self.renewal.cancel()
        if quotas is not None and (self.lease is not None or self.reserved > 0):
            await quotas.give_back(self)


class Quotas:
    def __init__(self, redis: Redis, *, metrics: Metrics, lease_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._metrics = metrics
        self._lease_s = lease_s
        self._clock = clock
        self._admit: Any = redis.register_script(_ADMIT)
        self._release: Any = redis.register_script(_RELEASE)
        self._renew: Any = redis.register_script(_RENEW)

    async def admit(self, tenant: str, *, reserve_tokens: int = 0) -> Admission:
        now = self._clock()
        minute = _minute(now)
        lease = secrets.token_hex(8)
        window = tpm_key(tenant, minute)
        keys = [f"banyan:tenant:{tenant}", f"banyan:rl:{tenant}:rpm:{minute}", window, leases_key(tenant)]
        verdict, leased, reserved = (int(v) for v in await self._admit(
            keys=keys, args=[repr(now), lease, max(0, reserve_tokens), repr(self._lease_s)]))
        if verdict == 4:
            self._metrics.rate_limited.labels("tpm_request").inc()
            raise RateLimited(f"Request too large for tokens per minute: it may use up to {reserve_tokens} tokens, "
                              "more than the limit allows in a minute. Lower `max_tokens` or `n`.",
                              code="rate_limit_exceeded", param="max_tokens")
        if verdict in _REASONS:
            reason, what = _REASONS[verdict]
            self._metrics.rate_limited.labels(reason).inc()
            retry = "1" if reason == "concurrency" else str(max(1, 60 - int(now % 60)))
            raise RateLimited(f"Rate limit reached for {what}; retry after {retry} s.",
                              code="rate_limit_exceeded", headers={"retry-after": retry})
        admission = Admission(tenant=tenant, quotas=self, lease=lease if leased else None, reserved=reserved,
                              window=window)
        if leased:
            admission.renewal = asyncio.create_task(self._keep_alive(tenant, lease))
        return admission

    async def give_back(self, admission: Admission) -> None:
        """Give back the lease and the unused reservation. With Redis unreachable this only logs: the lease
        expires by itself within its lifetime, and the reservation stays counted in its minute."""
        try:
            await self._release(keys=[leases_key(admission.tenant), admission.window or tpm_key(admission.tenant)],
                                args=[admission.lease or "", admission.reserved])
        except RedisError as e:
            log.warning("giving back an admission failed (%s): its lease expires by itself", type(e).__name__)

    async def renew(self, tenant: str, lease: str) -> bool:
        """Push a lease's expiry one lifetime ahead; False if it had expired (it stays gone)."""
        expiry = self._clock() + self._lease_s
        renewed = await self._renew(keys=[leases_key(tenant)],
                                    args=[repr(expiry), lease, int(self._lease_s * 1000) + 1])
        return bool(renewed)

    async def _keep_alive(self, tenant: str, lease: str) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if not await self.renew(tenant, lease):
                    log.warning("a concurrency lease expired before its request ended")
                    return
            except RedisError as e:  # try again next time; the lease lives a whole lifetime
                log.warning("renewing a concurrency lease failed: %s", type(e).__name__)
