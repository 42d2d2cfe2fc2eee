"""The bench's report of the gateway-alone phase: its ratios come from the entries measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtests.bench import FLOOR, GATEWAY, GATEWAY_B, Options, _report_alone

RPS = {"stub direct": 1000.0, GATEWAY: 400.0, GATEWAY_B: 100.0, FLOOR: 800.0}
CPU = {GATEWAY: 0.8, GATEWAY_B: 2.5, FLOOR: 0.2}
PER_TOKEN = {GATEWAY: 25.0, GATEWAY_B: 78.1, FLOOR: 6.25}


def _alone(targets: list[str]) -> dict[str, Any]:
    alone: dict[str, Any] = {}
    for mode in ("nonstream", "stream"):
        factor = 1.0 if mode == "nonstream" else 0.5
        for target in targets:
            entry: dict[str, Any] = {"mode": mode, "target": target, "concurrency": 64, "requests": 10, "errors": 0,
                                     "rps": RPS[target] * factor, "p50_ms": 1.0, "p99_ms": 2.0,
                                     "client_cpu_ms_per_request": 0.3}
            if target != "stub direct":
                entry |= {"gateway_cpu_ms_per_request": CPU[target] / factor, "gateway_cpu_cores": 0.5,
                          "gateway_cpu_us_per_token": PER_TOKEN[target] / factor}
            alone[f"{mode}/{target}/c64"] = entry
    return alone


def _options(**kwargs: Any) -> Options:
    return Options(rounds=1, requests=1, concurrency=64, max_tokens=8, stub_seconds=1.0, stub_concurrency=[64],
                   data_dir=Path("."), skip_stub=False, **kwargs)


def test_every_ratio_is_its_pair_of_targets(capsys: pytest.CaptureFixture[str]) -> None:
    result = _report_alone(_alone(["stub direct", GATEWAY, GATEWAY_B, FLOOR]),
                           _options(compare_env={"X": "1"}))
    assert result["gateway_alone_ratio"] == {"stream": 0.4, "nonstream": 0.4}
    assert result["gateway_b_over_a_rps"] == {"stream": 0.25, "nonstream": 0.25}
    assert result["gateway_b_alone_ratio"] == {"stream": 0.1, "nonstream": 0.1}
    assert result["gateway_b_cpu_ms_per_request"] == {"stream": 5.0, "nonstream": 2.5}
    assert result["floor_alone_ratio"] == {"stream": 0.8, "nonstream": 0.8}
    assert result["floor_cpu_ms_per_request"] == {"stream": 0.4, "nonstream": 0.2}
    assert result["gateway_over_floor_rps"] == {"stream": 0.5, "nonstream": 0.5}
    assert (result["gateway_alone_cpu_us_per_token"], result["gateway_b_cpu_us_per_token"],
            result["floor_cpu_us_per_token"]) == (50.0, 156.2, 12.5)  # streamed: per token of the stream mode
    assert result["stub_event_gap_ms"] == 0.0
    assert result["gateway_alone_nonstream_max_rps"] == 400.0 and result["stub_direct_stream_max_rps"] == 500.0
    assert "bare proxy" in capsys.readouterr().out


def test_without_gateway_b_or_the_floor_their_fields_are_absent() -> None:
    result = _report_alone(_alone(["stub direct", GATEWAY]), _options())
    assert result["gateway_alone_ratio"] == {"stream": 0.4, "nonstream": 0.4}
    assert not {"gateway_b_over_a_rps", "floor_alone_ratio", "gateway_over_floor_rps"} & result.keys()
