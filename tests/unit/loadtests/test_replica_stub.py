"""The replica model behind the routing simulation: cold loads, a bounded LRU of adapters, batch cost."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loadtests.replica_stub import Replica, ReplicaModel, ReplicaServer

FAST = 0.001  # real seconds per model second


async def test_a_cold_load_is_counted_once_and_a_resident_adapter_is_warm() -> None:
    replica = Replica(model=ReplicaModel(cold_load_s=0.5, swap_s=0.02, time_scale=FAST))
    first = await replica.complete("banyan.t.a.v1.x")
    assert first["load_s"] == 0.5 and first["cold"] == 1.0 and replica.counters.cold_loads == 1
    second = await replica.complete("banyan.t.a.v1.x")
    assert second["load_s"] == 0.0 and second["cold"] == 0.0 and replica.counters.cold_loads == 1
    await replica.complete(None)  # the base model needs no adapter
    assert replica.counters.cold_loads == 1 and replica.counters.requests == 3


async def test_concurrent_requests_for_a_cold_adapter_share_one_load() -> None:
    replica = Replica(model=ReplicaModel(time_scale=FAST))
    timings = await asyncio.gather(*(replica.complete("banyan.t.a.v1.x") for _ in range(5)))
    assert replica.counters.cold_loads == 1
    assert sorted(t["cold"] for t in timings) == [0.0, 0.0, 0.0, 0.0, 1.0]  # the one that loaded it is marked


async def test_residency_is_an_lru_bounded_by_max_resident() -> None:
    replica = Replica(model=ReplicaModel(max_resident=2, max_loras=1, time_scale=FAST))
    for name in ("a", "b", "a", "c"):  # touching a again makes b the least recently used
        await replica.complete(name)
    assert list(replica.resident) == ["a", "c"]
    await replica.complete("b")  # evicted, so cold again
    assert replica.counters.cold_loads == 4
    await replica.complete("c")  # resident but not in the one GPU slot: a swap, not a load
    assert replica.counters.cold_loads == 4 and replica.counters.swaps >= 1


def test_service_time_grows_with_the_batch() -> None:
    model = ReplicaModel(base_s=1.0, per_batch_s=0.1)
    assert model.service_s(1) == pytest.approx(1.1)
    assert model.service_s(16) == pytest.approx(2.6)


async def test_a_fuller_batch_serves_each_request_more_slowly() -> None:
    replica = Replica(model=ReplicaModel(base_s=1.0, per_batch_s=0.1, max_running=8, time_scale=FAST))
    alone = await replica.complete(None)
    together = await asyncio.gather(*(replica.complete(None) for _ in range(8)))
    assert alone["service_s"] == pytest.approx(1.1)
    assert max(t["service_s"] for t in together) == pytest.approx(1.8)


async def test_the_running_cap_makes_requests_wait() -> None:
    replica = Replica(model=ReplicaModel(max_running=2, base_s=10.0, per_batch_s=0.0, time_scale=FAST))
    timings = await asyncio.gather(*(replica.complete(None) for _ in range(4)))
    waits = sorted(t["wait_s"] for t in timings)
    assert waits[1] < 1.0 and waits[2] >= 9.0  # two start at once; the third waits a whole service time


async def test_http_surface_lists_residency_and_unloads() -> None:
    server = ReplicaServer(Replica(model=ReplicaModel(time_scale=FAST), base_model="base"))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/health")).status_code == 200
            answer = await client.post("/v1/completions", json={"model": "banyan.t.a.v1.x", "prompt": "x"})
            assert answer.status_code == 200 and answer.json()["banyan_stub"]["load_s"] > 0
            ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert ids == ["base", "banyan.t.a.v1.x"]
            gone = await client.post("/v1/unload_lora_adapter", json={"lora_name": "banyan.t.a.v1.x"})
            assert gone.status_code == 200
            again = await client.post("/v1/unload_lora_adapter", json={"lora_name": "banyan.t.a.v1.x"})
            assert again.status_code == 404
            assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["base"]
    finally:
        await server.stop()
    assert server.replica.counters.cold_loads == 1 and server.replica.counters.unloads == 1
