"""The floor of a relay at the protocol level: what a Python proxy costs when no task, future or ASGI layer stands
between the engine's socket and the client's.

    python -m loadtests.proto_proxy --port 8302 --upstream http://127.0.0.1:8300

``loadtests.minimal_proxy`` is the floor of the gateway's own stack (uvicorn with httptools, an ASGI app, aiohttp
to the upstream): each event of a stream wakes a task (aiohttp's stream reader resolves a future), goes through
the ASGI ``send`` coroutine, and uvicorn frames and writes it. Here both sides are ``asyncio.Protocol``s on uvloop
parsed by httptools (the parser uvicorn uses): the upstream connection's ``data_received`` parses the response
(chunked or not) and writes each piece of body, framed as a chunk, straight onto the client's transport from the
callback. ``loadtests.bench --proto-floor`` measures it beside the bare proxy, so the CPU a protocol-level relay
would save per event is a measured figure, not a guess. A measuring tool, not a proxy to deploy: no flow control
(the stub and the bench client read as fast as it writes), no timeouts, one upstream, nothing but the path, the
body and the content type passed on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

import httptools

HOST = "127.0.0.1"  # loopback only
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, serving one client request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: _Client | None = None
        self._content_type = b"application/json"
        self._header = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's

    def send(self, client: _Client, path: bytes, body: bytes) -> None:
        assert self._transport is not None
        self._client = client
        self._content_type = b"application/json"
        self._transport.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                              b"content-length: %d\r\n\r\n%s" % (path, self._pool.host, len(body), body))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._abort()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._content_type = value

    def on_headers_complete(self) -> None:
        if self._client is not None:
            self._client.start(self._parser.get_status_code(), self._content_type)

    def on_body(self, body: bytes) -> None:
        if self._client is not None:
            self._client.piece(body)

    def on_message_complete(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.end()
        if self._parser.should_keep_alive():
            self._pool.put(self)
        elif self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.drop(self)
        self._abort()

    def _abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.abort()
        if self._transport is not None:
            self._transport.close()


class _Pool:
    """The idle upstream connections (a new one opened when none is idle)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.address = (parts.hostname or HOST, parts.port or 80)
        self.host = f"{self.address[0]}:{self.address[1]}".encode()
        self._idle: list[_Upstream] = []
        self._opening: set[asyncio.Task[None]] = set()

    def put(self, connection: _Upstream) -> None:
        self._idle.append(connection)

    def drop(self, connection: _Upstream) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    def send(self, client: _Client, path: bytes, body: bytes) -> None:
        if self._idle:
            self._idle.pop().send(client, path, body)
            return
        task = asyncio.ensure_future(self._open_and_send(client, path, body))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open_and_send(self, client: _Client, path: bytes, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(lambda: _Upstream(self), *self.address)
        except OSError:
            client.abort()
            return
        connection.send(client, path, body)


class _Client(asyncio.Protocol):
    """One client connection: each request's path and body to the upstream, its answer relayed as it comes."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._path = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._path += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path, body = self._path.split(b"?", 1)[0], b"".join(self._body)
        self._path, self._body = b"", []
        if path == b"/health":  # its own readiness, not the upstream's
            self._write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            return
        self._pool.send(self, path, body)

    # the upstream's answer
    def start(self, status: int, content_type: bytes) -> None:
        reason = _REASONS.get(status, b"-")
        self._write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % (
            status, reason, content_type))

    def piece(self, body: bytes) -> None:
        self._write(b"%x\r\n%s\r\n" % (len(body), body))

    def end(self) -> None:
        self._write(b"0\r\n\r\n")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


async def serve(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool = _Pool(upstream)
    server = await loop.create_server(lambda: _Client(pool), HOST, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.upstream))
        return
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
