"""Tenant limits against a real Valkey (the Lua scripts are the logic): concurrency leases that expire, tpm
reservations and their refunds, sliding windows, the x-ratelimit headers, token budgets. The clock is the test's,
so expiry needs no waiting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from gateway.dev.processes import free_port
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.quotas import (
    Admission,
    CountNeeded,
    Quotas,
    format_duration,
    leases_key,
    periods,
    requests_key,
    tokens_key,
)

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


async def _window(redis: Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (await redis.hgetall(key)).items()}


async def test_refused_requests_take_nothing(redis: Redis) -> None:
    tenant = await _tenant(redis, max_concurrency=1, rpm=5, tpm=1000)
    quotas = _replica(redis, Clock())
    held = await quotas.admit(tenant, reserve_tokens=10)
    for _ in range(3):
        with pytest.raises(RateLimited):
            await quotas.admit(tenant, reserve_tokens=10)
    assert await _window(redis, requests_key(tenant)) == {int(T0): 1}
    assert await _window(redis, tokens_key(tenant)) == {int(T0): 10}
    await held.release()


async def test_tpm_reserves_the_worst_case_and_refunds_what_was_not_used(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    clock = Clock()
    quotas = _replica(redis, clock)
    first = await quotas.admit(tenant, reserve_tokens=60)
    assert await _window(redis, tokens_key(tenant)) == {int(T0): 60}
    with pytest.raises(RateLimited) as full:  # 60 + 60 cannot fit in 100
        await quotas.admit(tenant, reserve_tokens=60)
    assert full.value.code == "rate_limit_exceeded" and "retry-after" in (full.value.headers or {})
    with pytest.raises(RateLimited) as never:  # could never fit, however empty the window
        await quotas.admit(tenant, reserve_tokens=101)
    assert never.value.param == "max_tokens"
    # The request used 4 + 6 tokens, known 2 s later: the 60 reserved given back, the 10 charged when known.
    clock.now = T0 + 2
    first.spend(10)
    await first.release()
    assert await _window(redis, tokens_key(tenant)) == {int(T0) + 2: 10}
    await (await quotas.admit(tenant, reserve_tokens=90)).release()


async def test_an_uncounted_request_is_admitted_only_while_the_tenant_has_no_tpm(redis: Redis) -> None:
    tenant = await _tenant(redis, rpm=5)
    quotas = _replica(redis, Clock())
    assert quotas.needs_count(tenant)  # nothing seen of it yet
    await (await quotas.admit(tenant, reserve_tokens=30)).release()
    assert not quotas.needs_count(tenant)  # its admission found no tpm
    admitted = await quotas.admit(tenant, reserve_tokens=None)
    assert admitted.reserved == 0 and admitted.limits.requests is not None and admitted.limits.tokens is None
    await admitted.release()
    # An admin sets a tpm: the next uncounted request changes nothing and is asked for its count.
    await redis.hset("banyan:tenant:acme", "tpm", "100")
    with pytest.raises(CountNeeded):
        await quotas.admit(tenant, reserve_tokens=None)
    assert await _window(redis, requests_key(tenant)) == {int(T0): 2}  # the two admitted, not the uncounted one
    assert await _window(redis, tokens_key(tenant)) == {}
    assert quotas.needs_count(tenant)  # from now on counted first
    with pytest.raises(RateLimited) as never:
        await quotas.admit(tenant, reserve_tokens=101)
    assert never.value.param == "max_tokens"
    counted = await quotas.admit(tenant, reserve_tokens=40)
    assert counted.reserved == 40 and await _window(redis, tokens_key(tenant)) == {int(T0): 40}
    await counted.release()


async def test_a_spent_budget_refuses_an_uncounted_request_too(redis: Redis) -> None:
    tenant = await _tenant(redis, daily_token_budget=10, tpm=1000)
    quotas = _replica(redis, Clock())
    day, _ = periods(T0)
    await redis.set(day.key(tenant), 10)
    with pytest.raises(RateLimited) as refused:  # the budget's refusal comes before the request for a count
        await quotas.admit(tenant, reserve_tokens=None)
    assert refused.value.code == "quota_exceeded"


async def test_the_tenants_known_without_a_tpm_are_bounded(redis: Redis) -> None:
    quotas = Quotas(redis, metrics=Metrics(), lease_s=LEASE_S, clock=Clock(), max_untimed=2)
    for tenant in ("a", "b", "c"):
        await (await quotas.admit(tenant, reserve_tokens=1)).release()
    assert [quotas.needs_count(t) for t in ("a", "b", "c")] == [True, False, False]  # the oldest dropped


async def test_a_refund_goes_back_to_the_bucket_it_was_reserved_in(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    clock = Clock(T0 + 59)
    quotas = _replica(redis, clock)
    admission = await quotas.admit(tenant, reserve_tokens=50)
    other = await quotas.admit(tenant, reserve_tokens=20)  # the same second
    clock.now = T0 + 61  # the next minute: the reservations are still in the window
    await admission.release()
    assert await _window(redis, tokens_key(tenant)) == {int(T0) + 59: 20}
    clock.now = T0 + 59 + 61  # the bucket has left the window: a late refund takes nothing from anyone
    await quotas.admit(tenant, reserve_tokens=5)
    await other.release()
    assert await _window(redis, tokens_key(tenant)) == {int(T0) + 120: 5}


async def test_a_kept_reservation_stays_in_the_window(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    quotas = _replica(redis, Clock())
    admission = await quotas.admit(tenant, reserve_tokens=40)
    admission.keep_reservation()  # the client left a JSON request: what the engine did is unknown
    await admission.release()
    assert await _window(redis, tokens_key(tenant)) == {int(T0): 40}


async def test_the_request_window_slides_no_double_burst_across_a_minute_boundary(redis: Redis) -> None:
    tenant = await _tenant(redis, rpm=3)
    clock = Clock(T0 + 59.5)  # the end of a clock minute
    quotas = _replica(redis, clock)
    for _ in range(3):
        await quotas.admit(tenant)
    clock.now = T0 + 60.5  # the start of the next: a fixed window would let 3 more in
    with pytest.raises(RateLimited) as refused:
        await quotas.admit(tenant)
    assert refused.value.headers is not None
    assert refused.value.headers["retry-after"] == "60"  # the burst leaves the window at T0 + 120
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = T0 + 119.9
    with pytest.raises(RateLimited):
        await quotas.admit(tenant)
    clock.now = T0 + 120
    for _ in range(3):
        await quotas.admit(tenant)
    with pytest.raises(RateLimited):
        await quotas.admit(tenant)


async def test_the_token_window_slides_too(redis: Redis) -> None:
    tenant = await _tenant(redis, tpm=100)
    clock = Clock(T0 + 50)
    quotas = _replica(redis, clock)
    for at, used in ((50, 30), (59.5, 70)):  # each request used what it reserved
        clock.now = T0 + at
        admission = await quotas.admit(tenant, reserve_tokens=used)
        admission.spend(used)
        await admission.release()
    clock.now = T0 + 60.5
    with pytest.raises(RateLimited) as refused:
        await quotas.admit(tenant, reserve_tokens=30)
    assert refused.value.headers is not None
    assert refused.value.headers["retry-after"] == str(50 + 61 - 60)  # once the 30 of T0 + 50 left
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now = T0 + 50 + 61
    await quotas.admit(tenant, reserve_tokens=30)
    with pytest.raises(RateLimited):
        await quotas.admit(tenant, reserve_tokens=1)


async def test_a_window_keeps_at_most_61_buckets(redis: Redis) -> None:
    tenant = await _tenant(redis, rpm=10_000, tpm=10_000_000)
    clock = Clock()
    quotas = _replica(redis, clock)
    for second in range(300):
        clock.now = T0 + second + 0.5
        admission = await quotas.admit(tenant, reserve_tokens=100)
        admission.spend(10)
        await admission.release()
    assert await redis.hlen(requests_key(tenant)) <= 61
    assert await redis.hlen(tokens_key(tenant)) <= 62  # the usage lands in the bucket of its release


async def test_headers_say_what_is_left_and_when_the_window_is_empty(redis: Redis) -> None:
    tenant = await _tenant(redis, rpm=10, tpm=1000)
    clock = Clock(T0 + 0.5)
    quotas = _replica(redis, clock)
    first = await quotas.admit(tenant, reserve_tokens=100)
    assert first.headers() == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1m0.5s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "1m0.5s"}
    clock.now = T0 + 30.25
    second = await quotas.admit(tenant, reserve_tokens=850)
    assert second.headers()["x-ratelimit-remaining-requests"] == "8"
    assert second.headers()["x-ratelimit-remaining-tokens"] == "50"
    assert second.headers()["x-ratelimit-reset-tokens"] == "1m0.75s"  # the newest bucket (T0 + 30) leaves last
    with pytest.raises(RateLimited) as refused:  # what a 429 says: the window as it is, without the refused one
        await quotas.admit(tenant, reserve_tokens=100)
    assert refused.value.headers is not None
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "50"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "8"
    assert refused.value.headers["retry-after"] == "31"  # the 100 of T0 leave at T0 + 61


async def test_only_the_limits_a_tenant_has_are_in_the_headers(redis: Redis) -> None:
    quotas = _replica(redis, Clock())
    assert (await quotas.admit(await _tenant(redis))).headers() == {}
    await redis.hset("banyan:tenant:acme", "rpm", "5")
    assert set((await quotas.admit("acme", reserve_tokens=10)).headers()) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    await redis.hset("banyan:tenant:acme", mapping={"rpm": "null", "tpm": "100"})
    assert set((await quotas.admit("acme", reserve_tokens=10)).headers()) == {
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}


@pytest.mark.parametrize(("ms", "text"), [(0, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"),
                                          (8640, "8.64s"), (60_000, "1m0s"), (60_500, "1m0.5s"),
                                          (360_000, "6m0s"), (3_723_400, "1h2m3.4s"), (3_600_000, "1h0m0s")])
def test_durations_are_written_as_openai_writes_them(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_budget_periods_are_calendar_days_and_months_in_utc() -> None:
    day, month = periods(T0)  # 2027-01-15 08:00 UTC
    assert (day.label, day.ends) == ("20270115", int(datetime(2027, 1, 16, tzinfo=UTC).timestamp()))
    assert (month.label, month.ends) == ("202701", int(datetime(2027, 2, 1, tzinfo=UTC).timestamp()))
    day, month = periods(datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp())
    assert day.ends == month.ends == int(datetime(2028, 3, 1, tzinfo=UTC).timestamp())
    assert periods(datetime(2027, 12, 31, 12, tzinfo=UTC).timestamp())[1].ends == int(
        datetime(2028, 1, 1, tzinfo=UTC).timestamp())


async def test_a_spent_daily_budget_refuses_until_raised_or_the_next_day(redis: Redis) -> None:
    tenant = await _tenant(redis, daily_token_budget=100)
    clock = Clock()
    metrics = Metrics()
    quotas = Quotas(redis, metrics=metrics, lease_s=LEASE_S, clock=clock)
    for used in (60, 50):  # the second request is let in (60 < 100) and ends over the budget
        admission = await quotas.admit(tenant, reserve_tokens=500)
        admission.spend(used)
        await admission.release()
    spent = (await quotas.spent([tenant]))[tenant]
    assert (spent.daily, spent.monthly) == (110, 110)
    midnight = int(datetime(2027, 1, 16, tzinfo=UTC).timestamp())
    assert spent.daily_resets_at == midnight
    with pytest.raises(RateLimited) as refused:
        await quotas.admit(tenant)
    assert refused.value.code == "quota_exceeded"
    assert "daily token budget" in refused.value.message and "2027-01-16 00:00:00 UTC" in refused.value.message
    assert refused.value.headers == {"retry-after": str(midnight - int(T0))}
    assert metrics.budget_refusals.labels("daily")._value.get() == 1
    await (await quotas.admit(tenant, budgeted=False)).release()  # documents are not generation
    await redis.hset(f"banyan:tenant:{tenant}", "daily_token_budget", "1000")  # an admin raises it
    await (await quotas.admit(tenant)).release()
    await redis.hset(f"banyan:tenant:{tenant}", "daily_token_budget", "100")
    clock.now = midnight  # a new day
    await (await quotas.admit(tenant)).release()
    assert (await quotas.spent([tenant]))[tenant].daily == 0
    assert await redis.ttl(periods(T0)[0].key(tenant)) > 0  # counters expire by themselves


async def test_a_spent_monthly_budget_refuses_with_its_period(redis: Redis) -> None:
    tenant = await _tenant(redis, monthly_token_budget=50)
    clock = Clock()
    quotas = _replica(redis, clock)
    admission = await quotas.admit(tenant)
    admission.spend(50)
    await admission.release()
    clock.now = T0 + 3 * 86_400  # days go by; the month does not
    with pytest.raises(RateLimited) as refused:
        await quotas.admit(tenant)
    assert refused.value.code == "quota_exceeded" and "monthly token budget" in refused.value.message
    clock.now = datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    await (await quotas.admit(tenant)).release()


async def test_a_release_sent_again_gives_back_and_charges_once(redis: Redis) -> None:
    """The release script run a second time (its reply lost after it ran: redis-py sends the pipeline again)
    changes nothing: the reservation is given back and the spent tokens charged once."""
    tenant = await _tenant(redis, tpm=10_000, daily_token_budget=1_000)
    quotas = _replica(redis, Clock())
    admission = await quotas.admit(tenant, reserve_tokens=500)
    admission.spend(40)
    for _ in range(2):
        await quotas.give_back(admission)
    assert (await quotas.spent([tenant]))[tenant].daily == 40
    assert sum(int(v) for v in (await redis.hgetall(tokens_key(tenant))).values()) == 40
    other = await quotas.admit(tenant, reserve_tokens=10)  # another admission's release is its own
    other.spend(5)
    await other.release()
    assert (await quotas.spent([tenant]))[tenant].daily == 45


async def test_forgetting_a_tenant_drops_its_windows_and_counters(redis: Redis) -> None:
    tenant = await _tenant(redis, rpm=5, tpm=100, max_concurrency=2)
    quotas = _replica(redis, Clock())
    admission = await quotas.admit(tenant, reserve_tokens=10)
    admission.spend(5)
    await admission.release()
    await quotas.admit(tenant)
    await quotas.forget(tenant)
    day, month = periods(T0)
    assert await redis.exists(requests_key(tenant), tokens_key(tenant), leases_key(tenant), day.key(tenant),
                              month.key(tenant)) == 0


async def test_a_release_while_redis_is_unreachable_does_not_fail_the_request() -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    admission = Admission(tenant="acme", quotas=Quotas(unreachable, metrics=Metrics(), clock=Clock()),
                          lease="a1b2c3", reserved=10)
    try:
        await admission.release()  # logged, not raised: the lease expires by itself
    finally:
        await unreachable.aclose()
    assert admission.quotas is None
