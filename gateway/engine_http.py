"""How the gateway speaks HTTP to its replicas: completions through :class:`EngineCaller`, everything else
through an httpx client, both on one aiohttp connection pool per replica.

The gateway speaks to its replicas through ``httpx.AsyncClient`` (its request and response types are the seam the
unit tests fake with ``httpx.MockTransport``), but httpx's own pool (httpcore) is slow in front of a busy engine:
to place each request it walks every pooled connection and asks the socket whether it is readable (a ``select``
per idle connection), which took about a fifth of the gateway's event-loop time at 64 requests in flight
(``BENCHMARKS.md``, "The gateway's own cost"). aiohttp's pool hands out an idle connection in constant time and
parses responses in C. :class:`AiohttpTransport` carries each httpx request over it: the request's headers and
body as they are, its timeouts (connect, and read between chunks), the response streamed back unread (a stream
relays as before; closing an unfinished response closes its connection, so the engine drops the request), and
aiohttp's errors raised as the httpx errors the gateway already handles.

The completion path skips httpx's client layer too: building an ``httpx.Request`` and ``Response``, merging URLs,
headers and cookies cost about 250 us of CPU a request at 64 in flight, against about 110 us for aiohttp alone
(``BENCHMARKS.md``). :class:`EngineCaller` is that path's seam: it opens a completion (a JSON POST) and returns
an :class:`EngineResponse` (status, body read whole or relayed raw, close). :class:`AiohttpCaller` is the
production one; :class:`HttpxCaller` runs the same calls through an httpx client (``BANYAN_ENGINE_HTTP=httpx``,
and the unit tests' fake engine, an ``httpx.MockTransport``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import httpx
from yarl import URL


def _timeout(request: httpx.Request) -> aiohttp.ClientTimeout:
    timeout: dict[str, Any] = request.extensions.get("timeout") or {}
    connect, read = timeout.get("connect"), timeout.get("read")
    pool = timeout.get("pool")
    return aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)


def _translate(e: BaseException, request: httpx.Request, *, connected: bool) -> httpx.TransportError:
    """aiohttp's error as the httpx error of the same meaning (what :mod:`gateway.engine` turns into a 503)."""
    message = f"{type(e).__name__}: {e}"
    error: httpx.TransportError
    if isinstance(e, aiohttp.SocketTimeoutError):  # no byte within the read timeout (headers or body)
        error = httpx.ReadTimeout(message, request=request)
    elif isinstance(e, TimeoutError):
        error = httpx.ReadTimeout(message, request=request) if connected else httpx.ConnectTimeout(message,
                                                                                                  request=request)
    elif isinstance(e, aiohttp.ClientConnectorError):
        error = httpx.ConnectError(message, request=request)
    elif isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        error = httpx.RemoteProtocolError(message, request=request)
    elif not connected:
        error = httpx.ConnectError(message, request=request)
    else:
        error = httpx.ReadError(message, request=request)
    return error


class _ResponseStream(httpx.AsyncByteStream):
    """An aiohttp response's body, chunk by chunk as it arrives; closed early, its connection is closed too."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _translate(e, self._request, connected=True) from e

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection goes back to the pool
        else:
            self._response.close()  # cut short: drop the connection, which ends the engine's work on it


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport on one aiohttp session: at most ``max_connections`` connections, idle ones dropped after
    ``keepalive_expiry`` seconds (before the engine's own keep-alive ends)."""

    def __init__(self, *, max_connections: int = 512, keepalive_expiry: float = 3.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                             keepalive_timeout=self._keepalive_expiry)
            # httpx decodes a compressed body itself (from the headers), as it does over its own pool.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self.session()
        body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.lower() != b"host"]
        try:
            response = await session.request(request.method, URL(str(request.url), encoded=True), data=body or None,
                                             headers=headers, timeout=_timeout(request), allow_redirects=False,
                                             compress=None, auto_decompress=False)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _translate(e, request, connected=False) from e
        return httpx.Response(status_code=response.status, headers=list(response.raw_headers),
                              stream=_ResponseStream(response, request), extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class EngineResponse(Protocol):
    """An engine's response whose body is not read yet (``httpx.Response`` is one)."""

    @property
    def status_code(self) -> int: ...

    async def aread(self) -> bytes: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class EngineCaller(Protocol):
    """Opens completions on one replica: raises ``httpx.TransportError`` subclasses when it cannot be reached."""

    async def open(self, path: str, body: dict[str, Any], *, headers: dict[str, str]) -> EngineResponse: ...


class HttpxCaller:
    """Completions through an httpx client (its transport: httpx's pool, or a test's fake)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def open(self, path: str, body: dict[str, Any], *, headers: dict[str, str]) -> EngineResponse:
        request = self._client.build_request("POST", path, json=body, headers=headers)
        return await self._client.send(request, stream=True)


class _AiohttpResponse:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _translate(e, _request_for(self._response), connected=True) from e

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return _Chunks(self._response)

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()  # cut short: drop the connection, which ends the engine's work on it


class _Chunks:
    """The body's bytes as they arrive: each step one ``readany`` of aiohttp's stream (no generator in between: a
    stream's relay takes a step per event)."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _translate(e, _request_for(self._response), connected=True) from e
        if not chunk:
            raise StopAsyncIteration
        return chunk


def _request_for(response: aiohttp.ClientResponse) -> httpx.Request:
    return httpx.Request(response.method, str(response.url))


class AiohttpCaller:
    """Completions straight on ``transport``'s aiohttp session (the pool the replica's httpx client uses too):
    the body encoded once, the client's headers (the engine's key) with the call's, the same timeouts."""

    def __init__(self, transport: AiohttpTransport, *, base_url: str, headers: dict[str, str],
                 timeout: httpx.Timeout) -> None:
        self._transport = transport
        self._base_url = base_url.rstrip("/")
        self._headers = {**headers, "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout.pool, sock_connect=timeout.connect,
                                              sock_read=timeout.read)

    async def open(self, path: str, body: dict[str, Any], *, headers: dict[str, str]) -> EngineResponse:
        url = self._base_url + path
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        try:
            response = await self._transport.session().post(
                url, data=data, headers={**self._headers, **headers} if headers else self._headers,
                timeout=self._timeout, allow_redirects=False, auto_decompress=False)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _translate(e, httpx.Request("POST", url), connected=False) from e
        return _AiohttpResponse(response)
