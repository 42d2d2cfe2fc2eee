"""Version metadata as the registry stores it in Redis, and traffic splits (against a throwaway Valkey; the rest of
the registry is tested on the real stack)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from redis.asyncio import Redis

from adapters.registry import (
    SPLIT_BUCKETS,
    AdapterRegistry,
    Serving,
    Split,
    UnknownVersion,
    VersionMeta,
    split_bucket,
)

META = VersionMeta(version=2, uid="0123456789ab", sha256="f" * 64, rank=8, alpha=16.0, target_modules=["q_proj"],
                   size_bytes=1234, created=1700000000)


def test_version_meta_round_trip() -> None:
    assert VersionMeta.from_json(META.to_json()) == META


def test_version_meta_written_by_earlier_versions_still_parses() -> None:
    stored = json.loads(META.to_json()) | {"extra": {}}  # what was written while VersionMeta had `extra`
    assert VersionMeta.from_json(json.dumps(stored)) == META


def test_a_version_keeps_its_base_model_and_older_records_have_none() -> None:
    bound = dataclasses.replace(META, base_model="banyan-demo")
    assert VersionMeta.from_json(bound.to_json()) == bound
    older = json.loads(META.to_json())
    del older["base_model"]  # written before versions were bound to a base: read as the default base by the gateway
    assert VersionMeta.from_json(json.dumps(older)).base_model is None


# -- traffic splits, against a throwaway Valkey (the registry's logic is in its scripts) -----------------


def _meta(version: int) -> VersionMeta:
    return dataclasses.replace(META, version=version, uid=f"uid{version:09d}")


async def _adapter(redis: Redis, versions: tuple[int, ...] = (1, 2, 3), *, active: int = 1) -> AdapterRegistry:
    registry = AdapterRegistry(redis)
    for version in versions:
        assert await registry.allocate_version("acme", "bot") == version
        assert await registry.record_version("acme", "bot", _meta(version), activate=version == active)
    return registry


async def test_a_split_is_stored_with_the_active_version_and_read_in_one_round_trip(redis: Redis) -> None:
    registry = await _adapter(redis)
    record = await registry.activate("acme", "bot", 1, canary=Split(version=3, percent=25))
    assert record.active == 1 and record.canary == Split(version=3, percent=25)
    assert await registry.get("acme", "bot") == record
    calls: list[tuple[object, ...]] = []
    real = redis.execute_command

    async def counted(*args: object, **options: object) -> object:
        calls.append(args)
        return await real(*args, **options)

    await registry.serving("acme", "bot")  # the script is loaded on its first use
    redis.execute_command = counted  # type: ignore[method-assign]
    serving = await registry.serving("acme", "bot")
    assert len(calls) == 1 and calls[0][0] == "EVALSHA"
    assert serving == Serving(active=_meta(1), canary=_meta(3), percent=25)
    assert await registry.active_meta("acme", "bot") == _meta(1)


async def test_activating_without_a_canary_ends_the_split(redis: Redis) -> None:
    registry = await _adapter(redis)
    await registry.activate("acme", "bot", 1, canary=Split(version=2, percent=50))
    promoted = await registry.activate("acme", "bot", 2)
    assert promoted.active == 2 and promoted.canary is None
    assert await registry.serving("acme", "bot") == Serving(active=_meta(2))


async def test_an_upload_activated_ends_the_split_and_one_staged_keeps_it(redis: Redis) -> None:
    registry = await _adapter(redis)
    await registry.activate("acme", "bot", 1, canary=Split(version=2, percent=50))
    assert await registry.allocate_version("acme", "bot") == 4
    await registry.record_version("acme", "bot", _meta(4), activate=False)
    assert (await registry.serving("acme", "bot")) == Serving(active=_meta(1), canary=_meta(2), percent=50)
    assert await registry.allocate_version("acme", "bot") == 5
    await registry.record_version("acme", "bot", _meta(5), activate=True)
    assert await registry.serving("acme", "bot") == Serving(active=_meta(5))


async def test_a_split_naming_a_missing_version_changes_nothing(redis: Redis) -> None:
    registry = await _adapter(redis)
    await registry.activate("acme", "bot", 1, canary=Split(version=2, percent=10))
    for version, canary, missing in ((1, 9, 9), (9, 2, 9)):
        with pytest.raises(UnknownVersion) as caught:
            await registry.activate("acme", "bot", version, canary=Split(version=canary, percent=10))
        assert caught.value.version == missing
    assert await registry.serving("acme", "bot") == Serving(active=_meta(1), canary=_meta(2), percent=10)


async def test_a_split_ends_with_its_version_or_its_adapter(redis: Redis) -> None:
    registry = await _adapter(redis)
    await registry.activate("acme", "bot", 1, canary=Split(version=3, percent=90))
    await redis.hdel("banyan:adapter:acme:bot", "v3")  # the canary's version gone from under the split
    assert await registry.serving("acme", "bot") == Serving(active=_meta(1))
    record = await registry.get("acme", "bot")
    assert record is not None and record.canary is None
    await registry.delete("acme", "bot")
    assert await registry.serving("acme", "bot") is None
    with pytest.raises(UnknownVersion):
        await registry.activate("acme", "bot", 1, canary=Split(version=2, percent=10))
    assert await registry.allocate_version("acme", "bot") == 4
    await registry.record_version("acme", "bot", _meta(4), activate=True)
    assert await registry.serving("acme", "bot") == Serving(active=_meta(4))


def test_split_buckets_are_sticky_per_user_and_spread_evenly() -> None:
    buckets = [split_bucket("acme", "bot", f"user-{i}") for i in range(20_000)]
    assert buckets[:100] == [split_bucket("acme", "bot", f"user-{i}") for i in range(100)]
    assert all(0 <= b < SPLIT_BUCKETS for b in buckets)
    for percent in (1, 10, 20, 50, 90):
        share = sum(b < percent for b in buckets) / len(buckets)
        assert abs(share - percent / 100) < 0.01, (percent, share)
    # Another adapter (or tenant) buckets the same users independently.
    other = [split_bucket("acme", "other", f"user-{i}") for i in range(20_000)]
    assert sum(a < 20 and b < 20 for a, b in zip(buckets, other, strict=True)) / len(buckets) < 0.06


def test_pick_follows_the_bucket() -> None:
    split = Serving(active=_meta(1), canary=_meta(2), percent=20)
    assert [split.pick(b)[0].version for b in (0, 19, 20, 99)] == [2, 2, 1, 1]
    assert [split.pick(b)[1] for b in (0, 19, 20, 99)] == [True, True, False, False]
    assert Serving(active=_meta(1)).pick(0) == (_meta(1), False)
    assert {Serving(active=_meta(1), canary=_meta(2), percent=0).pick(b)[0].version for b in range(100)} == {1}
    assert {Serving(active=_meta(1), canary=_meta(2), percent=100).pick(b)[0].version for b in range(100)} == {2}
