"""Usage over time on a real Valkey (the recording script is the logic): hour and day buckets aligned to UTC, the
request's ``user`` named up to a cap per bucket, retention by key expiry, one round trip per request, and a
tenant's buckets gone with the tenant. The clock is the test's."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from gateway.redis_batch import ONCE_TTL_S
from gateway.usage import Bucket, UsageStore, bucket_start

DAY = 1_800_057_600  # a UTC midnight (divisible by 86400)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _table(bucket: Bucket) -> list[tuple[str, str | None, int, int, int]]:
    return [(r.model, r.user, r.counts.requests, r.counts.prompt_tokens, r.counts.completion_tokens)
            for r in bucket.rows]


def test_buckets_start_at_utc_hours_and_days() -> None:
    assert DAY % 86400 == 0
    assert bucket_start(DAY + 3 * 3600 + 59, "1h") == DAY + 3 * 3600
    assert bucket_start(DAY + 23 * 3600 + 3599, "1d") == DAY


async def test_requests_land_in_their_hour_and_day_by_model_and_user(redis: Redis) -> None:
    clock = Clock(DAY + 10)
    store = UsageStore(redis, clock=clock)
    await store.record("acme", model="bot", prompt_tokens=3, completion_tokens=4, user="alice")
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1, user="alice")
    await store.record("acme", model="base", prompt_tokens=5, completion_tokens=0)
    clock.now = DAY + 3600 + 5  # the next hour, same day
    await store.record("acme", model="bot", prompt_tokens=2, completion_tokens=2, user="bob|ops")
    await store.record("globex", model="bot", prompt_tokens=9, completion_tokens=9, user="alice")

    hours = await store.buckets("acme", width="1h", starts=[DAY, DAY + 3600, DAY + 7200])
    assert [(b.start_time, b.end_time) for b in hours] == [(DAY, DAY + 3600), (DAY + 3600, DAY + 7200),
                                                           (DAY + 7200, DAY + 10800)]
    assert _table(hours[0]) == [("base", None, 1, 5, 0), ("bot", "alice", 2, 4, 5)]
    assert _table(hours[1]) == [("bot", "bob|ops", 1, 2, 2)]  # a user may hold the separator
    assert _table(hours[2]) == []
    (day,) = await store.buckets("acme", width="1d", starts=[DAY])
    assert _table(day) == [("base", None, 1, 5, 0), ("bot", "alice", 2, 4, 5), ("bot", "bob|ops", 1, 2, 2)]
    assert (await store.get("acme")).total.requests == 4  # the totals as before
    assert await store.tenants_in(width="1h", starts=[DAY, DAY + 3600]) == [["acme"], ["acme", "globex"]]
    rows = await store.tenant_buckets([("globex", DAY + 3600), ("acme", DAY)], width="1h")
    assert [[(r.tenant, r.model, r.user) for r in found] for found in rows] == [
        [("globex", "bot", "alice")], [("acme", "base", None), ("acme", "bot", "alice")]]


async def test_users_beyond_the_cap_of_a_bucket_count_without_a_user(redis: Redis) -> None:
    store = UsageStore(redis, max_users_per_bucket=2, clock=Clock(DAY))
    for user in ("u1", "u2", "u3", "u1", "u4"):
        await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=0, user=user)
    (hour,) = await store.buckets("acme", width="1h", starts=[DAY])
    assert _table(hour) == [("bot", None, 2, 2, 0), ("bot", "u1", 2, 2, 0), ("bot", "u2", 1, 1, 0)]
    assert await redis.scard(f"banyan:usage:acme:1h:{DAY}:users") == 2


async def test_bucket_keys_expire_a_retention_period_after_their_bucket_ends(redis: Redis) -> None:
    now = DAY + 7200 + 30
    store = UsageStore(redis, hourly_retention_s=3600, daily_retention_s=86400 * 3, clock=Clock(now))
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1, user="alice")
    hour = bucket_start(now, "1h")
    for key in (f"banyan:usage:acme:1h:{hour}", f"banyan:usage:acme:1h:{hour}:users",
                f"banyan:usage:1h:{hour}:tenants"):
        assert await redis.expiretime(key) == hour + 3600 + 3600
    for key in (f"banyan:usage:acme:1d:{DAY}", f"banyan:usage:1d:{DAY}:tenants"):
        assert await redis.expiretime(key) == DAY + 86400 + 86400 * 3


async def test_recording_is_one_round_trip(redis: Redis) -> None:
    sent: list[Any] = []
    original = redis.connection_pool.get_connection

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(args)
        return await original(*args, **kwargs)

    store = UsageStore(redis, clock=Clock(DAY))
    redis.connection_pool.get_connection = counting  # type: ignore[method-assign]
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1, user="alice")
    assert len(sent) == 1


async def test_a_record_sent_again_counts_once(redis: Redis) -> None:
    """A record whose reply was lost after Redis ran it (a connection that broke) is sent again, by redis-py or by
    the background retry, with the same id: it counts once; a record of its own id counts again."""
    store = UsageStore(redis, clock=Clock(DAY))
    for _ in range(3):
        await store.record("acme", model="bot", prompt_tokens=3, completion_tokens=4, user="alice", record_id="r1")
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1, record_id="r2")
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1)  # each one a new id
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1)
    total = (await store.get("acme")).total
    assert (total.requests, total.prompt_tokens, total.completion_tokens) == (4, 6, 7)
    (hour,) = await store.buckets("acme", width="1h", starts=[DAY])
    assert _table(hour) == [("bot", None, 3, 3, 3), ("bot", "alice", 1, 3, 4)]
    assert 0 < await redis.ttl("banyan:once:usage:r1") <= ONCE_TTL_S  # the mark goes by itself


async def test_deleting_a_tenant_removes_its_buckets_only(redis: Redis) -> None:
    clock = Clock(DAY - 20 * 86400 + 7 * 3600)  # one bucket of each width 20 days ago, within their retention
    store = UsageStore(redis, clock=clock)
    await store.record("acme", model="bot", prompt_tokens=1, completion_tokens=1, user="alice")
    clock.now = DAY
    for tenant in ("acme", "acme-two"):
        await store.record(tenant, model="bot", prompt_tokens=1, completion_tokens=1, user="alice")
    assert len([k async for k in redis.scan_iter(match="banyan:usage:acme:*")]) == 9  # and the totals
    await store.delete("acme")
    assert not [k async for k in redis.scan_iter(match="banyan:usage:acme:*")]
    assert not await redis.exists("banyan:usage:acme")
    (kept,) = await store.buckets("acme-two", width="1d", starts=[DAY])
    assert _table(kept) == [("bot", "alice", 1, 1, 1)]
    rows = await store.tenant_buckets([("acme", DAY), ("acme-two", DAY)], width="1d")
    assert [len(r) for r in rows] == [0, 1]  # still in the bucket's tenant set: read as empty
