"""The engine-client benchmark runs end to end on a small budget and reports every caller."""

from __future__ import annotations

import json

import pytest

from loadtests import engine_client_bench


@pytest.mark.parametrize("stream", [False, True])
def test_every_caller_is_measured_against_the_stub(stream: bool, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--calls", "40", "--concurrency", "8", "--rounds", "1", *(["--stream"] if stream else [])]
    assert engine_client_bench.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    result = json.loads(last[len("RESULT "):])
    assert result["mode"] == ("stream" if stream else "json")
    assert set(result["callers"]) == {"httpx", "httpx+aiohttp", "aiohttp"}
    for row in result["callers"].values():
        assert row["cpu_us_per_call"] > 0 and row["calls_per_s"] > 0
