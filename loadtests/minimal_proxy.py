"""The floor of a Python proxy on this stack: a bare ASGI app that relays each request to one upstream.

    python -m loadtests.minimal_proxy --port 8301 --upstream http://127.0.0.1:8300

The same server as the gateway (uvicorn with uvloop and httptools) and the same engine client (aiohttp), and
nothing else: no framework, no authentication, no Redis, no accounting, no logs. ``loadtests.bench`` measures it
beside the gateway in front of the same stub: what it cannot do, the gateway cannot either on that machine and
with that client, so the gateway's ratio to it is what the gateway itself costs.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn


class MinimalProxy:
    """An ASGI app: the request's path and body to ``upstream``, its status, content type and body back, streamed
    as they arrive."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self._session is not None
        if scope["path"] == "/health":  # its own readiness, not the upstream's
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        async with self._session.post(self.upstream + scope["path"], data=body,
                                      headers={"content-type": "application/json"}) as response:
            content_type = response.headers.get("content-type", "application/json").encode()
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", content_type)]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=3))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(MinimalProxy(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
