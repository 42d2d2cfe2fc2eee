"""ASGI middleware: request ids, request metrics and access logs, and the request size limit.

Pure ASGI (no ``BaseHTTPMiddleware``) so that streaming responses pass through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_body
from gateway.logs import start_request_fields
from gateway.metrics import Metrics

log = logging.getLogger("banyan.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Adds ``x-request-id`` to every response (echoing a sane one from the client), enforces the body
    size limits, records request metrics and writes one structured access log line per request."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.max_upload = max_upload_bytes

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
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        limit = self.max_upload if scope["path"].endswith("/adapters") else self.max_body
        declared = headers.get(b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                status = 413
                await _reject(send_wrapper, 413, f"The request body is larger than {limit} bytes.")
                return
            await self.app(scope, _limited(receive, limit), send_wrapper)
        except _TooLarge:
            if not response_started:
                await _reject(send_wrapper, 413, f"The request body is larger than {limit} bytes.")
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if not response_started:
                await _reject(send_wrapper, 500, "The server had an error while processing your request.")
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(elapsed)
            log.info("request", extra={**fields, "method": scope["method"], "route": template, "status": status,
                                       "duration_ms": round(elapsed * 1000, 2)})


class _TooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI re-raises HTTP exceptions from body
    parsing, so the app's handler renders it as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
        return message

    return wrapped


async def _reject(send: Send, status: int, message: str) -> None:
    code = "payload_too_large" if status == 413 else None
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body: Any = json.dumps(error_body(message, type_=type_, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
