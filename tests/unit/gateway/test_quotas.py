"""Tenant limits against a real Valkey (the Lua scripts are the logic): concurrency leases that expire, tpm
reservations and their refunds. The clock is the test's, so expiry needs no waiting."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.dev.processes import free_port
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.quotas import Admission, Quotas, leases_key, tpm_key
from gateway.usage import UsageStore

LEASE_S = 60.0
T0 = 1_800_000_000.0  # the start of a minute


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _replica(redis: Redis, clock: Clock) -> Quotas:
    """One gateway replica's view of the limits."""
    return Quotas(redis, metrics=Metrics(), lease_s=LEASE_S, clock=clock)


async def _tenant(redis: Redis, **limits: int) -> str:
    await redis.hset("banyan:tenant:acme", mapping={"id": "acme", **{k: str(v) for k, v in limits.items()}})
    return "acme"


def _dead(admission: Admission) -> None:
    """The replica holding ``admission`` dies: it neither renews nor releases its lease."""
    assert admission.renewal is not None
    admission.renewal.cancel()


async def test_a_leaked_lease_expires_and_refused_attempts_do_not_renew_it(redis: Redis) -> None:
    tenant = await _tenant(redis, max_concurrency=1)
    clock = Clock()
    quotas = _replica(redis, clock)
    _dead(await quotas.admit(tenant))
    ttl_before = await redis.pttl(leases_key(tenant))
    for offset in (1, 30, LEASE_S - 1):  # a tenant retrying while the lease is still live: refused every time
        clock.now = T0 + offset
        with pytest.raises(RateLimited) as refused:
            await quotas.admit(tenant)
        assert refused.value.headers == {"retry-after": "1"}
    assert await redis.pttl(leases_key(tenant)) <= ttl_before  # the retries renewed nothing
    clock.now = T0 + LEASE_S + 1
    admitted = await quotas.admit(tenant)
    assert admitted.lease is not None
    assert await redis.zrange(leases_key(tenant), 0, -1) == [admitted.lease.encode()]
    await admitted.release()
    assert await redis.zcard(leases_key(tenant)) == 0


async def test_a_release_after_expiry_admits_nobody_extra(redis: Redis) -> None:
    tenant = await _tenant(redis, max_concurrency=1)
    clock = Clock()
    slow, other = _replica(redis, clock), _replica(redis, clock)
    late = await slow.admit(tenant)
    _dead(late)  # stalled past its lease, without renewing
    clock.now = T0 + LEASE_S + 1
    current = await other.admit(tenant)
    await late.release()  # the stalled request ends at last: its lease is long gone
    await late.release()  # and releasing twice changes nothing either
    with pytest.raises(RateLimited):
        await other.admit(tenant)
    assert await redis.zcard(leases_key(tenant)) == 1
    await current.release()
    await (await other.admit(tenant)).release()
    assert await redis.zcard(leases_key(tenant)) == 0


async def test_a_live_request_keeps_its_lease_by_renewing_it(redis: Redis) -> None:
    tenant = await _tenant(redis, max_concurrency=1)
    clock = Clock()
    quotas = _replica(redis, clock)
    held = await quotas.admit(tenant)
    assert held.lease is not None
    clock.now = T0 + LEASE_S - 1
    assert await quotas.renew(tenant, held.lease)  # what its replica does every third of a lease
    clock.now = T0 + LEASE_S + 1
    with pytest.raises(RateLimited):
        await quotas.admit(tenant)
    await held.release()
    assert not await quotas.renew(tenant, held.lease)  # a released (or expired) lease stays gone


async def test_refused_requests_take_nothing(redis: Redis) -> None:
    tenant = await _tenant(redis, max_concurrency=1, rpm=5, tpm=1000)
    quotas = _replica(redis, Clock())
    held = await quotas.admit(tenant, reserve_tokens=10)
    for _ in range(3):
        with pytest.raises(RateLimited):
            await quotas.admit(tenant, reserve_tokens=10)
    assert await redis.get(f"banyan:rl:{tenant}:rpm:{int(T0 // 60)}") == b"1"
    assert await redis.get(tpm_key(tenant, int(T0 // 60))) == b"10"
    await held.release()


async def test_tpm_reserves_the_worst_case_and_refunds_what_was_not_used(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    quotas = _replica(redis, Clock())
    window = tpm_key(tenant, int(T0 // 60))
    first = await quotas.admit(tenant, reserve_tokens=60)
    assert await redis.get(window) == b"60"
    with pytest.raises(RateLimited) as full:  # 60 + 60 cannot fit in 100
        await quotas.admit(tenant, reserve_tokens=60)
    assert full.value.code == "rate_limit_exceeded" and "retry-after" in (full.value.headers or {})
    with pytest.raises(RateLimited) as never:  # could never fit, however empty the window
        await quotas.admit(tenant, reserve_tokens=101)
    assert never.value.param == "max_tokens"
    # The request used 4 + 6 tokens: recorded in the window, and the 60 reserved given back.
    await redis.incrby(window, 10)
    await first.release()
    assert await redis.get(window) == b"10"
    await (await quotas.admit(tenant, reserve_tokens=90)).release()


async def test_a_refund_goes_back_to_the_window_it_was_reserved_in(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    clock = Clock(T0 + 59)
    quotas = _replica(redis, clock)
    admission = await quotas.admit(tenant, reserve_tokens=50)
    clock.now = T0 + 61  # the next minute
    await admission.release()
    assert await redis.get(tpm_key(tenant, int(T0 // 60))) == b"0"
    assert await redis.get(tpm_key(tenant, int(T0 // 60) + 1)) is None


async def test_a_kept_reservation_stays_in_the_window(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    quotas = _replica(redis, Clock())
    admission = await quotas.admit(tenant, reserve_tokens=40)
    admission.keep_reservation()  # the client left a JSON request: what the engine did is unknown
    await admission.release()
    assert await redis.get(tpm_key(tenant, int(T0 // 60))) == b"40"


async def test_usage_lands_in_the_current_window(redis: Redis) -> None:
    await UsageStore(redis).record("acme", model="m", prompt_tokens=3, completion_tokens=4)
    assert await redis.get(tpm_key("acme")) == b"7"


async def test_a_release_while_redis_is_unreachable_does_not_fail_the_request() -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    admission = Admission(tenant="acme", quotas=Quotas(unreachable, metrics=Metrics(), clock=Clock()),
                          lease="a1b2c3", reserved=10)
    try:
        await admission.release()  # logged, not raised: the lease expires by itself
    finally:
        await unreachable.aclose()
    assert admission.quotas is None
