"""Adapter-aware routing over several replicas."""

from __future__ import annotations

import httpx
import pytest

from gateway.engine import HttpEnginePool

URLS = [f"http://replica-{i}" for i in range(4)]


def _pool(saturation: int = 2) -> HttpEnginePool:
    return HttpEnginePool(URLS, saturation=saturation,
                          transport=httpx.MockTransport(lambda r: httpx.Response(200)))


def test_adapter_goes_to_the_same_home_each_time() -> None:
    pool = _pool()
    homes = {pool.choose(f"banyan.t.a{i}.v1.abcdef012345", adapter=True).url for i in range(40)}
    assert len(homes) > 1  # spread over replicas
    name = "banyan.t.x.v1.abcdef012345"
    assert len({pool.choose(name, adapter=True).url for _ in range(10)}) == 1


async def test_saturated_home_spills_to_least_loaded_and_residency_is_remembered() -> None:
    pool = _pool(saturation=1)
    name = "banyan.t.x.v1.abcdef012345"
    home = pool.choose(name, adapter=True)
    async with pool.lease(name, adapter=True) as first:
        assert first is home
        async with pool.lease(name, adapter=True) as second:
            assert second is not home
    assert name in home.resident and name in second.resident


async def test_unhealthy_replicas_are_skipped() -> None:
    def health(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.host == "replica-2" else 503)

    pool = HttpEnginePool(URLS, transport=httpx.MockTransport(health))
    status = await pool.check()
    assert status == {u: u == "http://replica-2" for u in URLS}
    assert {pool.choose(f"banyan.t.a{i}.v1.abcdef012345", adapter=True).url for i in range(20)} == {"http://replica-2"}


@pytest.mark.parametrize("inflight", [(0, 3, 1, 2), (5, 0, 5, 5)])
def test_base_model_goes_to_least_loaded(inflight: tuple[int, ...]) -> None:
    pool = _pool()
    for replica, n in zip(pool.replicas, inflight, strict=True):
        replica.inflight = n
    assert pool.choose("banyan-demo", adapter=False) is pool.replicas[inflight.index(min(inflight))]
