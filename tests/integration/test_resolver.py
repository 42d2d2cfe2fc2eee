"""The engine-side resolver on the real stack: a client that leaves during a cold load does not poison the
adapter (#10 item 10)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio

from adapters.naming import AdapterRef
from adapters.registry import AdapterRegistry
from tests.integration.conftest import RunningStack, TenantHandle, upload


@contextmanager
def _object_storage_stalled(stack: RunningStack) -> Iterator[None]:
    """The stack's S3 server stopped (SIGSTOP): connections are accepted, nothing is answered."""
    children = psutil.Process(stack.process.pid).children(recursive=True)
    (moto,) = [p for p in children if "moto.server" in " ".join(p.cmdline())]
    moto.suspend()
    try:
        yield
    finally:
        moto.resume()


async def _engine_name(stack: RunningStack, tenant: str, name: str, version: int) -> str:
    client = redis.asyncio.Redis.from_url(stack.info["redis_url"])
    try:
        record = await AdapterRegistry(client).get(tenant, name)
    finally:
        await client.aclose()
    assert record is not None
    return AdapterRef(tenant, name, version, record.versions[version].uid).engine_name


def test_a_client_leaving_during_a_cold_load_does_not_poison_the_adapter(
        stack: RunningStack, admin: httpx.Client, tenant: TenantHandle, peft_adapters: dict[str, Path]) -> None:
    # Stored but not active: nothing warms it, so the engine has never fetched it.
    assert upload(admin, tenant.id, "cold", peft_adapters["gamma"], activate="false").status_code == 201
    engine_name = asyncio.run(_engine_name(stack, tenant.id, "cold", 1))
    with _object_storage_stalled(stack), pytest.raises(httpx.TimeoutException):
        # The fetch hangs on S3; the client gives up, and vLLM cancels the request's adapter resolution.
        httpx.post(stack.engine_url + "/v1/completions", timeout=3, headers=stack.engine_headers,
                   json={"model": engine_name, "prompt": "hi", "max_tokens": 1})
    activated = admin.post(f"/admin/tenants/{tenant.id}/adapters/cold/activate", json={"version": 1})
    assert activated.status_code == 200, activated.text
    started = time.monotonic()
    with tenant.http() as http:
        response = http.post("/v1/completions", json={"model": "cold", "prompt": "hi", "max_tokens": 4})
    assert response.status_code == 200, response.text  # the cancelled load was not remembered as a failure
    assert response.headers["x-banyan-adapter-version"] == "1"
    assert time.monotonic() - started < 25  # served at once, not after the 30 s failure TTL
