"""The bare proxies the bench measures the gateway against (the ASGI one, and the relay at the protocol level):
each relays JSON, streams and the upstream's status from the stub unchanged."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.dev.processes import free_port

BODY = {"model": "banyan-demo", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["loadtests.minimal_proxy", "loadtests.proto_proxy"])
def urls(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    stub_port, proxy_port = free_port(), free_port()
    stub_url, proxy_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{proxy_port}"
    stub = subprocess.Popen([sys.executable, "-m", "loadtests.stub_openai", "--port", str(stub_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, "-m", request.param, "--port", str(proxy_port),
                              "--upstream", stub_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(stub_url + "/health")
        _wait(proxy_url + "/health")
        yield stub_url, proxy_url
    finally:
        for child in (proxy, stub):
            child.terminate()
            child.wait(timeout=30)


def test_a_json_completion_comes_back_as_the_stub_sent_it(urls: tuple[str, str]) -> None:
    stub_url, proxy_url = urls
    direct = httpx.post(stub_url + "/v1/chat/completions", json=BODY).json()
    relayed = httpx.post(proxy_url + "/v1/chat/completions", json=BODY)
    assert relayed.status_code == 200
    assert relayed.json()["choices"][0]["message"] == direct["choices"][0]["message"]


def test_a_stream_is_relayed_to_its_end(urls: tuple[str, str]) -> None:
    _, proxy_url = urls
    with httpx.stream("POST", proxy_url + "/v1/chat/completions", json={**BODY, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = b"".join(response.iter_raw()).decode()
    assert text.count("data: ") >= 2 and text.rstrip().endswith("data: [DONE]")


def test_the_upstreams_status_comes_back(urls: tuple[str, str]) -> None:
    stub_url, proxy_url = urls
    direct = httpx.post(stub_url + "/v1/nothing-here", json=BODY)
    relayed = httpx.post(proxy_url + "/v1/nothing-here", json=BODY)
    assert direct.status_code >= 400 and relayed.status_code == direct.status_code
    assert relayed.json() == direct.json()
