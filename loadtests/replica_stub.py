"""A model of one vLLM replica serving LoRA adapters, as a real HTTP server on loopback.

It stands in for a vLLM OpenAI server in routing simulations (``loadtests/routing_sim.py``): what matters
to the router is modelled, nothing is generated.

- ``max_loras`` GPU slots: a running batch holds requests of at most that many distinct adapters; a
  request whose adapter is not in a slot waits for one to free (as vLLM's scheduler does).
- ``max_resident`` adapters held in CPU memory, least recently used first out (vLLM ``max_cpu_loras``).
  A request for an adapter that is not resident pays ``cold_load_s`` (one load per adapter at a time:
  concurrent requests for it wait for the same load) and counts as a cold load; one that is resident but
  not in a slot pays ``swap_s``.
- A running cap (``max_running``); a request's service time is ``base_s + per_batch_s * running``.
- ``time_scale``: real seconds per model second, so a simulation takes minutes. Every duration the
  server reports (``banyan_stub`` in the answer) is in model seconds.

HTTP: ``POST /v1/completions`` (JSON only), ``GET /v1/models`` (the base model and the resident
adapters, as vLLM lists them), ``GET /health``, ``POST /v1/unload_lora_adapter``. Several replicas can
share one process and event loop, each its own server on its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from loadtests.stub_openai import StubRequest, serve_connection

HOST = "127.0.0.1"  # loopback only


@dataclass(frozen=True)
class ReplicaModel:
    """The costs of one replica, in model seconds."""

    max_loras: int = 8
    max_resident: int = 64
    max_running: int = 16
    cold_load_s: float = 0.5
    swap_s: float = 0.02
    base_s: float = 1.0
    per_batch_s: float = 0.05
    time_scale: float = 1.0

    def service_s(self, running: int) -> float:
        return self.base_s + self.per_batch_s * running


@dataclass
class ReplicaCounters:
    requests: int = 0
    cold_loads: int = 0
    swaps: int = 0
    unloads: int = 0
    busy_s: float = 0.0
    """Model seconds of slot occupancy summed over requests (service plus loading)."""


@dataclass
class Replica:
    """One replica's state machine; :meth:`complete` is one request through it."""

    model: ReplicaModel = field(default_factory=ReplicaModel)
    base_model: str = "banyan-demo"
    counters: ReplicaCounters = field(default_factory=ReplicaCounters)

    def __post_init__(self) -> None:
        self.resident: OrderedDict[str, None] = OrderedDict()  # CPU cache, least recently used first
        self.slots: OrderedDict[str, int] = OrderedDict()  # GPU slots: adapter -> running requests
        self.running = 0
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._waiting: deque[tuple[str | None, asyncio.Future[bool]]] = deque()

    def _admissible(self, adapter: str | None) -> bool:
        if self.running >= self.model.max_running:
            return False
        if adapter is None or adapter in self.slots:
            return True
        return len(self.slots) < self.model.max_loras or any(n == 0 for n in self.slots.values())

    async def _sleep(self, model_s: float) -> None:
        await asyncio.sleep(model_s * self.model.time_scale)

    async def complete(self, adapter: str | None) -> dict[str, float]:
        """Serve one request; returns its timings in model seconds (wait, load, service), and ``cold`` 1.0 when
        this request started a cold load of its adapter (0.0 otherwise)."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if self._waiting or not self._admissible(adapter):
            # Wait in line; a leaving request admits waiters one by one (no thundering herd: an overloaded
            # replica must not starve the other replicas that share this event loop).
            admitted: asyncio.Future[bool] = loop.create_future()
            self._waiting.append((adapter, admitted))
            try:
                in_slot = await admitted
            except asyncio.CancelledError:
                if admitted.done() and not admitted.cancelled():
                    self._leave(adapter)
                else:
                    self._waiting = deque(w for w in self._waiting if w[1] is not admitted)
                raise
        else:
            in_slot = self._enter(adapter)
        waited = (loop.time() - arrived) / self.model.time_scale
        self.counters.requests += 1
        load, cold = 0.0, False
        try:
            if adapter is not None:
                load, cold = await self._load(adapter, in_slot=in_slot)
            service = self.model.service_s(self.running)
            await self._sleep(service)
        finally:
            self._leave(adapter)
        self.counters.busy_s += load + service
        return {"wait_s": waited, "load_s": load, "service_s": service, "cold": 1.0 if cold else 0.0}

    def _enter(self, adapter: str | None) -> bool:
        """Take a batch place and the adapter's GPU slot; whether the adapter already had a slot."""
        self.running += 1
        if adapter is None:
            return True
        if adapter in self.slots:
            self.slots[adapter] += 1
            self.slots.move_to_end(adapter)
            return True
        if len(self.slots) >= self.model.max_loras:  # evict the least recently used idle slot
            idle = next(name for name, n in self.slots.items() if n == 0)
            del self.slots[idle]
        self.slots[adapter] = 1  # held from now on, so no other request evicts it while it loads
        return False

    def _leave(self, adapter: str | None) -> None:
        self.running -= 1
        if adapter is not None and adapter in self.slots:
            self.slots[adapter] -= 1
        while self._waiting:  # admit waiters in order while there is room (one may need a slot that is busy)
            for i, (name, admitted) in enumerate(self._waiting):
                if self._admissible(name):
                    del self._waiting[i]
                    admitted.set_result(self._enter(name))
                    break
            else:
                return
            if self.running >= self.model.max_running:
                return

    async def _load(self, adapter: str, *, in_slot: bool) -> tuple[float, bool]:
        """Make the adapter usable in its slot (load it when not resident, swap it in when resident); the cost,
        and whether this request started a cold load."""
        if in_slot:
            pending = self._loading.get(adapter)
            if pending is not None:  # its load is under way for another request: wait for it
                await asyncio.shield(pending)
                return self.model.cold_load_s, False
            if adapter in self.resident:
                self.resident.move_to_end(adapter)
            return 0.0, False
        cost, cold = await self._make_resident(adapter)
        if cost == 0.0:
            self.counters.swaps += 1
            cost = self.model.swap_s
            await self._sleep(cost)
        return cost, cold

    async def _make_resident(self, adapter: str) -> tuple[float, bool]:
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return 0.0, False
        pending = self._loading.get(adapter)
        if pending is not None:  # another request is loading it: wait for the same load
            await asyncio.shield(pending)
            return self.model.cold_load_s, False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[adapter] = future
        self.counters.cold_loads += 1
        try:
            await self._sleep(self.model.cold_load_s)
            self.resident[adapter] = None
            while len(self.resident) > self.model.max_resident:
                self.resident.popitem(last=False)
        finally:
            del self._loading[adapter]
            future.set_result(None)
        return self.model.cold_load_s, True

    def unload(self, adapter: str) -> bool:
        """Drop an adapter from CPU memory (a request running with it keeps its slot); whether it was held."""
        held = self.resident.pop(adapter, "absent") != "absent"
        if held:
            self.counters.unloads += 1
        return held

    def models(self) -> dict[str, Any]:
        ids = [self.base_model, *self.resident]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "stub"} for i in ids]}


