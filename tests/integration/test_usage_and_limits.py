"""Per-tenant usage accounting and limits (rpm, max_concurrency), kept in Redis, on the real stack."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import RunningStack, make_tenant, upload


def test_usage_is_counted_per_model_and_in_total(stack: RunningStack, admin: httpx.Client,
                                                 peft_adapters: dict[str, Path]) -> None:
    tenant = make_tenant(stack, admin, "usage")
    assert upload(admin, tenant.id, "counted", peft_adapters["alpha"]).status_code == 201
    client = tenant.client()
    base = stack.info["base_model"]
    a = client.completions.create(model="counted", prompt="hello", max_tokens=5)
    b = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    streamed = list(client.completions.create(model="counted", prompt="abc", max_tokens=4, stream=True))
    assert all(c.usage is None for c in streamed)  # not asked for: the gateway's own accounting stays hidden
    usage = admin.get(f"/admin/tenants/{tenant.id}/usage").json()
    assert usage["total"]["requests"] == 3
    assert usage["models"]["counted"] == {"requests": 2, "prompt_tokens": 5 + 3, "completion_tokens": 5 + 4,
                                          "total_tokens": 17}
    assert usage["models"][base]["prompt_tokens"] == b.usage.prompt_tokens  # type: ignore[union-attr]
    assert usage["total"]["completion_tokens"] == a.usage.completion_tokens + 3 + 4  # type: ignore[union-attr]
    other = make_tenant(stack, admin, "usage")
    assert admin.get(f"/admin/tenants/{other.id}/usage").json()["total"]["requests"] == 0
    assert admin.get("/admin/tenants/no-such-tenant/usage").status_code == 404


def test_requests_per_minute_limit(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "rpm")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"rpm": 2}).status_code == 200
    client = tenant.client()
    base = stack.info["base_model"]
    limited_before = stack.gateway_metric("banyan_rate_limited_total", reason="rpm")
    # The window is the clock's minute: requests may straddle two windows, so up to 2 x rpm get in first.
    admitted = 0
    with pytest.raises(openai.RateLimitError) as info:
        while admitted <= 4:
            client.completions.create(model=base, prompt="x", max_tokens=1)
            admitted += 1
    assert 2 <= admitted <= 4
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert stack.gateway_metric("banyan_rate_limited_total", reason="rpm") == limited_before + 1


def test_concurrency_limit(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "conc")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    base = stack.info["base_model"]
    slots, redis = f"banyan:rl:{tenant.id}:inflight", stack.redis()
    # The first request holds the tenant's only slot for as long as the test wants, however fast the engine is:
    # its stream (16 choices x 4000 tokens, ~12 MB of events) cannot fit in the buffers of a client that stops
    # reading with a fixed 4 KiB receive buffer (no autotuning), so the gateway cannot finish relaying it.
    held = {"model": base, "prompt": "long", "max_tokens": 4000, "ignore_eos": True, "n": 16, "stream": True}
    small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=120,
                      transport=small_window) as slow, slow.stream("POST", "/v1/completions", json=held) as first:
        assert first.status_code == 200, first.read()
        events = first.iter_bytes()  # kept: dropping the iterator would close the connection
        head = next(events)
        assert head.startswith(b"data: "), head
        assert redis.get(slots) == b"1"
        with tenant.http() as http:
            # Only the first request can hold the slot (no rpm or tpm limit is set): a 429 proves the limit.
            second = http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
        assert second.status_code == 429, second.text
        assert second.json()["error"]["type"] == "rate_limit_error"
        assert second.headers["retry-after"] == "1"
        assert redis.get(slots) == b"1"
    # The client went away mid-stream: the gateway notices and gives the slot back.
    deadline = time.monotonic() + 120  # the machine may stall for a whole generation (BENCHMARKS.md)
    while redis.get(slots) != b"0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis.get(slots) == b"0", "the slot of a stream whose client went away was never given back"
    with tenant.http() as http:
        assert http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_concurrency_slot_is_released_after_errors(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "slots")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    results: list[int] = []
    with tenant.http() as http:
        for model in ("missing-model", stack.info["base_model"]):
            for stream in (False, True):
                r = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1,
                                                       "stream": stream})
                results.append(r.status_code)
    assert results == [404, 404, 200, 200]
