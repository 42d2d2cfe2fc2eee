"""Rate-limit headers, the sliding window and token budgets on the real stack, through the stock ``openai`` SDK
(``with_raw_response`` for the headers, ``RateLimitError`` for the 429s)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.integration.conftest import RunningStack, TenantHandle, make_tenant

DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
"""How OpenAI writes a reset: ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""


def _limited(stack: RunningStack, admin: httpx.Client, prefix: str, **limits: int | None) -> TenantHandle:
    tenant = make_tenant(stack, admin, prefix)
    response = admin.patch(f"/admin/tenants/{tenant.id}", json=limits)
    assert response.status_code == 200, response.text
    return tenant


def test_answers_and_429s_carry_the_rate_limit_headers(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = _limited(stack, admin, "hdr", rpm=2, tpm=5000)
    client, base = tenant.client(), stack.info["base_model"]
    raw = client.completions.with_raw_response.create(model=base, prompt="hello", max_tokens=3)
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-limit-tokens"] == "5000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 5000  # the worst case of this request is reserved
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert DURATION.match(headers[name]), headers[name]
    assert raw.parse().usage is not None
    stream = client.chat.completions.with_raw_response.create(
        model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
    assert stream.headers["x-ratelimit-remaining-requests"] == "0"
    assert list(stream.parse())  # the stream itself is served as usual
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=base, prompt="hello", max_tokens=3)
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.response.headers["x-ratelimit-limit-tokens"] == "5000"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 61
    # A tenant without limits is told nothing about them.
    free = make_tenant(stack, admin, "hdr")
    raw = free.client().completions.with_raw_response.create(model=base, prompt="hello", max_tokens=1)
    assert not [h for h in raw.headers if h.startswith("x-ratelimit-")]


def test_a_tpm_set_on_a_tenant_served_uncounted_holds_at_once(stack: RunningStack, admin: httpx.Client) -> None:
    """A tenant without a tpm has its prompts admitted uncounted; once an admin sets one, the very next request is
    counted and reserved against it (asked again by the admission script, not let through on the stale view)."""
    tenant = make_tenant(stack, admin, "tpm-late")
    client, base = tenant.client(), stack.info["base_model"]
    for _ in range(2):  # the first admission finds no tpm: the next request comes uncounted
        raw = client.completions.with_raw_response.create(model=base, prompt="hello", max_tokens=2)
        assert not [h for h in raw.headers if h.startswith("x-ratelimit-")]
    response = admin.patch(f"/admin/tenants/{tenant.id}", json={"tpm": 60})
    assert response.status_code == 200, response.text
    with pytest.raises(openai.RateLimitError) as too_large:  # its worst case alone is over the tpm
        client.completions.create(model=base, prompt="hello", max_tokens=100)
    assert too_large.value.body["param"] == "max_tokens"  # type: ignore[index]
    raw = client.completions.with_raw_response.create(model=base, prompt="hello", max_tokens=2)
    assert raw.headers["x-ratelimit-limit-tokens"] == "60"
    assert 0 < int(raw.headers["x-ratelimit-remaining-tokens"]) <= 60 - 2  # its prompt and 2 tokens reserved


def _second_of_minute() -> float:
    return time.time() % 60


def test_the_window_slides_across_a_minute_boundary(stack: RunningStack, admin: httpx.Client) -> None:
    """A fixed per-minute window admits the limit again as soon as the clock's minute turns; a sliding one
    refuses until the burst is a minute old."""
    tenant = _limited(stack, admin, "slide", rpm=3)
    client, base = tenant.client(), stack.info["base_model"]
    second = _second_of_minute()  # the burst goes out at the end of a clock minute (second 45 to 50)
    time.sleep(45 - second if second < 45 else 0 if second <= 50 else 105 - second)
    first = time.time()
    for _ in range(3):
        client.completions.create(model=base, prompt="x", max_tokens=1)
    turn = (int(time.time() // 60) + 1) * 60  # the next clock minute: a fixed window would start afresh there
    time.sleep(turn - time.time() + 0.5)
    assert time.time() < first + 60, "the burst took most of a minute: nothing left to check"
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=base, prompt="x", max_tokens=1)
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    wait = int(refused.value.response.headers["retry-after"])
    assert 1 <= wait <= 61 - (time.time() - first) + 2  # when the first of the burst leaves the window
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_spent_daily_budget_refuses_until_raised(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "budget")
    response = admin.patch(f"/admin/tenants/{tenant.id}", json={"daily_token_budget": 40})
    assert response.status_code == 200, response.text
    client, base = tenant.client(), stack.info["base_model"]
    refused_before = stack.gateway_metric("banyan_budget_refusals_total", period="daily")
    cancelled_before = stack.gateway_metric("banyan_engine_first_total", outcome="refused")
    spent = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):  # each request spends its prompt and 8 tokens: the budget runs out in a few
            done = client.completions.create(model=base, prompt="count me", max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
            assert done.usage is not None
            spent += done.usage.total_tokens
    assert spent >= 40  # admitted while something was left; the last one may end over
    error = refused.value.body
    assert error["code"] == "quota_exceeded" and "daily token budget" in error["message"]  # type: ignore[index]
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    assert midnight.strftime("%Y-%m-%d 00:00:00 UTC") in error["message"]  # type: ignore[index]
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 86_400
    assert stack.gateway_metric("banyan_budget_refusals_total", period="daily") == refused_before + 1
    # The tenant has no rpm, tpm or concurrency cap: after its first grant each request started on the engine while
    # its admission was decided (engine_first), so the refused one was cancelled on the engine, and charged nothing.
    assert stack.gateway_metric("banyan_engine_first_total", outcome="refused") == cancelled_before + 1
    budget = admin.get(f"/admin/tenants/{tenant.id}").json()["budget"]
    assert budget["daily"] == {"limit": 40, "used": spent, "remaining": 0, "resets_at": int(midnight.timestamp())}
    assert budget["monthly"]["limit"] is None and budget["monthly"]["used"] == spent
    # Documents are not generation: a spent budget does not refuse them.
    with tenant.http() as http:
        assert http.post("/v1/retrieve", json={"query": "anything"}).status_code == 200
    # An admin raises the budget: generation is admitted again at once.
    raised = admin.patch(f"/admin/tenants/{tenant.id}", json={"daily_token_budget": spent + 1000})
    assert raised.json()["budget"]["daily"]["remaining"] == 1000
    assert client.completions.create(model=base, prompt="again", max_tokens=1).usage is not None


def test_budgets_are_taken_on_create(stack: RunningStack, admin: httpx.Client) -> None:
    tenant_id = f"budget-{int(time.time() * 1000) % 10**9}"
    created = admin.post("/admin/tenants", json={"id": tenant_id, "monthly_token_budget": 0})
    assert created.status_code == 201, created.text
    assert created.json()["monthly_token_budget"] == 0
    assert created.json()["budget"]["monthly"]["remaining"] == 0
    key = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "tests"}).json()["key"]
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=120)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=stack.info["base_model"], messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["code"] == "quota_exceeded"  # type: ignore[index]
    assert "monthly token budget" in refused.value.body["message"]  # type: ignore[index]
