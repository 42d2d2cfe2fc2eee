"""Every error the gateway can answer with, rendered in the OpenAI shape by :func:`render`.

::

    BanyanError (500 server_error)
     +-- InvalidRequest (400 invalid_request_error)
     |    +-- InvalidAdapter (400 invalid_request_error, code invalid_adapter)
     +-- AuthError (401 authentication_error, code invalid_api_key)
     +-- NotFound (404 not_found_error)
     |    +-- ModelNotFound (404 not_found_error, code model_not_found)
     +-- Conflict (409 conflict_error)
     +-- PayloadTooLarge (413 invalid_request_error, code payload_too_large)
     +-- RateLimited (429 rate_limit_error, code rate_limit_exceeded | quota_exceeded)
     +-- UpstreamError (the engine's own 4xx, passed through with its status)
     +-- ServiceUnavailable (503 server_error)
          +-- EngineUnavailable (code engine_unavailable)
          +-- DependencyUnavailable (code dependency_unavailable)

Where other errors become these: botocore's in :mod:`adapters.store` (into ``StoreError``) and the httpx
errors of engine calls with :func:`gateway.engine.translate_transport_error` (into ``EngineUnavailable``),
where they are raised, with ``raise ... from e``. The errors of Banyan's packages (:mod:`adapters.errors`,
:mod:`adapters.store`, :mod:`retrieval.errors`) and redis's ``RedisError`` reach the handlers untranslated
and are mapped by type in one table (:func:`translate`). Nothing looks at message strings. Anything else
is a 500 with a generic message: internals never reach the client.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

log = logging.getLogger("banyan.errors")


class BanyanError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


class InvalidRequest(BanyanError):
    status = 400
    type = "invalid_request_error"


class InvalidAdapter(InvalidRequest):
    default_code = "invalid_adapter"


class AuthError(BanyanError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(BanyanError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class Conflict(BanyanError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(BanyanError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(BanyanError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(BanyanError):
    """A 4xx the engine gave for a request it could not take (bad sampling params, too long...)."""

    def __init__(self, message: str, *, status: int, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.upstream_status = status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=_TYPE_BY_STATUS.get(self.upstream_status, "invalid_request_error"),
                          param=self.param, code=self.code)


class ServiceUnavailable(BanyanError):
    status = 503


class EngineUnavailable(ServiceUnavailable):
    default_code = "engine_unavailable"


class DependencyUnavailable(ServiceUnavailable):
    default_code = "dependency_unavailable"


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _translations() -> dict[type[Exception], Any]:
    from redis.exceptions import RedisError

    from adapters.errors import AdapterTooLargeError, InvalidAdapterError
    from adapters.store import ObjectMissing, StoreError
    from retrieval.errors import (
        DocumentNotFound,
        DocumentTooLarge,
        InvalidDocument,
        InvalidQuery,
        QuotaExceeded,
        RetrievalUnavailable,
        WriteRefused,
    )

    return {
        AdapterTooLargeError: lambda e: PayloadTooLarge(e.message),
        InvalidAdapterError: lambda e: InvalidAdapter(e.message, code=e.code),
        ObjectMissing: lambda e: DependencyUnavailable("Object storage is missing data it should hold."),
        StoreError: lambda e: DependencyUnavailable("Object storage is unavailable; try again shortly."),
        RedisError: lambda e: DependencyUnavailable("The gateway's database is unavailable; try again shortly."),
        DocumentTooLarge: lambda e: PayloadTooLarge(e.message, param=e.param),
        InvalidDocument: lambda e: InvalidRequest(e.message, param=e.param),
        InvalidQuery: lambda e: InvalidRequest(e.message, param=e.param),
        DocumentNotFound: lambda e: NotFound(e.message, param=e.param),
        QuotaExceeded: lambda e: RateLimited(e.message, param=e.param, code="quota_exceeded"),
        WriteRefused: lambda e: AuthError("Incorrect API key provided."),  # its tenant is being deleted
        RetrievalUnavailable: lambda e: DependencyUnavailable("Retrieval is unavailable; try again shortly."),
    }


_TRANSLATIONS = _translations()


def translate(exc: Exception) -> BanyanError:
    """A third-party or package error -> the gateway's error, by type (most specific class first)."""
    for cls in type(exc).__mro__:
        factory = _TRANSLATIONS.get(cls)
        if factory is not None:
            result: BanyanError = factory(exc)
            if isinstance(result, DependencyUnavailable):  # the answer says which dependency; the log says why
                log.warning("dependency unavailable: %s: %s", type(exc).__name__, str(exc)[:300])
            else:
                log.debug("translated %s", cls.__name__)
            return result
    return BanyanError("The server had an error while processing your request.")


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(exc: BanyanError) -> int:
    return exc.upstream_status if isinstance(exc, UpstreamError) else exc.status


def render(exc: BanyanError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=status_of(exc), headers=exc.headers)


def sse_error_event(exc: BanyanError) -> bytes:
    """The tail of a stream that failed after it started: an error event, then ``[DONE]``."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\ndata: [DONE]\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    where = list(first.get("loc", ()))
    if where and where[0] in ("body", "query", "path", "header", "cookie"):  # the location, not a field name
        where = where[1:]
    loc = [str(p) for p in where]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    async def _banyan(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, BanyanError)
        return render(exc)

    async def _validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, type_="invalid_request_error", param=param), status_code=400)

    async def _http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        type_ = _TYPE_BY_STATUS.get(exc.status_code, "server_error" if exc.status_code >= 500 else
                                    "invalid_request_error")
        code = "payload_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), type_=type_, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("The server had an error while processing your request.",
                                       type_="server_error"), status_code=500)

    async def _translated(_: Request, exc: Exception) -> Response:
        return render(translate(exc))

    app.add_exception_handler(BanyanError, _banyan)
    for third_party in _TRANSLATIONS:
        app.add_exception_handler(third_party, _translated)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
