"""The engine pool: the vLLM OpenAI servers the gateway routes to, behind a small Protocol.

Routing is adapter-aware: an adapter request goes to a replica that already holds it when one is
healthy and not saturated, else to its rendezvous-hash home, else (home saturated) to the least
loaded replica; base-model requests go to the least loaded replica. Residency is learned from what
the gateway routed. Connections are pooled per replica (one ``httpx.AsyncClient`` each).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from gateway.errors import EngineUnavailable

log = logging.getLogger("banyan.engine")


@dataclass(eq=False)
class Replica:
    url: str
    client: httpx.AsyncClient
    healthy: bool = True
    inflight: int = 0
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)


class EnginePool(Protocol):
    """What the request path needs from the engines."""

    def lease(self, engine_model: str, *, adapter: bool) -> AbstractAsyncContextManager[Replica]: ...
    async def check(self) -> dict[str, bool]: ...
    async def unload(self, engine_model: str) -> None: ...
    async def aclose(self) -> None: ...


def _score(url: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}|{key}".encode(), digest_size=8).digest(), "big")


class HttpEnginePool:
    """An :class:`EnginePool` over the vLLM OpenAI HTTP servers at ``urls``."""

    def __init__(self, urls: list[str], *, api_key: str | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 600.0, max_connections: int = 512, saturation: int = 256,
                 max_resident_per_replica: int = 4096,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.replicas = [
            Replica(url=u.rstrip("/"), client=httpx.AsyncClient(
                base_url=u.rstrip("/"), headers=headers, timeout=timeout, limits=limits, transport=transport))
            for u in urls
        ]
        self._saturation = saturation
        self._max_resident = max_resident_per_replica

    def choose(self, engine_model: str, *, adapter: bool) -> Replica:
        candidates = [r for r in self.replicas if r.healthy] or self.replicas
        if len(candidates) == 1:
            return candidates[0]
        if adapter:
            for replica in candidates:
                if engine_model in replica.resident and replica.inflight < self._saturation:
                    return replica
            home = max(candidates, key=lambda r: _score(r.url, engine_model))
            if home.inflight < self._saturation:
                return home
        return min(candidates, key=lambda r: r.inflight)

    def _note_resident(self, replica: Replica, engine_model: str) -> None:
        replica.resident[engine_model] = None
        replica.resident.move_to_end(engine_model)
        while len(replica.resident) > self._max_resident:
            replica.resident.popitem(last=False)

    @asynccontextmanager
    async def lease(self, engine_model: str, *, adapter: bool) -> AsyncIterator[Replica]:
        replica = self.choose(engine_model, adapter=adapter)
        replica.inflight += 1
        try:
            yield replica
        finally:
            replica.inflight -= 1
            if adapter:
                self._note_resident(replica, engine_model)

    async def check(self) -> dict[str, bool]:
        async def _one(replica: Replica) -> bool:
            try:
                response = await replica.client.get("/health", timeout=3.0)
                replica.healthy = response.status_code == 200
            except httpx.HTTPError:
                replica.healthy = False
            return replica.healthy

        results = await asyncio.gather(*(_one(r) for r in self.replicas))
        return {r.url: ok for r, ok in zip(self.replicas, results, strict=True)}

    async def unload(self, engine_model: str) -> None:
        for replica in self.replicas:
            replica.resident.pop(engine_model, None)
            try:
                await replica.client.post("/v1/unload_lora_adapter", json={"lora_name": engine_model})
            except httpx.HTTPError as e:
                log.warning("unload of an adapter failed on %s: %s", replica.url, type(e).__name__)

    async def aclose(self) -> None:
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))


def translate_transport_error(e: httpx.HTTPError) -> EngineUnavailable:
    kind = "timed out" if isinstance(e, httpx.TimeoutException) else "is unreachable"
    return EngineUnavailable(f"The inference engine {kind}; try again shortly.")


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
