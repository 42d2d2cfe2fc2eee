"""The engine pool: the vLLM OpenAI servers the gateway routes to, behind a small Protocol.

Routing is adapter-aware with bounded loads (consistent hashing with bounded loads). A replica is
*open* when its requests in flight are below both the absolute ``saturation`` and a bound relative to
the fleet, ``mean * spill_ratio + spill_margin`` over the healthy replicas. An adapter request goes to
the least loaded replica that already holds the adapter, if one is below a looser bound for holders
(``mean * holder_ratio + spill_margin``: a copy elsewhere would cost a cold load and a cache slot), else
to the first open replica in the adapter's rendezvous-hash order (its ``home`` when that one is open,
else a ``spill`` down the same order, so a hot adapter spreads over the few replicas that follow its
home, not over the fleet), else (none open) to the least loaded replica. Base-model requests go to the
least loaded replica. Residency is learned from the replicas (``GET /v1/models`` on each health check)
and from what the gateway routed.

Residency is bounded per replica: when a replica holds more adapters than ``max_resident``, the
gateway unloads the least recently used ones that have no request in flight through it
(``/v1/unload_lora_adapter``), which also lets the replica's resolver free their disk space.
Connections are pooled per replica (one ``httpx.AsyncClient`` each, on aiohttp's pool: :mod:`gateway.engine_http`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters.naming import ENGINE_NAME_PREFIX
from gateway.engine_http import AiohttpCaller, AiohttpTransport, EngineCaller, HttpxCaller
from gateway.errors import EngineUnavailable
from gateway.metrics import Metrics

log = logging.getLogger("banyan.engine")


@dataclass(eq=False)
class Replica:
    url: str
    client: httpx.AsyncClient
    """Health checks, residency and unloads."""
    caller: EngineCaller
    """Completions: the hot path (:mod:`gateway.engine_http`)."""
    healthy: bool = True
    inflight: int = 0
    resident: OrderedDict[str, int] = field(default_factory=OrderedDict)
    """Adapters this replica holds, least recently used first, with requests in flight through us."""
    unloading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Unloads under way: a new request for one of these names waits for it to finish (else vLLM could
    drop the name after accepting the request)."""


def _forget_unload(replica: Replica, name: str, _: asyncio.Task[None]) -> None:
    replica.unloading.pop(name, None)


def _score(url: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}|{key}".encode(), digest_size=8).digest(), "big")