def _response(status: str, payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class ReplicaServer:
    """A :class:`Replica` behind a minimal HTTP/1.1 server (keep-alive, JSON bodies with content-length)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(request: StubRequest) -> list[bytes]:
            return [await self.route(request.method, request.path, request.body)]

        await serve_connection(reader, writer, answer)

    async def route(self, method: str, path: str, raw: bytes) -> bytes:
        replica = self.replica
        if method == "GET" and path == "/health":
            return _response("200 OK", {})
        if method == "GET" and path == "/v1/models":
            return _response("200 OK", replica.models())
        body = _json_object(raw)
        if body is None:
            return _response("400 Bad Request", {"error": {"message": "bad json", "type": "BadRequestError"}})
        if method == "POST" and path == "/v1/completions":
            model = str(body.get("model", replica.base_model))
            timings = await replica.complete(None if model == replica.base_model else model)
            return _response("200 OK", {"object": "text_completion", "model": model,
                                        "choices": [{"index": 0, "text": "a", "finish_reason": "length"}],
                                        "banyan_stub": timings})
        if method == "POST" and path == "/v1/unload_lora_adapter":
            name = str(body.get("lora_name", ""))
            if replica.unload(name):
                return _response("200 OK", {"status": "ok"})
            return _response("404 Not Found", {"error": {"message": "not loaded", "type": "NotFoundError"}})
        return _response("404 Not Found", {"error": {"message": "not found", "type": "NotFoundError"}})


def _json_object(raw: bytes) -> dict[str, Any] | None:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
