"""Adapter-aware routing over several replicas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway.engine import EnginePool

URLS = [f"http://replica-{i}" for i in range(4)]


def _pool(saturation: int = 2) -> EnginePool:
    return EnginePool(URLS, saturation=saturation,
                          transport=httpx.MockTransport(lambda r: httpx.Response(200)))


def test_adapter_goes_to_the_same_home_each_time() -> None:
    pool = _pool()
    homes = {pool.choose(f"banyan.t.a{i}.v1.abcdef012345", is_adapter=True)[0].url for i in range(40)}
    assert len(homes) > 1  # spread over replicas
    name = "banyan.t.x.v1.abcdef012345"
    assert len({pool.choose(name, is_adapter=True)[0].url for _ in range(10)}) == 1


async def test_saturated_home_spills_to_least_loaded_and_residency_is_remembered() -> None:
    pool = _pool(saturation=1)
    name = "banyan.t.x.v1.abcdef012345"
    home, placement = pool.choose(name, is_adapter=True)
    assert placement == "home"
    async with pool.lease(name, is_adapter=True) as first:
        assert first is home
        async with pool.lease(name, is_adapter=True) as second:
            assert second is not home
    assert name in home.resident and name in second.resident


async def test_unhealthy_replicas_are_skipped() -> None:
    def health(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.host == "replica-2" else 503)

    pool = EnginePool(URLS, transport=httpx.MockTransport(health))
    status = await pool.check()
    assert status == {u: u == "http://replica-2" for u in URLS}
    assert {pool.choose(f"banyan.t.a{i}.v1.abcdef012345", is_adapter=True)[0].url for i in range(20)} == {"http://replica-2"}


@pytest.mark.parametrize("inflight", [(0, 3, 1, 2), (5, 0, 5, 5)])
def test_base_model_goes_to_least_loaded(inflight: tuple[int, ...]) -> None:
    pool = _pool()
    for replica, n in zip(pool.replicas, inflight, strict=True):
        replica.inflight = n
    assert pool.choose("banyan-demo", is_adapter=False)[0] is pool.replicas[inflight.index(min(inflight))]


async def test_residency_is_bounded_by_unloading_idle_lru_adapters() -> None:
    unloads: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/unload_lora_adapter":
            unloads.append(json.loads(request.content)["lora_name"])
        return httpx.Response(200)

    pool = EnginePool(["http://only"], max_resident=2, transport=httpx.MockTransport(engine))
    names = [f"banyan.t.a{i}.v1.abcdef012345" for i in range(4)]
    async with pool.lease(names[0], is_adapter=True):  # a0 stays in flight throughout
        for name in names[1:]:
            async with pool.lease(name, is_adapter=True):
                pass
        await asyncio.sleep(0.01)
        assert unloads == [names[1], names[2]]  # a0 is least recently used but in flight: it stays
        assert set(pool.replicas[0].resident) == {names[0], names[3]}
    await pool.aclose()


async def test_residency_is_learned_from_the_replica() -> None:
    held = ["banyan.t.a1.v1.abcdef012345", "banyan.t.a2.v1.abcdef012345"]

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "banyan-demo"}, *({"id": n} for n in held)]})
        return httpx.Response(200)

    pool = EnginePool(["http://a", "http://b"], transport=httpx.MockTransport(engine))
    await pool.check()
    assert all(set(r.resident) == set(held) for r in pool.replicas)
    _, placement = pool.choose(held[0], is_adapter=True)
    assert placement == "resident"
    await pool.aclose()


async def test_a_request_waits_for_an_unload_of_its_adapter_under_way() -> None:
    events: list[str] = []
    gate = asyncio.Event()

    async def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/unload_lora_adapter":
            await gate.wait()
            events.append("unloaded " + json.loads(request.content)["lora_name"])
        return httpx.Response(200)

    pool = EnginePool(["http://only"], max_resident=1, transport=httpx.MockTransport(engine))
    a1, a2 = "banyan.t.a1.v1.abcdef012345", "banyan.t.a2.v1.abcdef012345"
    async with pool.lease(a1, is_adapter=True):
        pass
    async with pool.lease(a2, is_adapter=True):
        pass  # a1 is now over the bound: its unload starts (and hangs on the gate)

    async def request_a1() -> None:
        async with pool.lease(a1, is_adapter=True):
            events.append("request a1")

    waiting = asyncio.create_task(request_a1())
    await asyncio.sleep(0.01)
    assert events == []  # held back while vLLM may still drop the name
    gate.set()
    await asyncio.wait_for(waiting, 5)  # a deadlock fails here instead of hanging the suite
    assert events[:2] == [f"unloaded {a1}", "request a1"]
    await pool.aclose()


def _ranked(pool: EnginePool, name: str) -> list[int]:
    """Replica indexes in the order the pool prefers them for ``name`` when all are idle and none holds it."""
    order: list[int] = []
    saved = [r.inflight for r in pool.replicas]
    for _ in pool.replicas:
        replica, _placement = pool.choose(name, is_adapter=True)
        order.append(pool.replicas.index(replica))
        replica.inflight = 10_000  # closed: the next choice is the next replica in the order
    for replica, n in zip(pool.replicas, saved, strict=True):
        replica.inflight = n
    return order


def test_a_busy_home_spills_down_the_adapters_own_order_below_the_absolute_saturation() -> None:
    pool = EnginePool(URLS, saturation=256, spill_ratio=1.1, spill_margin=1.0,
                      transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    name = "banyan.t.hot.v1.abcdef012345"
    first, second, *_ = _ranked(pool, name)
    assert pool.choose(name, is_adapter=True) == (pool.replicas[first], "home")
    for replica in pool.replicas:
        replica.inflight = 4
    pool.replicas[first].inflight = 8  # bound: 1.1 * mean (5) + 1 = 6.5; far below saturation 256
    assert pool.choose(name, is_adapter=True) == (pool.replicas[second], "spill")
    other = next(i for i in range(4) if i not in (first, second))
    pool.replicas[other].inflight = 0  # the least loaded replica is not where the adapter spills
    assert pool.choose(name, is_adapter=True)[0] is pool.replicas[second]


def test_the_least_loaded_open_holder_wins_and_a_busy_holder_is_passed_over() -> None:
    pool = EnginePool(URLS, saturation=256, spill_ratio=1.1, spill_margin=1.0,
                      transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    name = "banyan.t.hot.v1.abcdef012345"
    first, _, third, fourth = _ranked(pool, name)
    pool.replicas[third].resident[name] = 0
    pool.replicas[fourth].resident[name] = 0
    for replica, n in zip(pool.replicas, (3, 3, 3, 3), strict=True):
        replica.inflight = n
    pool.replicas[third].inflight = 2
    assert pool.choose(name, is_adapter=True) == (pool.replicas[third], "resident")
    pool.replicas[third].inflight = 9  # over the bound (1.1 * 4.5 + 1 = 5.95): the other holder
    assert pool.choose(name, is_adapter=True) == (pool.replicas[fourth], "resident")
    pool.replicas[fourth].inflight = 9  # both holders busy: back to the adapter's home
    assert pool.choose(name, is_adapter=True) == (pool.replicas[first], "home")


def test_a_holder_may_run_hotter_than_the_spill_bound_before_the_adapter_is_copied() -> None:
    pool = EnginePool(URLS, saturation=256, spill_ratio=1.1, spill_margin=1.0, holder_ratio=1.4,
                      transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    name = "banyan.t.warm.v1.abcdef012345"
    first, second, *_ = _ranked(pool, name)
    pool.replicas[second].resident[name] = 0
    for replica in pool.replicas:
        replica.inflight = 4
    pool.replicas[second].inflight = 7  # mean 4.75: over the spill bound (6.2), under the holder's (7.65)
    assert pool.choose(name, is_adapter=True) == (pool.replicas[second], "resident")
    pool.replicas[second].inflight = 9  # mean 5.25: over the holder's bound (8.35) too: a copy at the home
    assert pool.choose(name, is_adapter=True) == (pool.replicas[first], "home")
    pool.replicas[second].inflight = 7
    other = EnginePool(URLS, saturation=256, spill_ratio=1.1, spill_margin=1.0, holder_ratio=1.1,
                       transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    for mine, theirs in zip(pool.replicas, other.replicas, strict=True):
        theirs.inflight, theirs.resident = mine.inflight, mine.resident
    assert other.choose(name, is_adapter=True) == (other.replicas[first], "home")  # without the slack: copied
