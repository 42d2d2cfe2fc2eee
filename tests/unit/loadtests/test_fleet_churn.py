"""The fleet churn script's pure parts: what one engine and one gateway did between two metric snapshots."""

from __future__ import annotations

from loadtests._stack import parse_metrics
from loadtests.fleet_churn import engine_delta, gateway_delta, parse_args

ENGINE_BEFORE = """
vllm:request_success_total{finished_reason="length",model_name="m"} 5
vllm:request_success_total{finished_reason="stop",model_name="m"} 1
banyan_resolver_adapter_fetch_seconds_count 2
banyan_resolver_adapter_loads_total{stage="fetch",result="ok"} 2
banyan_resolver_evictions_total{reason="unregistered"} 1
banyan_resolver_disk_cache_peak_bytes 100
banyan_resolver_disk_cache_max_bytes 1000
"""
ENGINE_AFTER = """
vllm:request_success_total{finished_reason="length",model_name="m"} 45
vllm:request_success_total{finished_reason="stop",model_name="m"} 3
banyan_resolver_adapter_fetch_seconds_count 9
banyan_resolver_adapter_loads_total{stage="fetch",result="ok"} 8
banyan_resolver_adapter_loads_total{stage="fetch",result="error"} 1
banyan_resolver_evictions_total{reason="unregistered"} 4
banyan_resolver_disk_cache_peak_bytes 900
banyan_resolver_disk_cache_max_bytes 1000
"""


def test_engine_delta_counts_only_what_happened_between_the_snapshots() -> None:
    delta = engine_delta(parse_metrics(ENGINE_BEFORE), parse_metrics(ENGINE_AFTER))
    assert delta["requests"] == 42  # both finish reasons
    assert delta["cold_loads_s3_fetches"] == 7
    assert delta["loads_by_result"] == {"ok": 6, "error": 1}
    assert delta["evictions"] == {"unregistered": 3}
    assert (delta["disk_cache_peak_bytes"], delta["disk_cache_max_bytes"]) == (900, 1000)


def test_gateway_delta_leaves_out_labels_that_did_not_move() -> None:
    before = parse_metrics('banyan_adapter_placements_total{placement="home"} 3\n'
                           'banyan_adapter_placements_total{placement="spill"} 2\n'
                           'banyan_tokens_total{kind="completion"} 10\n')
    after = parse_metrics('banyan_adapter_placements_total{placement="home"} 7\n'
                          'banyan_adapter_placements_total{placement="spill"} 2\n'
                          'banyan_adapter_placements_total{placement="resident"} 5\n'
                          'banyan_tokens_total{kind="completion"} 74\n')
    delta = gateway_delta(before, after)
    assert delta["placements"] == {"home": 4, "resident": 5}
    assert delta["tokens"] == {"completion": 64}
    assert delta["unloads"] == {} and delta["rate_limited"] == {}


def test_arguments_override_the_quick_churn_settings() -> None:
    cfg = parse_args(["--requests", "300", "--quota-rpm", "7"])
    assert cfg.churn.requests == 300 and cfg.churn.adapters == 200 and cfg.churn.direct_requests == 0
    assert cfg.quota_rpm == 7 and cfg.gateways == 2 and cfg.engines == 2
