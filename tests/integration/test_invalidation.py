"""Caches across gateways on the real stack: two more gateways built in-process with ``create_app`` on the session
stack's Redis, S3 and engine, each with its invalidation subscriber and 30 s caches (the fallback TTL 30 s too, so
that only a pub/sub message can make a change reach the other gateway quickly). A version activated (and rolled
back) through gateway A is served by gateway B well under the TTL; a key revoked through A is refused by B as
quickly; B's metrics count the messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import build_state, create_app
from gateway.model_cache import CachedRegistry
from gateway.settings import Settings
from gateway.state import AppState
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant, upload

TTL_S = 30.0
PROMPT_S = 2.0
"""A change must reach the other gateway within this long (the TTLs are 30 s; the probe measures milliseconds)."""


@dataclass
class Gateway:
    http: httpx.AsyncClient
    state: AppState

    def admin_headers(self, admin_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {admin_key}"}


@pytest.fixture
async def gateways(stack: RunningStack, tmp_path: Path) -> AsyncIterator[list[Gateway]]:
    info = stack.info
    settings = Settings(mode="dev", admin_key=SecretStr(stack.admin_key), redis_url=info["redis_url"],
                        s3_endpoint_url=info["s3_endpoint_url"], s3_bucket=info["s3_bucket"],
                        s3_access_key_id=SecretStr("banyan-dev"), s3_secret_access_key=SecretStr("banyan-dev-secret"),
                        engine_urls=[info["engine_url"]], engine_api_key=SecretStr(info["engine_api_key"]),
                        base_model=info["base_model"], base_model_config=stack.model_path / "config.json",
                        data_dir=tmp_path, embedder_cache_dir=tmp_path / "embedder", key_cache_ttl_s=TTL_S,
                        adapter_cache_ttl_s=TTL_S, cache_fallback_ttl_s=TTL_S, prefetch_on_activate=False)
    made: list[Gateway] = []
    async with AsyncExitStack() as stack_:
        for name in ("a", "b"):  # one after the other: the second reuses the first's exported embedder
            state = build_state(settings)
            app = create_app(settings, state=state)
            await stack_.enter_async_context(app.router.lifespan_context(app))
            http = await stack_.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=f"http://gateway-{name}", timeout=120))
            assert state.invalidation is not None
            await asyncio.wait_for(state.invalidation.subscribed.wait(), 30)
            made.append(Gateway(http=http, state=state))
        yield made


def _metric(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def _within(deadline_s: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check()`` holds, failing after ``deadline_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < deadline_s, f"not within {deadline_s} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def _served_version(gateway: Gateway, key: str) -> str:
    response = await gateway.http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": "flip", "prompt": "hi", "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.headers["x-banyan-adapter-version"]


@pytest.fixture
def flipper(stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path]) -> TenantHandle:
    """A tenant with adapter ``flip``: version 1 (alpha) active, version 2 (gamma) staged."""
    tenant = make_tenant(stack, admin, "inval")
    assert upload(admin, tenant.id, "flip", peft_adapters["alpha"]).status_code == 201
    assert upload(admin, tenant.id, "flip", peft_adapters["gamma"], activate="false").status_code == 201
    return tenant


async def test_an_activation_through_one_gateway_is_served_by_the_other_at_once(
        stack: RunningStack, gateways: list[Gateway], flipper: TenantHandle) -> None:
    a, b = gateways
    assert await _served_version(b, flipper.key) == "1"  # B has version 1 in its cache now (for 30 s)
    assert isinstance(b.state.adapters, CachedRegistry) and len(b.state.adapters.cache) == 1
    hits_before = _metric(b, "banyan_adapter_cache_total", result="hit")
    assert await _served_version(b, flipper.key) == "1"
    assert _metric(b, "banyan_adapter_cache_total", result="hit") == hits_before + 1  # no Redis read
    for version in ("2", "1"):  # a roll forward through A, then a rollback through A
        response = await a.http.post(f"/admin/tenants/{flipper.id}/adapters/flip/activate",
                                     headers=a.admin_headers(stack.admin_key), json={"version": int(version)})
        assert response.status_code == 200, response.text

        async def b_serves(expected: str = version) -> bool:
            return await _served_version(b, flipper.key) == expected

        took = await _within(PROMPT_S, b_serves)
        assert took < PROMPT_S < TTL_S
    assert _metric(b, "banyan_invalidation_events_total", event="adapter") >= 2


async def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_at_once(
        stack: RunningStack, admin: httpx.Client, gateways: list[Gateway]) -> None:
    a, b = gateways
    tenant = make_tenant(stack, admin, "inval")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    assert (await b.http.get("/v1/models", headers=headers)).status_code == 200  # cached by B for 30 s
    assert (await b.http.get("/v1/models", headers=headers)).status_code == 200
    assert (await a.http.get("/v1/models", headers=headers)).status_code == 200  # and by A
    response = await a.http.delete(f"/admin/tenants/{tenant.id}/keys/{tenant.key_id}",
                                   headers=a.admin_headers(stack.admin_key))
    assert response.status_code == 200, response.text

    async def b_refuses() -> bool:
        return (await b.http.get("/v1/models", headers=headers)).status_code == 401

    assert await _within(PROMPT_S, b_refuses) < PROMPT_S
    assert (await a.http.get("/v1/models", headers=headers)).status_code == 401  # A dropped it when it revoked
    assert _metric(b, "banyan_invalidation_events_total", event="key") >= 1
