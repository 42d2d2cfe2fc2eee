"""Per-tenant usage accounting and limits (rpm, max_concurrency), kept in Redis, on the real stack."""

from __future__ import annotations

import threading
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
    for _ in range(2):
        client.completions.create(model=base, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=base, prompt="x", max_tokens=1)
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert "banyan_rate_limited_total{reason=\"rpm\"}" in httpx.get(stack.url + "/metrics").text


def test_concurrency_limit(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "conc")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    base = stack.info["base_model"]
    first: list[int] = []

    def long_request() -> None:
        with tenant.http() as http:
            first.append(http.post("/v1/completions", json={"model": base, "prompt": "long", "max_tokens": 4000,
                                                            "ignore_eos": True}).status_code)

    thread = threading.Thread(target=long_request)
    thread.start()
    slots, redis = f"banyan:rl:{tenant.id}:inflight", stack.redis()
    deadline = time.monotonic() + 30
    while redis.get(slots) != b"1" and time.monotonic() < deadline:
        time.sleep(0.005)  # until the first request holds the tenant's only slot
    assert redis.get(slots) == b"1", f"the first request never held the slot: {first}"
    with tenant.http() as http:
        # Only the first request can hold the slot (no rpm or tpm limit is set): a 429 proves the limit.
        second = http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
        assert second.status_code == 429, (second.text, first, redis.get(slots), thread.is_alive())
        assert second.json()["error"]["type"] == "rate_limit_error"
        thread.join(120)
        assert first == [200]
        # The slot was given back when the first request ended.
        assert http.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_concurrency_slot_is_released_after_errors(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "slots")
    assert admin.patch(f"/admin/tenants/{tenant.id}", json={"max_concurrency": 1}).status_code == 200
    results: list[int] = []

    def run() -> None:
        with tenant.http() as http:
            for model in ("missing-model", stack.info["base_model"]):
                for stream in (False, True):
                    r = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1,
                                                           "stream": stream})
                    results.append(r.status_code)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert results == [404, 404, 200, 200]
