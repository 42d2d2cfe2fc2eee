"""The routing simulation's pieces: its baselines and its cache-only reference."""

from __future__ import annotations

import random

import httpx

from loadtests.routing_sim import RoundRobinPool, RunResult, TwoChoicesPool, Zipf, _goal, cache_reference

URLS = [f"http://replica-{i}" for i in range(4)]
NAME = "banyan.t.a.v1.abcdef012345"


def _transport() -> httpx.MockTransport:
    return httpx.MockTransport(lambda r: httpx.Response(200))


def test_round_robin_cycles_whatever_the_adapter_and_skips_unhealthy_replicas() -> None:
    pool = RoundRobinPool(URLS, transport=_transport())
    pool.replicas[1].healthy = False
    picks = [pool.choose(NAME, is_adapter=True)[0].url for _ in range(6)]
    assert picks == [URLS[0], URLS[2], URLS[3]] * 2


def test_two_choices_takes_the_less_loaded_of_its_pair() -> None:
    pool = TwoChoicesPool(URLS, transport=_transport())
    for i, replica in enumerate(pool.replicas):
        replica.inflight = 10 * i
    picks = [pool.replicas.index(pool.choose(NAME, is_adapter=True)[0]) for _ in range(200)]
    assert 3 not in picks  # the busiest replica always loses its pair
    assert set(picks) == {0, 1, 2}


def test_zipf_favours_low_ranks() -> None:
    zipf = Zipf(1000, 1.0, random.Random(1))
    draws = [zipf.draw() for _ in range(20_000)]
    assert min(draws) >= 0 and max(draws) < 1000
    assert draws.count(0) > 5 * draws.count(9) > 0  # p(0) / p(9) = 10


def test_partitioning_by_adapter_beats_round_robin_and_big_caches_only_miss_once() -> None:
    ref = cache_reference(replicas=8, resident=16, adapters=2000, zipf_s=1.05, seed=3, warmup=20_000, measure=5000)
    assert ref["partitioned"] < ref["round_robin"] / 1.5
    roomy = cache_reference(replicas=4, resident=50, adapters=50, zipf_s=1.05, seed=3, warmup=20_000, measure=5000)
    assert roomy["partitioned"] == 0.0  # every adapter fits in its one replica and was loaded in the warm-up


def _result(policy: str, cold: float, imbalance: float = 1.1) -> RunResult:
    return RunResult(policy=policy, replicas=64, requests=6000, cold_per_1000=cold, swaps_per_1000=0.0,
                     imbalance=imbalance, inst_max_over_mean=imbalance, queue_p50_s=0.0, queue_p99_s=0.0,
                     mean_wait_s=0.0, mean_load_s=0.0, errors=0, wall_s=1.0, placements={}, cold_by_placement={})


def test_the_goal_uses_a_measured_round_robin_and_else_the_cache_only_reference() -> None:
    references = {"64": {"round_robin": 600.0, "partitioned": 100.0}}
    measured = _goal([_result("banyan", 120.0), _result("round-robin", 540.0)], references)["64"]
    assert measured["cold_loads_fewer_than_round_robin_x"] == 4.5 and measured["round_robin"] == "measured"
    assert measured["partitioned_reference_x"] == 6.0 and not measured["met"]
    alone = _goal([_result("banyan", 120.0)], references)["64"]
    assert alone["cold_loads_fewer_than_round_robin_x"] == 5.0 and alone["met"]
    assert not _goal([_result("banyan", 100.0, imbalance=1.3)], references)["64"]["met"]  # over max/mean 1.25