class EnginePool:
    """The vLLM OpenAI HTTP servers at ``urls``. Its seam for tests is the httpx transport (``transport``)."""

    def __init__(self, urls: list[str], *, api_key: str | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 600.0, max_connections: int = 512, saturation: int = 256,
                 max_resident: int = 64, spill_ratio: float = 1.1, spill_margin: float = 1.0,
                 holder_ratio: float = 1.2, metrics: Metrics | None = None, http: str = "aiohttp",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``http``: the connection pool under each replica's client, ``aiohttp`` (:mod:`gateway.engine_http`) or
        ``httpx`` (its own); ``transport``, when given, replaces both (the unit tests' fake engine)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        # Idle connections are dropped before the engine's own 5 s keep-alive ends, so a request never
        # goes out on a connection the engine is closing.
        keepalive_s = 3.0
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              keepalive_expiry=keepalive_s)

        def replica(url: str) -> Replica:
            if transport is not None or http == "httpx":
                client = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits,
                                           transport=transport)
                return Replica(url=url, client=client, caller=HttpxCaller(client))
            pool = AiohttpTransport(max_connections=max_connections, keepalive_expiry=keepalive_s)
            client = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=pool)
            return Replica(url=url, client=client,
                           caller=AiohttpCaller(pool, base_url=url, headers=headers, timeout=timeout))

        self.replicas = [replica(u.rstrip("/")) for u in urls]
        self._saturation = saturation
        self._spill_ratio = spill_ratio
        self._spill_margin = spill_margin
        self._holder_ratio = holder_ratio
        self._max_resident = max_resident
        self._metrics = metrics
        self._background: set[asyncio.Task[None]] = set()
        self._reported_resident = 0

    def choose(self, engine_model: str, *, is_adapter: bool) -> tuple[Replica, str]:
        """The replica for a request, and why (``resident``, ``home``, ``spill`` or ``base``)."""
        candidates = [r for r in self.replicas if r.healthy] or self.replicas
        if not is_adapter:
            return min(candidates, key=lambda r: r.inflight), "base"
        if len(candidates) == 1:
            return candidates[0], "resident" if engine_model in candidates[0].resident else "home"
        mean = sum(r.inflight for r in candidates) / len(candidates)
        bound = min(float(self._saturation), self._spill_ratio * mean + self._spill_margin)
        # A replica holding the adapter may run hotter (``holder_ratio``) before the adapter is copied elsewhere:
        # a copy costs a cold load now and a cache slot for as long as it stays.
        held = min(float(self._saturation), max(bound, self._holder_ratio * mean + self._spill_margin))
        holders = [r for r in candidates if engine_model in r.resident and r.inflight < held]
        if holders:
            return min(holders, key=lambda r: r.inflight), "resident"
        order = sorted(candidates, key=lambda r: _score(r.url, engine_model), reverse=True)
        for rank, replica in enumerate(order):
            if replica.inflight < bound:
                return replica, "home" if rank == 0 else "spill"
        return min(candidates, key=lambda r: r.inflight), "spill"

    @asynccontextmanager
    async def lease(self, engine_model: str, *, is_adapter: bool) -> AsyncIterator[Replica]:
        replica, placement = self.choose(engine_model, is_adapter=is_adapter)
        if self._metrics is not None:
            self._metrics.adapter_placements.labels(placement).inc()
        if is_adapter and engine_model in replica.unloading:
            await asyncio.shield(replica.unloading[engine_model])
        replica.inflight += 1
        if is_adapter:
            replica.resident[engine_model] = replica.resident.get(engine_model, 0) + 1
            replica.resident.move_to_end(engine_model)
        try:
            yield replica
        finally:
            replica.inflight -= 1
            if is_adapter:
                replica.resident[engine_model] = max(0, replica.resident.get(engine_model, 1) - 1)
                self._trim(replica)

    def _trim(self, replica: Replica) -> None:
        excess = len(replica.resident) - self._max_resident
        if excess <= 0:
            return
        victims = [name for name, inflight in replica.resident.items() if inflight == 0][:excess]
        for name in victims:
            del replica.resident[name]
            task = self._spawn(self._unload_one(replica, name))
            replica.unloading[name] = task
            task.add_done_callback(functools.partial(_forget_unload, replica, name))
        self._report_resident()

    def _report_resident(self) -> None:
        """Move the gauge by this pool's change, so that the pools of several base models add up."""
        if self._metrics is not None:
            now = sum(len(r.resident) for r in self.replicas)
            self._metrics.resident_adapters.inc(now - self._reported_resident)
            self._reported_resident = now

    async def _unload_one(self, replica: Replica, engine_model: str) -> None:
        try:
            response = await replica.client.post("/v1/unload_lora_adapter", json={"lora_name": engine_model})
            result = "ok" if response.status_code in (200, 404) else f"status_{response.status_code // 100}xx"
        except httpx.HTTPError as e:
            log.warning("unload of an adapter failed on %s: %s", replica.url, type(e).__name__)
            result = "unreachable"
        if self._metrics is not None:
            self._metrics.adapter_unloads.labels(result).inc()

    async def check(self) -> dict[str, bool]:
        """Probe every replica's health and learn which adapters it holds."""
        async def _one(replica: Replica) -> bool:
            try:
                response = await replica.client.get("/health", timeout=3.0)
                replica.healthy = response.status_code == 200
                if replica.healthy:
                    await self._learn_residency(replica)
            except httpx.HTTPError:
                replica.healthy = False
            return replica.healthy

        results = await asyncio.gather(*(_one(r) for r in self.replicas))
        return {r.url: ok for r, ok in zip(self.replicas, results, strict=True)}

    def warm(self, engine_model: str) -> None:
        """Have the adapter's home replica load it now (in the background), so the first request is hot."""
        self._spawn(self._warm_one(engine_model))

    async def _warm_one(self, engine_model: str) -> None:
        try:
            async with self.lease(engine_model, is_adapter=True) as replica:
                await replica.client.post("/v1/completions", json={
                    "model": engine_model, "prompt": "\n", "max_tokens": 1, "cache_salt": "banyan-warmup"})
        except httpx.HTTPError as e:
            log.warning("warming an adapter failed: %s", type(e).__name__)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _learn_residency(self, replica: Replica) -> None:
        response = await replica.client.get("/v1/models", timeout=5.0)
        if response.status_code != 200:
            return
        names = {m.get("id") for m in (json_or_none(response.content) or {}).get("data", [])}
        held = {n for n in names if isinstance(n, str) and n.startswith(ENGINE_NAME_PREFIX)}
        for name in held - replica.resident.keys():
            replica.resident[name] = 0
            replica.resident.move_to_end(name, last=False)  # unknown use: first to go
        for name in [n for n, inflight in replica.resident.items() if n not in held and inflight == 0]:
            del replica.resident[name]
        self._trim(replica)

    async def unload(self, engine_model: str) -> None:
        """Unload a name from every replica (an adapter version was deleted)."""
        for replica in self.replicas:
            replica.resident.pop(engine_model, None)
        await asyncio.gather(*(self._unload_one(r, engine_model) for r in self.replicas))
        self._report_resident()

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))


def translate_transport_error(e: httpx.HTTPError) -> EngineUnavailable:
    kind = "timed out" if isinstance(e, httpx.TimeoutException) else "is unreachable"
    return EngineUnavailable(f"The inference engine {kind}; try again shortly.")


def json_or_none(content: bytes) -> Any:
    """Parsed JSON, or None for anything that is not JSON."""
    try:
        return json.loads(content)
    except ValueError:
        return None
