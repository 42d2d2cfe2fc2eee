"""Per-tenant usage (requests, prompt and completion tokens), per model and in total, in Redis.

Counted here rather than as metric labels, so the number of tenants never bounds the metrics. The
same pipeline adds the tokens to the tenant's current ``tpm`` window (:mod:`gateway.quotas`).

- ``banyan:usage:<tenant>`` HASH ``requests``, ``prompt_tokens``, ``completion_tokens``;
- ``banyan:usage:<tenant>:models`` HASH ``<model>|requests``, ``<model>|prompt_tokens``, ...
  (``<model>`` is the adapter name, or the base model id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from gateway.quotas import tpm_key
from gateway.tenants import as_text

_FIELDS = ("requests", "prompt_tokens", "completion_tokens")


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


class Usage(Protocol):
    """Per-tenant usage as the gateway uses it: the request path records, the admin service reads and deletes
    (:class:`UsageStore`; the unit tests' in-memory fake)."""

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    async def get(self, tenant: str) -> TenantUsage: ...
    async def delete(self, tenant: str) -> None: ...


class UsageStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        totals, per_model = f"banyan:usage:{tenant}", f"banyan:usage:{tenant}:models"
        window = tpm_key(tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(totals, "requests", 1)
            pipe.hincrby(totals, "prompt_tokens", prompt_tokens)
            pipe.hincrby(totals, "completion_tokens", completion_tokens)
            pipe.hincrby(per_model, f"{model}|requests", 1)
            pipe.hincrby(per_model, f"{model}|prompt_tokens", prompt_tokens)
            pipe.hincrby(per_model, f"{model}|completion_tokens", completion_tokens)
            pipe.incrby(window, prompt_tokens + completion_tokens)
            pipe.expire(window, 120)
            await pipe.execute()

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
        await self._redis.delete(f"banyan:usage:{tenant}", f"banyan:usage:{tenant}:models")
