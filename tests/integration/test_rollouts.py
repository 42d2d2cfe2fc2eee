"""Safe rollouts on the real stack: a canary split measured over a few hundred requests and sticky per ``user``,
promotion and rollback, the split ending with its adapter, and the fallback to the base model for an adapter
the engine cannot fetch."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest

from adapters.registry import split_bucket
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant, upload

REQUESTS = 1000
"""Distinct users asked once each: the canary's share of them has a standard deviation of 1.3 points at 20 %, so
a share more than 5 points off is a broken split (about once in 10^4 runs by chance)."""


@pytest.fixture(scope="module")
def ranker(stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path]) -> TenantHandle:
    """A tenant with adapter ``ranker``: version 1 (alpha) active, version 2 (gamma) staged."""
    tenant = make_tenant(stack, admin, "roll")
    assert upload(admin, tenant.id, "ranker", peft_adapters["alpha"]).status_code == 201
    assert upload(admin, tenant.id, "ranker", peft_adapters["gamma"], activate="false").status_code == 201
    return tenant


def _ask(http: httpx.Client, user: str, **extra: object) -> tuple[str, str]:
    """The version that served ``user``, and the text it wrote (greedy)."""
    response = http.post("/v1/completions", json={"model": "ranker", "prompt": "rise", "max_tokens": 6,
                                                   "temperature": 0, "user": user, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "ranker"
    return response.headers["x-banyan-adapter-version"], response.json()["choices"][0]["text"]


def _ask_all(tenant: TenantHandle, users: list[str]) -> dict[str, tuple[str, str]]:
    with tenant.http() as http, ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(users, pool.map(lambda u: _ask(http, u), users), strict=True))


def _activate(admin: httpx.Client, tenant: TenantHandle, body: dict[str, object]) -> dict[str, object]:
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters/ranker/activate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_canary_at_20_percent_gets_20_percent_of_users_each_on_one_version(
        stack: RunningStack, admin: httpx.Client, ranker: TenantHandle) -> None:
    out = _activate(admin, ranker, {"version": 1, "canary": {"version": 2, "percent": 20}})
    assert out["active_version"] == 1 and out["canary"] == {"version": 2, "percent": 20}
    assert admin.get(f"/admin/tenants/{ranker.id}/adapters/ranker").json()["canary"] == {"version": 2, "percent": 20}
    canary_before = stack.gateway_metric("banyan_adapter_split_requests_total", role="canary")
    active_before = stack.gateway_metric("banyan_adapter_split_requests_total", role="active")

    users = [f"user-{i}" for i in range(REQUESTS)]
    served = _ask_all(ranker, users)
    versions = Counter(version for version, _ in served.values())
    assert set(versions) == {"1", "2"}
    share = versions["2"] / REQUESTS
    assert abs(share - 0.20) <= 0.05, versions
    # Each user's version is the one the documented bucket (a hash of tenant, adapter and user) gives.
    assert all((v == "2") == (split_bucket(ranker.id, "ranker", u) < 20) for u, (v, _) in served.items())
    # The header tells the truth: each version wrote its own (greedy) text, every time.
    texts = {version: {text for v, text in served.values() if v == version} for version in versions}
    assert all(len(t) == 1 for t in texts.values()) and texts["1"] != texts["2"], texts
    # Sticky: the same users get the same versions again (a stream too).
    again = _ask_all(ranker, users[:120])
    assert {u: v for u, (v, _) in again.items()} == {u: served[u][0] for u in users[:120]}
    with ranker.http() as http:
        streamed = http.post("/v1/completions", json={"model": "ranker", "prompt": "rise", "max_tokens": 2,
                                                      "stream": True, "user": users[0]})
    assert streamed.status_code == 200 and streamed.headers["x-banyan-adapter-version"] == served[users[0]][0]
    assert "banyan." not in streamed.text

    canary = stack.gateway_metric("banyan_adapter_split_requests_total", role="canary") - canary_before
    active = stack.gateway_metric("banyan_adapter_split_requests_total", role="active") - active_before
    on_canary = versions["2"] + sum(v == "2" for v, _ in again.values()) + (served[users[0]][0] == "2")
    assert (canary, active) == (on_canary, REQUESTS + 120 + 1 - on_canary)


def test_promotion_and_rollback_end_the_split(admin: httpx.Client, ranker: TenantHandle) -> None:
    _activate(admin, ranker, {"version": 1, "canary": {"version": 2, "percent": 50}})
    users = [f"member-{i}" for i in range(40)]
    promoted = _activate(admin, ranker, {"version": 2})
    assert promoted["active_version"] == 2 and promoted["canary"] is None
    assert {v for v, _ in _ask_all(ranker, users).values()} == {"2"}
    rolled_back = _activate(admin, ranker, {"version": 1})
    assert rolled_back["active_version"] == 1 and rolled_back["canary"] is None
    assert {v for v, _ in _ask_all(ranker, users).values()} == {"1"}
    refused = admin.post(f"/admin/tenants/{ranker.id}/adapters/ranker/activate",
                         json={"version": 1, "canary": {"version": 1, "percent": 10}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "canary.version"


def test_deleting_an_adapter_ends_its_split(stack: RunningStack, admin: httpx.Client,
                                            peft_adapters: dict[str, Path]) -> None:
    tenant = make_tenant(stack, admin, "rolldel")
    for folder in ("alpha", "gamma"):
        assert upload(admin, tenant.id, "ranker", peft_adapters[folder]).status_code == 201
    _activate(admin, tenant, {"version": 2, "canary": {"version": 1, "percent": 50}})
    assert admin.delete(f"/admin/tenants/{tenant.id}/adapters/ranker").status_code == 200
    with tenant.http() as http:
        gone = http.post("/v1/completions", json={"model": "ranker", "prompt": "x", "max_tokens": 1, "user": "u"})
        assert gone.status_code == 404
    again = upload(admin, tenant.id, "ranker", peft_adapters["alpha"])
    assert again.status_code == 201 and again.json()["version"] == 3
    detail = admin.get(f"/admin/tenants/{tenant.id}/adapters/ranker").json()
    assert detail["active_version"] == 3 and detail["canary"] is None
    served = _ask_all(tenant, [f"u{i}" for i in range(20)])
    assert {v for v, _ in served.values()} == {"3"}


def _unloadable_adapter(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle, folder: Path) -> None:
    """An active adapter whose files are gone from object storage before its first request: the engine's resolver
    cannot fetch it."""
    staged = upload(admin, tenant.id, "vanishing", folder, activate="false")  # not prefetched
    assert staged.status_code == 201
    s3 = boto3.client("s3", endpoint_url=stack.info["s3_endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="banyan-dev", aws_secret_access_key="banyan-dev-secret")
    keys = stack.s3_keys(f"adapters/{tenant.id}/vanishing/")
    assert keys
    for key in keys:
        s3.delete_object(Bucket=stack.info["s3_bucket"], Key=key)
    assert admin.post(f"/admin/tenants/{tenant.id}/adapters/vanishing/activate",
                      json={"version": 1}).status_code == 200


def test_an_adapter_that_cannot_load_is_served_by_the_base_model_for_tenants_that_chose_it(
        stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path]) -> None:
    base = stack.info["base_model"]
    strict = make_tenant(stack, admin, "strict")
    lenient = make_tenant(stack, admin, "lenient")
    patched = admin.patch(f"/admin/tenants/{lenient.id}", json={"fallback_to_base": True})
    assert patched.status_code == 200 and patched.json()["fallback_to_base"] is True
    for tenant in (strict, lenient):
        _unloadable_adapter(stack, admin, tenant, peft_adapters["gamma"])
    before = stack.gateway_metric("banyan_adapter_fallbacks_total")
    body = {"model": "vanishing", "prompt": "x", "max_tokens": 4, "temperature": 0}

    with strict.http() as http:
        for stream in (False, True):
            refused = http.post("/v1/completions", json={**body, "stream": stream})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "engine_unavailable"
            assert "x-banyan-fallback" not in refused.headers
    assert stack.gateway_metric("banyan_adapter_fallbacks_total") == before

    with lenient.http() as http:
        added = http.post("/v1/documents", json={"text": "The harbour bell rings at noon.", "title": "bell"})
        assert added.status_code == 201, added.text
        served = http.post("/v1/completions", json={**body, "prompt": "When does the harbour bell ring?",
                                                     "rag": {"top_k": 1}})
        assert served.status_code == 200, served.text
        assert served.headers["x-banyan-fallback"] == "base"
        assert "x-banyan-adapter-version" not in served.headers
        assert served.json()["model"] == "vanishing" and served.json()["sources"]
        plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        direct = http.post("/v1/completions", json={**body, "model": base}).json()["choices"][0]["text"]
        assert plain == direct  # the base model wrote it
        streamed = http.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["x-banyan-fallback"] == "base"
        assert '"model":"vanishing"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        assert f'"model":"{base}"' not in streamed.text
    assert stack.gateway_metric("banyan_adapter_fallbacks_total") == before + 3
    # Usage is recorded against what served (a stream's once it has ended, just after its last byte).
    deadline = time.monotonic() + 30
    while (usage := admin.get(f"/admin/tenants/{lenient.id}/usage").json())["total"]["requests"] < 4:
        assert time.monotonic() < deadline, usage
        time.sleep(0.1)
    assert usage["models"][base]["requests"] == 4 and "vanishing" not in usage["models"]
