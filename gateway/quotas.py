"""Per-tenant limits, enforced in Redis so every gateway replica shares them.

A tenant may have ``rpm`` (requests per minute), ``tpm`` (prompt + completion tokens per minute) and
``max_concurrency`` (requests in flight). One Lua script checks all three and takes a concurrency slot
in one round trip, atomically; the slot is given back when the request ends. Tokens are added to the
minute's counter once a response's usage is known (see :mod:`gateway.usage`), so ``tpm`` admits a
request while the minute's total is under the limit. Window keys expire on their own; a concurrency
counter also expires (``slot_ttl_s``) so that a replica that died mid-request cannot leak slots forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from gateway.errors import RateLimited
from gateway.metrics import Metrics

_ADMIT = """
local function limit(field)
  local raw = redis.call('HGET', KEYS[1], field)
  if raw == false or raw == 'null' then return nil end
  return tonumber(raw)
end
local rpm, tpm, conc = limit('rpm'), limit('tpm'), limit('max_concurrency')
if tpm and tonumber(redis.call('GET', KEYS[3]) or '0') >= tpm then return 2 end
if rpm then
  local n = redis.call('INCR', KEYS[2])
  if n == 1 then redis.call('EXPIRE', KEYS[2], 120) end
  if n > rpm then return 1 end
end
if conc then
  local c = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[1]))
  if c > conc then redis.call('DECR', KEYS[4]) return 3 end
  return 10
end
return 0
"""

_REASONS = {1: ("rpm", "requests per minute"), 2: ("tpm", "tokens per minute"),
            3: ("concurrency", "concurrent requests")}


def _minute() -> int:
    return int(time.time() // 60)


def tpm_key(tenant: str, minute: int | None = None) -> str:
    return f"banyan:rl:{tenant}:tpm:{minute if minute is not None else _minute()}"


class Limiter(Protocol):
    """What the request path needs of the tenant limits (:class:`Quotas`; the unit tests' in-memory fake)."""

    async def admit(self, tenant: str) -> Admission:
        """Let a request of ``tenant`` in, or raise :class:`RateLimited`."""
        ...

    async def release(self, tenant: str) -> None:
        """Give back a concurrency slot ``admit`` took (through :meth:`Admission.release`)."""
        ...


@dataclass
class Admission:
    """A request let in; :meth:`release` gives back its concurrency slot (idempotent)."""

    quotas: Limiter
    tenant: str
    holds_slot: bool

    async def release(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            await self.quotas.release(self.tenant)


class Quotas:
    def __init__(self, redis: Redis, *, metrics: Metrics, slot_ttl_s: int = 900) -> None:
        self._redis = redis
        self._metrics = metrics
        self._slot_ttl = slot_ttl_s
        self._script: Any = redis.register_script(_ADMIT)

    async def admit(self, tenant: str) -> Admission:
        minute = _minute()
        keys = [f"banyan:tenant:{tenant}", f"banyan:rl:{tenant}:rpm:{minute}", tpm_key(tenant, minute),
                f"banyan:rl:{tenant}:inflight"]
        verdict = int(await self._script(keys=keys, args=[self._slot_ttl]))
        if verdict in _REASONS:
            reason, what = _REASONS[verdict]
            self._metrics.rate_limited.labels(reason).inc()
            retry = "1" if reason == "concurrency" else str(max(1, 60 - int(time.time() % 60)))
            raise RateLimited(f"Rate limit reached for {what}; retry after {retry} s.",
                              code="rate_limit_exceeded", headers={"retry-after": retry})
        return Admission(quotas=self, tenant=tenant, holds_slot=verdict == 10)

    async def release(self, tenant: str) -> None:
        await self._redis.decr(f"banyan:rl:{tenant}:inflight")
