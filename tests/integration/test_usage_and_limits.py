"""Per-tenant usage accounting and limits (rpm, tpm, max_concurrency, per-request caps), kept in Redis, on the real
stack."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
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
    # The window slides (test_limits_and_budgets.py): exactly rpm get in, wherever the clock's minute turns.
    admitted = 0
    with pytest.raises(openai.RateLimitError) as info:
        while admitted <= 4:
            client.completions.create(model=base, prompt="x", max_tokens=1)
            admitted += 1
    assert admitted == 2
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert stack.gateway_metric("banyan_rate_limited_total", reason="rpm") == limited_before + 1


def test_concurrency_limit(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "conc")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    base = stack.info["base_model"]
    leases, redis = f"banyan:rl:{tenant.id}:leases", stack.redis()
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
        assert redis.zcard(leases) == 1
        with tenant.http() as http:
            # Only the first request can hold the slot (no rpm or tpm limit is set): a 429 proves the limit.
            second = http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
        assert second.status_code == 429, second.text
        assert second.json()["error"]["type"] == "rate_limit_error"
        assert second.headers["retry-after"] == "1"
        assert redis.zcard(leases) == 1
    # The client went away mid-stream: the gateway notices and gives the slot back.
    deadline = time.monotonic() + 120  # the machine may stall for a whole generation (BENCHMARKS.md)
    while redis.zcard(leases) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis.zcard(leases) == 0, "the slot of a stream whose client went away was never given back"
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


# A stream too large for the buffers of a client that stops reading with a 4 KiB receive buffer: the gateway
# cannot finish relaying it before the client hangs up (see test_concurrency_limit).
_LONG_STREAM = {"prompt": "long", "max_tokens": 4000, "ignore_eos": True, "n": 16, "stream": True}


def _small_window_client(stack: RunningStack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                        transport=httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]))


def _data_events(chunks: Iterator[bytes], count: int) -> list[dict]:
    events: list[dict] = []
    buffer = b""
    while len(events) < count:
        buffer += next(chunks)
        *complete, buffer = buffer.split(b"\n\n")
        events += [json.loads(e[6:]) for e in complete if e.startswith(b"data: {")]
    return events


def _tpm_window(stack: RunningStack, tenant_id: str) -> int:
    """The tokens in the tenant's sliding tpm window (one-second buckets, :mod:`gateway.quotas`)."""
    return sum(int(v) for v in stack.redis().hvals(f"banyan:rl:{tenant_id}:tokens"))


def test_a_stream_read_partly_then_closed_is_still_charged(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "partial")
    # A tpm far above what the streams use: the window then holds what was charged for them.
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"tpm": 10_000_000}).status_code == 200
    base = stack.info["base_model"]
    left_before = stack.gateway_metric("banyan_client_disconnects_total", kind="stream")
    streams = 3
    for _ in range(streams):
        with _small_window_client(stack, tenant.key) as slow, \
                slow.stream("POST", "/v1/completions", json={"model": base, **_LONG_STREAM}) as response:
            assert response.status_code == 200, response.read()
            events = _data_events(response.iter_bytes(), 5)
            assert all("usage" not in e for e in events)  # not asked for: the engine's usage stats stay hidden
        # the client hangs up here, mid-stream
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        total = admin.get(f"/admin/tenants/{tenant.id}/usage").json()["total"]
        if total["requests"] == streams:
            break
        time.sleep(0.1)
    assert total["requests"] == streams, total
    assert total["prompt_tokens"] > 0
    assert streams * 5 <= total["completion_tokens"] < streams * 16 * 4000  # what was sent, not what was asked
    assert _tpm_window(stack, tenant.id) == total["total_tokens"]
    assert stack.gateway_metric("banyan_client_disconnects_total", kind="stream") == left_before + streams


def test_per_request_caps_and_unknown_fields_are_400(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "caps")
    base = stack.info["base_model"]
    cases = [({"prompt": ["x"] * 17}, "prompt"), ({"prompt": "x", "n": 17}, "n"),
             ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"), ({"prompt": "x", "request_id": "mine"},
                                                                       "request_id")]
    with tenant.http() as http:
        for extra, param in cases:
            response = http.post("/v1/completions", json={"model": base, **extra})
            assert response.status_code == 400, (extra, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param
    assert admin.get(f"/admin/tenants/{tenant.id}/usage").json()["total"]["requests"] == 0


def test_tpm_reserves_the_worst_case_and_refunds_the_rest(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "tpm")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"tpm": 200}).status_code == 200
    base = stack.info["base_model"]
    client = tenant.client()
    with pytest.raises(openai.RateLimitError) as too_large:  # 16 choices of 20 tokens could never fit in 200
        client.completions.create(model=base, prompt="hi", max_tokens=20, n=16)
    assert too_large.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert too_large.value.body["param"] == "max_tokens"  # type: ignore[index]
    done = client.completions.create(model=base, prompt="hi", max_tokens=5)
    assert done.usage is not None
    # The window holds what was used, not the reservation (prompt + 5): it was refunded.
    assert _tpm_window(stack, tenant.id) == done.usage.total_tokens
    # the tiny model: one token a byte; the gateway counts 8 more around a prompt (what a template may add)
    nearly_all = 200 - done.usage.total_tokens - (len("hi") + 8)
    client.completions.create(model=base, prompt="hi", max_tokens=nearly_all, temperature=0)


def test_a_leaked_concurrency_lease_expires(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "leak")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    base = stack.info["base_model"]
    # The lease of a request on a gateway replica that was killed: nobody renews or releases it.
    stack.redis().zadd(f"banyan:rl:{tenant.id}:leases", {"dead-replica-request": time.time() + 3})
    with tenant.http() as http:
        refused = http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429, refused.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # retrying does not keep the dead lease alive
            response = http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
            if response.status_code != 429:
                break
            time.sleep(0.2)
    assert response.status_code == 200, response.text
