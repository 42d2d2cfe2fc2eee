"""OpenTelemetry tracing of a request's stages, and the request's identity passed on to the engine.

Off by default: without ``OTEL_EXPORTER_OTLP_ENDPOINT`` (:attr:`Settings.otel_exporter_otlp_endpoint`) no SDK is
imported or set up, and every stage is a shared no-op context manager (no span objects, no context switches: the
OpenTelemetry API's own no-op tracer costs about 8 us a span here, ``nullcontext`` well under 1 us). On, each
request is a server span (``POST /v1/chat/completions``) whose children are its stages: ``auth``, ``admission``,
``model_resolution``, ``retrieval``, ``engine_call`` and ``stream``; spans go out over OTLP/HTTP in batches. An
incoming W3C ``traceparent`` (and ``tracestate``) makes the request span its child.

Whether tracing is on or not, the engine call carries the gateway's request id as ``X-Request-Id`` (vLLM names its
request after it, so its logs and the gateway's access log join up) and a ``traceparent``: the engine call span's
when tracing is on, else the client's own one passed through unchanged.

Span attributes are ids, names and numbers only: never a key, a prompt, a document or an answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.settings import Settings

@contextmanager
def _stage(tracer: trace.Tracer, name: str, attributes: dict[str, str | int | bool]) -> Iterator[trace.Span]:
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as e:
            span.set_attribute("error.type", type(e).__name__)
            span.set_status(trace.StatusCode.ERROR, type(e).__name__)
            raise


_PROPAGATOR = TraceContextTextMapPropagator()
_NOTHING: AbstractContextManager[None] = nullcontext()


_incoming: ContextVar[tuple[str, str | None, str | None] | None] = ContextVar("banyan_incoming_request", default=None)
"""The request id, ``traceparent`` and ``tracestate`` of the request being served (a plain tuple: this runs on every
request, tracing on or off)."""


@dataclass(slots=True)
class RequestSpan:
    """The server span of a request and the context token that made it current (None when tracing is off)."""

    span: trace.Span | None = None
    token: Token[otel_context.Context] | None = None


_NO_SPAN = RequestSpan()


class Tracing:
    """The gateway's tracer, or nothing: :meth:`from_settings` builds it; tests pass their own ``provider`` (an SDK
    ``TracerProvider`` with an in-memory exporter)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("banyan.gateway") if provider is not None else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        endpoint = settings.otel_exporter_otlp_endpoint
        if not endpoint:
            return cls()
        # Imported only when on: a gateway without tracing never loads the SDK or the exporter.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
        # The standard variable names the OTLP base URL; the HTTP exporter takes the traces URL itself.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def begin_request(self, *, method: str, path: str, headers: Mapping[bytes, bytes],
                      request_id: str) -> RequestSpan:
        """Note the request's id and trace headers for the engine call; when on, start its server span as the
        child of the incoming ``traceparent`` and make it current (:meth:`end_request` in the same task ends it)."""
        parent_header = headers.get(b"traceparent")
        state_header = headers.get(b"tracestate")
        traceparent = parent_header.decode("latin-1") if parent_header else None
        tracestate = state_header.decode("latin-1") if state_header else None
        _incoming.set((request_id, traceparent, tracestate))
        if self._tracer is None:
            return _NO_SPAN
        carrier = {k: v for k, v in (("traceparent", traceparent), ("tracestate", tracestate)) if v}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self._tracer.start_span(f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER,
                                       attributes={"http.request.method": method, "url.path": path,
                                                   "banyan.request_id": request_id})
        return RequestSpan(span=span, token=otel_context.attach(trace.set_span_in_context(span)))

    def end_request(self, request: RequestSpan, *, route: str, status: int, method: str) -> None:
        if request.span is None:
            return
        request.span.update_name(f"{method} {route}")
        request.span.set_attribute("http.route", route)
        request.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            request.span.set_status(trace.StatusCode.ERROR)
        request.span.end()
        if request.token is not None:
            otel_context.detach(request.token)

    def trace_id(self, request: RequestSpan) -> str | None:
        """The request's trace id in hex (for its access log line), or None when tracing is off."""
        return format(request.span.get_span_context().trace_id, "032x") if request.span is not None else None

    def stage(self, name: str, **attributes: str | int | bool) -> AbstractContextManager[Any]:
        """A child span of the current one around a stage of the request (a no-op when tracing is off). A stage
        that raises is marked failed with the error's type only (messages may quote the request)."""
        if self._tracer is None:
            return _NOTHING
        return _stage(self._tracer, name, attributes)

    def start(self, name: str, **attributes: str | int | bool) -> trace.Span | None:
        """A span that outlives the code that starts it (a stream relayed after the route returned): the caller
        ends it. None when tracing is off."""
        if self._tracer is None:
            return None
        return self._tracer.start_span(name, attributes=attributes)

    def engine_headers(self) -> dict[str, str]:
        """The headers of an engine call: the request id, and the trace context (the current span's when on, else
        the client's own ``traceparent`` passed through)."""
        incoming = _incoming.get()
        headers: dict[str, str] = {}
        if incoming is None:
            return headers
        request_id, traceparent, tracestate = incoming
        headers["X-Request-Id"] = request_id
        if self._tracer is not None:
            _PROPAGATOR.inject(headers)
        elif traceparent:
            headers["traceparent"] = traceparent
            if tracestate:
                headers["tracestate"] = tracestate
        return headers

    def shutdown(self) -> None:
        """Export what is still buffered (at the gateway's shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()
