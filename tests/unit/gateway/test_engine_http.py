"""The aiohttp transport under the engine pool's httpx clients, against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from gateway.engine import EnginePool
from gateway.engine_http import AiohttpCaller, AiohttpTransport, EngineResponse, HttpxCaller


class Server:
    """An aiohttp server with the routes the tests need, and what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.peers: set[object] = set()
        self.stream_cut = asyncio.Event()
        self.url = ""

    async def echo(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.read()
        self.seen.append({"headers": dict(request.headers), "body": body, "path": request.path_qs})
        return web.json_response({"got": json.loads(body) if body else None}, status=201,
                                 headers={"x-engine": "yes"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(1000):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_cut.set()
            raise
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    app = web.Application()
    app.router.add_post("/echo", state.echo)
    app.router.add_get("/stream", state.stream)
    app.router.add_get("/slow", state.slow)
    app.router.add_post("/stream", state.stream)
    app.router.add_post("/slow", state.slow)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def _read_a_few_events_then_close(response: EngineResponse, server: Server) -> None:
    """The first events arrive while the server still writes; closing the response then drops the connection
    (the server's write fails: what makes an engine stop a request whose client left)."""
    received = b""
    async for chunk in response.aiter_raw():
        received += chunk
        if received.count(b"\n\n") >= 3:
            break
    assert received.startswith(b"data: 0\n\ndata: 1\n\n")
    await response.aclose()
    await asyncio.wait_for(server.stream_cut.wait(), timeout=5)


def _client(url: str, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=AiohttpTransport(), **kwargs)  # type: ignore[arg-type]


async def test_a_json_request_goes_out_as_built_and_its_response_comes_back(server: Server) -> None:
    async with _client(server.url, headers={"Authorization": "Bearer k"}) as client:
        response = await client.post("/echo?x=1", json={"model": "m", "n": 2}, headers={"x-request-id": "r1"})
        assert response.status_code == 201
        assert response.headers["x-engine"] == "yes"
        assert response.json() == {"got": {"model": "m", "n": 2}}
    sent = server.seen[0]
    headers = {k.lower(): v for k, v in sent["headers"].items()}  # type: ignore[attr-defined]
    assert headers["authorization"] == "Bearer k"
    assert headers["x-request-id"] == "r1"
    assert headers["content-type"] == "application/json"
    assert sent["path"] == "/echo?x=1"
    assert json.loads(sent["body"]) == {"model": "m", "n": 2}  # type: ignore[arg-type]


async def test_connections_are_kept_alive_and_reused(server: Server) -> None:
    async with _client(server.url) as client:
        for i in range(5):
            assert (await client.post("/echo", json={"i": i})).status_code == 201
    assert len(server.peers) == 1


async def test_a_stream_arrives_as_it_is_written_and_closing_it_early_drops_the_connection(server: Server) -> None:
    async with _client(server.url) as client:
        request = client.build_request("GET", "/stream")
        await _read_a_few_events_then_close(await client.send(request, stream=True), server)


async def test_an_engine_that_is_not_there_is_a_connect_error() -> None:
    async with _client("http://127.0.0.1:9") as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/echo", json={})


async def test_no_byte_within_the_read_timeout_is_a_read_timeout(server: Server) -> None:
    async with _client(server.url, timeout=httpx.Timeout(0.3, connect=2.0)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow")


async def test_the_pool_uses_aiohttp_unless_told_otherwise(server: Server) -> None:
    pool = EnginePool([server.url], api_key="engine-key")
    other = EnginePool([server.url], api_key="engine-key", http="httpx")
    try:
        assert isinstance(pool.replicas[0].client._transport, AiohttpTransport)
        assert isinstance(pool.replicas[0].caller, AiohttpCaller)
        assert not isinstance(other.replicas[0].client._transport, AiohttpTransport)
        assert isinstance(other.replicas[0].caller, HttpxCaller)
        for engines in (pool, other):
            response = await engines.replicas[0].client.post("/echo", json={"a": 1})
            assert response.json() == {"got": {"a": 1}}
            opened = await engines.replicas[0].caller.open("/echo", {"b": "é"}, headers={"X-Request-Id": "r2"})
            assert opened.status_code == 201
            assert json.loads(await opened.aread()) == {"got": {"b": "é"}}
            await opened.aclose()
        for sent in server.seen[1::2]:  # what the callers sent
            headers = {k.lower(): v for k, v in sent["headers"].items()}  # type: ignore[attr-defined]
            assert headers["authorization"] == "Bearer engine-key"
            assert headers["x-request-id"] == "r2"
            assert headers["content-type"] == "application/json"
    finally:
        await pool.aclose()
        await other.aclose()


def _caller(url: str, read_s: float = 60.0) -> tuple[AiohttpTransport, AiohttpCaller]:
    transport = AiohttpTransport()
    return transport, AiohttpCaller(transport, base_url=url, headers={}, timeout=httpx.Timeout(read_s, connect=2.0))


async def test_the_caller_relays_a_stream_and_closing_it_early_drops_the_connection(server: Server) -> None:
    transport, caller = _caller(server.url)
    try:
        response = await caller.open("/stream", {}, headers={})
        assert response.status_code == 200
        await _read_a_few_events_then_close(response, server)
    finally:
        await transport.aclose()


async def test_the_caller_raises_httpx_errors(server: Server) -> None:
    transport, caller = _caller("http://127.0.0.1:9")
    try:
        with pytest.raises(httpx.ConnectError):
            await caller.open("/echo", {}, headers={})
    finally:
        await transport.aclose()
    transport, caller = _caller(server.url, read_s=0.3)
    try:
        with pytest.raises(httpx.ReadTimeout):
            await caller.open("/slow", {}, headers={})
    finally:
        await transport.aclose()
