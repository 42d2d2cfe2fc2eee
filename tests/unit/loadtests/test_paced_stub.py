"""The stub's paced streams (``--event-gap-ms``: events one by one, as an engine generating sends them, with usage on
every event when asked) and the time-to-first-token A/B's measurement against it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.dev.processes import free_port
from loadtests.ttft_ab import _measure
from tests.unit.loadtests.test_minimal_proxy import _wait

GAP_S = 0.02


@pytest.fixture(scope="module")
def paced_url() -> Iterator[str]:
    port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "loadtests.stub_openai", "--port", str(port),
                             "--event-gap-ms", str(GAP_S * 1000)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url + "/health")
        yield url
    finally:
        stub.terminate()
        stub.wait(timeout=30)


def test_a_paced_stream_sends_its_events_apart_each_with_its_usage_so_far(paced_url: str) -> None:
    body = {"model": "banyan-demo", "prompt": "hi", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    arrivals: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    with httpx.stream("POST", paced_url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            arrivals.append((time.perf_counter() - started, chunk))
    events = [e for _, chunk in arrivals for e in chunk.split(b"\n\n") if e.startswith(b"data: {")]
    texts = [json.loads(e[len(b"data: "):]) for e in events]
    tokens = [t for t in texts if t["choices"]]
    assert [t["usage"]["completion_tokens"] for t in tokens] == [1, 2, 3, 4, 5]  # usage so far on every event
    assert texts[-1]["choices"] == [] and texts[-1]["usage"]["completion_tokens"] == 5
    assert len(arrivals) >= 5  # not one read: the events came apart
    assert arrivals[-1][0] >= 8 * GAP_S  # head, 5 tokens, the usage event, [DONE], the end: a gap between each


def test_the_ab_measures_each_target_as_often_one_request_at_a_time(paced_url: str) -> None:
    targets = {"engine": (paced_url, "k"), "A": (paced_url, "k"), "B": (paced_url, "k")}
    seen = asyncio.run(_measure(targets, "banyan-demo", requests=3, max_tokens=2, warmup=1))
    assert {name: len(values) for name, values in seen.items()} == {"engine": 3, "A": 3, "B": 3}
    # The first text comes after the head and the role event, each a gap later; the stream is not waited for.
    assert all(2 * GAP_S <= v < 2 * GAP_S + 0.5 for values in seen.values() for v in values)
