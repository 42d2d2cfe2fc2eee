"""ASGI middleware: request ids, request metrics and access logs, the request body's size and time limits, and
authentication before any body is read.

Pure ASGI (no ``BaseHTTPMiddleware``) so that streaming responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.deps import ADMIN_SCOPE_KEY, TENANT_SCOPE_KEY, authenticate_tenant, check_admin
from gateway.errors import BanyanError, error_body, status_of, translate
from gateway.health import Drain
from gateway.logs import annotate, start_request_fields
from gateway.metrics import Metrics
from gateway.state import AppState
from gateway.tracing import Tracing

log = logging.getLogger("banyan.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
"""The ``method`` label's values, with ``other`` for the rest (the h11 parser takes any token as a method)."""
_CLOSE = (b"connection", b"close")


class RequestContextMiddleware:
    """Adds ``x-request-id`` to every response (echoing a sane one from the client), enforces the body size limits
    and the body read time (``body_timeout_s`` from the start of the request: a slow-loris body is a 408), counts
    the requests in flight for the shutdown drain, records request metrics and writes one structured access log
    line per request."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, max_upload_bytes: int,
                 max_file_bytes: int | None = None, body_timeout_s: float = 60.0, drain: Drain | None = None,
                 tracing: Tracing | None = None) -> None:
        """``max_upload_bytes``: the body of an adapter upload; ``max_file_bytes``: of a training file upload
        (``POST /v1/files``; default ``max_body_bytes``); ``max_body_bytes``: any other body. ``tracing``: the
        request's server span (:mod:`gateway.tracing`)."""
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.max_upload = max_upload_bytes
        self.max_file = max_file_bytes if max_file_bytes is not None else max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.drain = drain or Drain()
        self.tracing = tracing or Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        sent = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID_RE.match(sent) else "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        fields = start_request_fields(request_id=request_id)
        method = scope["method"] if scope["method"] in METHODS else "other"
        span = self.tracing.begin_request(method=method, path=scope["path"], headers=headers, request_id=request_id)
        if span.span is not None:
            fields["trace_id"] = self.tracing.trace_id(span)
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        limit = self._limit(scope["path"])
        declared = headers.get(b"content-length")
        self.drain.enter()
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                status = 413
                await _reject(send_wrapper, 413, f"The request body is larger than {limit} bytes.", close=True)
                return
            deadline = asyncio.get_running_loop().time() + self.body_timeout_s
            await self.app(scope, _bounded(receive, limit=limit, deadline=deadline, timeout_s=self.body_timeout_s),
                           send_wrapper)
        except (_TooLarge, _BodyTimeout) as e:
            if not response_started:
                await _reject(send_wrapper, e.status_code, str(e.detail), close=True)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if not response_started:
                await _reject(send_wrapper, 500, "The server had an error while processing your request.")
        finally:
            self.drain.leave()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(elapsed)
            self.tracing.end_request(span, route=template, status=status, method=method)
            log.info("request", extra={**fields, "method": method, "route": template, "status": status,
                                       "duration_ms": round(elapsed * 1000, 2)})

    def _limit(self, path: str) -> int:
        if path.endswith("/adapters"):
            return self.max_upload
        return self.max_file if path == "/v1/files" else self.max_body


class AuthMiddleware:
    """Checks the bearer key of ``/v1/*`` (a tenant key) and ``/admin/*`` (the admin key) from the headers alone,
    before the app reads a byte of the body: a refused request is answered at once (401 in the OpenAI shape, or the
    503 of a database that is down) and its connection closed, its body never read. The tenant goes in the scope
    for :func:`gateway.deps.get_tenant_id`, which then does not authenticate again."""

    def __init__(self, app: ASGIApp, *, state: AppState, routes: Sequence[BaseRoute] = ()) -> None:
        """``routes``: the app's, to name the route of a refused request in the metrics and the log."""
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        tenant_route, admin_route = _under(path, "/v1"), _under(path, "/admin")
        if tenant_route or admin_route:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                with self.state.tracing.stage("auth"):
                    if tenant_route:
                        tenant = await authenticate_tenant(self.state, authorization)
                        scope.setdefault("state", {})[TENANT_SCOPE_KEY] = tenant
                        annotate(tenant=tenant)
                    else:
                        check_admin(self.state, authorization)
                        scope.setdefault("state", {})[ADMIN_SCOPE_KEY] = True
            except Exception as e:
                error = e if isinstance(e, BanyanError) else translate(e)
                route = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
                if route is not None:
                    scope["route"] = route
                await _send_json(send, status_of(error), error.body(), close=True)
                return
        await self.app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class _TooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI re-raises HTTP exceptions from body
    parsing, so the app's handler renders it as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.", headers={"connection": "close"})


class _BodyTimeout(StarletteHTTPException):
    """Raised from ``receive`` once the body has not arrived in time; rendered as a 408 like :class:`_TooLarge`."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"The request body did not arrive within {timeout_s:g} seconds.",
                         headers={"connection": "close"})


def _bounded(receive: Receive, *, limit: int, deadline: float, timeout_s: float) -> Receive:
    """``receive`` for the app: the body up to ``limit`` bytes, all of it before ``deadline`` (the loop's clock).
    Once the body is complete, nothing is bounded (a stream waits for the client's disconnect for as long as it
    runs)."""
    seen = 0
    complete = False

    async def wrapped() -> Message:
        nonlocal seen, complete
        if complete:
            return await receive()
        if deadline <= asyncio.get_running_loop().time():
            raise _BodyTimeout(timeout_s)
        try:
            async with asyncio.timeout_at(deadline):  # no task per receive, as wait_for makes on Python 3.11
                message = await receive()
        except TimeoutError:
            raise _BodyTimeout(timeout_s) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
            complete = not message.get("more_body", False)
        else:
            complete = True
        return message

    return wrapped


async def _reject(send: Send, status: int, message: str, *, close: bool = False) -> None:
    code = "payload_too_large" if status == 413 else None
    type_ = "invalid_request_error" if status < 500 else "server_error"
    await _send_json(send, status, error_body(message, type_=type_, code=code), close=close)


async def _send_json(send: Send, status: int, payload: Any, *, close: bool = False) -> None:
    """A whole JSON response; ``close``: the connection closes after it (a body left unread is never read)."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *([_CLOSE] if close else [])]})
    await send({"type": "http.response.body", "body": body})
