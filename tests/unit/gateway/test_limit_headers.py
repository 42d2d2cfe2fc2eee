"""What the request path and the admin service do with the limits: every admitted response carries the
``x-ratelimit-*`` headers of its admission (JSON, streams, errors after admission, documents), the usage is spent
on the admission, and tenants carry their budgets (the limits themselves: test_quotas.py on a real Valkey)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from gateway.admin import service
from gateway.admin.protocol import TenantCreate, TenantPatch
from gateway.quotas import RateLimitState, Window
from tests.unit.gateway.conftest import ChunkStream, Fakes, Handler, Harness

LIMITS = RateLimitState(requests=Window(limit=60, used=1, reset_ms=60_500),
                        tokens=Window(limit=1000, used=250, reset_ms=20))
HEADERS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
           "x-ratelimit-reset-requests": "1m0.5s", "x-ratelimit-limit-tokens": "1000",
           "x-ratelimit-remaining-tokens": "750", "x-ratelimit-reset-tokens": "20ms"}


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if body.get("stream"):
        chunk = json.dumps({"id": "c", "model": body["model"], "choices": [{"index": 0, "text": "x"}]})
        final = json.dumps({"id": "c", "model": body["model"], "choices": [], "usage": usage}, separators=(",", ":"))
        stream = f"data: {chunk}\n\ndata: {final}\n\ndata: [DONE]\n\n".encode()
        return httpx.Response(200, stream=ChunkStream([stream]), headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                     "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                                     "usage": usage})


def _limited(make_harness: Callable[[Handler], Harness]) -> Harness:
    h = make_harness(_engine)
    h.quotas.limits = LIMITS
    return h


def _rate_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_carries_the_headers_and_spends_its_usage(make_harness: Callable[[Handler], Harness],
                                                            stream: bool) -> None:
    h = _limited(make_harness)
    base = h.state.settings.base_model
    response = h.client.post("/v1/completions", headers=h.tenant_headers(),
                             json={"model": base, "prompt": "x", "max_tokens": 2, "stream": stream})
    assert response.status_code == 200, response.text
    assert _rate_headers(response) == HEADERS
    admission = h.quotas.admissions[0]
    assert admission.released and admission.spent == 5  # prompt + completion, charged on release
    assert h.quotas.budgeted == [True]


def test_an_error_after_admission_carries_the_headers(make_harness: Callable[[Handler], Harness]) -> None:
    h = _limited(make_harness)
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(),
                             json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert _rate_headers(response) == HEADERS
    assert h.quotas.admissions[0].spent == 0


def test_a_tenant_without_limits_gets_no_headers(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    response = h.client.post("/v1/completions", headers=h.tenant_headers(),
                             json={"model": h.state.settings.base_model, "prompt": "x", "max_tokens": 2})
    assert response.status_code == 200 and _rate_headers(response) == {}


def test_documents_calls_carry_the_headers_and_are_not_budgeted(make_harness: Callable[[Handler], Harness]) -> None:
    h = _limited(make_harness)
    response = h.client.post("/v1/retrieve", headers=h.tenant_headers(), json={"query": "parking"})
    assert response.status_code == 200, response.text
    assert _rate_headers(response) == HEADERS
    assert h.quotas.budgeted == [False]


async def test_tenants_take_budgets_on_create_and_patch_and_show_what_is_left(fakes: Fakes) -> None:
    created = await service.create_tenant(fakes.state, TenantCreate(id="globex", daily_token_budget=100))
    assert (created.daily_token_budget, created.monthly_token_budget) == (100, None)
    assert created.budget is not None
    assert (created.budget.daily.limit, created.budget.daily.used, created.budget.daily.remaining) == (100, 0, 100)
    assert created.budget.monthly.remaining is None
    admission = await fakes.quotas.admit("globex")
    admission.spend(130)
    shown = await service.get_tenant(fakes.state, "globex")
    assert shown.budget is not None
    assert (shown.budget.daily.used, shown.budget.daily.remaining) == (130, 0)  # over: a request in flight ended
    assert shown.budget.daily.resets_at == 86_400 and shown.budget.monthly.used == 130
    patched = await service.update_tenant(fakes.state, "globex",
                                          body=TenantPatch(daily_token_budget=None, monthly_token_budget=500))
    assert patched.budget is not None
    assert (patched.daily_token_budget, patched.monthly_token_budget) == (None, 500)
    assert (patched.budget.daily.remaining, patched.budget.monthly.remaining) == (None, 370)
    assert patched.rpm is None  # only what was sent changed
    listed = (await service.list_tenants(fakes.state, limit=10)).data
    assert [(t.id, t.budget.monthly.remaining if t.budget else -1) for t in listed] == [("acme", None),
                                                                                       ("globex", 370)]


async def test_deleting_a_tenant_forgets_its_limits(fakes: Fakes) -> None:
    await service.delete_tenant(fakes.state, "acme")
    assert fakes.quotas.forgotten == ["acme"]


def test_a_budget_is_a_count_of_tokens() -> None:
    with pytest.raises(ValidationError):
        TenantCreate(id="x", monthly_token_budget=-1)
    assert TenantPatch(daily_token_budget=0).daily_token_budget == 0  # nothing may be spent
