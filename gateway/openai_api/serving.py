"""The request path of a completion: resolve the model, call a replica, render JSON or SSE.

Everything that can fail for a reason the client should see (auth, the model, engine refusal of the
request) fails before the first byte; after that, a failure becomes an SSE error event and ``[DONE]``.
The stream is relayed event by event with the internal model name rewritten in the bytes; it is
never re-encoded as JSON.

With ``rag``, passages are retrieved from the caller's documents (before the first byte, like every
other check), put in front of the model by the surface's grounder, and returned as ``sources``: a
top-level field of the JSON response, or of the first event of a stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.naming import AdapterRef, is_valid_id
from gateway.engine import Replica, json_or_none, translate_transport_error
from gateway.errors import (
    BanyanError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    sse_error_event,
)
from gateway.logs import annotate
from gateway.metrics import Metrics
from gateway.openai_api.protocol import ENGINE_ONLY_FIELDS, GenerationRequest, ModelCard, ModelList, RagOptions
from gateway.quotas import Admission
from gateway.state import AppState
from retrieval.grounding import ChatGrounder, Grounder, PromptGrounder, build_context
from retrieval.service import MAX_QUERY_CHARS

log = logging.getLogger("banyan.serving")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_GROUNDERS: dict[str, Grounder] = {"/v1/chat/completions": ChatGrounder(), "/v1/completions": PromptGrounder()}


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    public: str
    engine: str
    adapter: AdapterRef | None

    def headers(self) -> dict[str, str]:
        if self.adapter is None:
            return {}
        return {"x-banyan-adapter": self.adapter.name, "x-banyan-adapter-version": str(self.adapter.version)}


async def resolve_model(state: AppState, tenant: str, model: str) -> ResolvedModel:
    """The caller's ``model`` -> what the engine serves. Another tenant's adapter is simply unknown."""
    if model == state.settings.base_model:
        state.metrics.model_resolutions.labels("base").inc()
        return ResolvedModel(public=model, engine=model, adapter=None)
    meta = await state.adapters.active_meta(tenant, model) if is_valid_id(model) else None
    if meta is None:
        state.metrics.model_resolutions.labels("not_found").inc()
        raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.",
                            param="model")
    ref = AdapterRef(tenant=tenant, name=model, version=meta.version, uid=meta.uid)
    state.metrics.model_resolutions.labels("adapter").inc()
    annotate(adapter=model, adapter_version=meta.version)
    return ResolvedModel(public=model, engine=ref.engine_name, adapter=ref)


async def list_models(state: AppState, tenant: str) -> ModelList:
    base = state.settings.base_model
    cards = [ModelCard(id=base, created=0, owned_by="banyan", root=base)]
    for record in await state.adapters.list_records(tenant):
        meta = record.active_meta
        if meta is not None:
            cards.append(ModelCard(id=record.name, created=meta.created, owned_by=tenant, parent=base, root=base))
    return ModelList(data=cards)


def cache_salt(tenant: str) -> str:
    """A per-tenant salt so the engine's prefix cache is never shared across tenants."""
    return hashlib.sha256(f"banyan-tenant:{tenant}".encode()).hexdigest()[:32]


def _engine_body(request: GenerationRequest, resolved: ResolvedModel, tenant: str) -> dict[str, Any]:
    body = request.engine_body()
    forbidden = sorted(ENGINE_ONLY_FIELDS.intersection(body))
    if forbidden:
        raise InvalidRequest(f"Unsupported parameter: `{forbidden[0]}` is set by the gateway.", param=forbidden[0])
    body["model"] = resolved.engine
    body["cache_salt"] = cache_salt(tenant)
    return body


def _upstream_error(status: int, content: bytes, resolved: ResolvedModel) -> BanyanError:
    """Render the engine's error for the client, never leaking the internal model name."""
    parsed = json_or_none(content)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    message = message.replace(resolved.engine, resolved.public) or "The engine rejected the request."
    if status >= 500 or (status == 404 and resolved.adapter is not None):
        return EngineUnavailable(f"The engine could not serve `{resolved.public}` right now.")
    if status == 404:
        return ModelNotFound(f"The model `{resolved.public}` does not exist.", param="model")
    return UpstreamError(message, status=status, param=param)


@dataclass
class _Call:
    """One completion request on its way through the gateway."""

    tenant: str
    path: str
    body: dict[str, Any]
    resolved: ResolvedModel
    admission: Admission
    started: float
    sources: list[dict[str, Any]] | None = None
    strip_usage: bool = False

    @property
    def endpoint(self) -> str:
        return "chat" if self.path.endswith("/chat/completions") else "completions"


class CompletionService:
    """Serves ``/v1/chat/completions`` and ``/v1/completions`` for one tenant request."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def handle(self, *, tenant: str, request: GenerationRequest, path: str) -> Response:
        started = time.perf_counter()
        admission = await self.state.quotas.admit(tenant)
        streaming = False
        try:
            resolved = await resolve_model(self.state, tenant, request.model)
            call = _Call(tenant=tenant, path=path, body=_engine_body(request, resolved, tenant), resolved=resolved,
                         admission=admission, started=started)
            rag = request.rag_options()
            if rag is not None:
                call.sources = await self._ground(tenant, rag, path, call.body)
            if request.stream:
                response = await self._stream(call)
                streaming = True  # the stream gives the slot back when it ends
                return response
            return await self._json(call)
        finally:
            if not streaming:
                await admission.release()

    async def _ground(self, tenant: str, rag: RagOptions, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Retrieve for the request, put the passages that fit the budget in front of the model (in
        ``body``); those passages are the ``sources``."""
        grounder = _GROUNDERS[path]
        query = grounder.query(body)[:MAX_QUERY_CHARS]
        passages = await self.state.documents.retrieve(tenant, query, top_k=rag.top_k, collection=rag.collection)
        context = build_context(passages, budget_chars=self.state.settings.rag_context_chars)
        if context.text:
            grounder.apply(body, context.text)
        return [p.source() for p in context.passages]

    async def _record(self, call: _Call, usage: dict[str, Any]) -> None:
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.state.metrics.tokens.labels("prompt").inc(prompt)
        self.state.metrics.tokens.labels("completion").inc(completion)
        annotate(prompt_tokens=prompt, completion_tokens=completion)
        try:
            await self.state.usage.record(call.tenant, model=call.resolved.public, prompt_tokens=prompt,
                                          completion_tokens=completion)
        except RedisError as e:  # the answer is served; losing one usage record must not fail it
            log.warning("recording usage failed: %s", type(e).__name__)

    async def _json(self, call: _Call) -> Response:
        metrics, resolved = self.state.metrics, call.resolved
        metrics.inflight.inc()
        try:
            for attempt in range(1, _ATTEMPTS + 1):
                async with self.state.engines.lease(resolved.engine, adapter=resolved.adapter is not None) as replica:
                    try:
                        response = await replica.client.post(call.path, json=call.body)
                    except httpx.HTTPError as e:
                        metrics.engine_errors.labels("unavailable").inc()
                        raise translate_transport_error(e) from e
                if not _retry_adapter_miss(response.status_code, resolved, attempt, metrics):
                    break
        finally:
            metrics.inflight.dec()
        if response.status_code != 200:
            metrics.engine_errors.labels(f"status_{response.status_code // 100}xx").inc()
            raise _upstream_error(response.status_code, response.content, resolved)
        payload = json_or_none(response.content)
        if not isinstance(payload, dict):
            metrics.engine_errors.labels("unavailable").inc()
            raise EngineUnavailable("The engine sent an unreadable response.")
        payload["model"] = resolved.public
        if call.sources is not None:
            payload["sources"] = call.sources
        await self._record(call, payload.get("usage") or {})
        return JSONResponse(payload, headers=resolved.headers())

    async def _stream(self, call: _Call) -> Response:
        # Usage is always asked of the engine (for accounting); the client sees it only if it asked.
        options = call.body.setdefault("stream_options", {})
        call.strip_usage = not options.get("include_usage")
        options["include_usage"] = True
        for attempt in range(1, _ATTEMPTS + 1):
            stack = AsyncExitStack()
            try:
                replica = await stack.enter_async_context(
                    self.state.engines.lease(call.resolved.engine, adapter=call.resolved.adapter is not None))
                upstream = await _open_stream(replica, call, self.state, attempt=attempt)
            except BaseException:
                await stack.aclose()
                raise
            if upstream is not None:
                break
            await stack.aclose()
        assert upstream is not None  # the last attempt raises instead of asking for another
        stack.push_async_callback(upstream.aclose)
        stack.push_async_callback(call.admission.release)
        return StreamingResponse(self._relay(call, upstream, stack), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **call.resolved.headers()})

    async def _relay(self, call: _Call, upstream: httpx.Response, stack: AsyncExitStack) -> AsyncIterator[bytes]:
        metrics = self.state.metrics
        rewrite = _NameRewriter(call.resolved, sources=call.sources, strip_usage=call.strip_usage)
        first = True
        metrics.inflight.inc()
        try:
            async for chunk in upstream.aiter_raw():
                out = rewrite.feed(chunk)
                if out:
                    if first:
                        ttft = time.perf_counter() - call.started
                        metrics.ttft_seconds.labels(call.endpoint).observe(ttft)
                        annotate(ttft_ms=round(ttft * 1000, 2))
                        first = False
                    yield out
            tail = rewrite.flush()
            if tail:
                yield tail
        except httpx.HTTPError as e:
            metrics.engine_errors.labels("stream_broken").inc()
            log.warning("engine stream broke: %s", type(e).__name__)
            yield sse_error_event(EngineUnavailable("The engine stream was interrupted."))
        finally:
            metrics.inflight.dec()
            if rewrite.usage is not None:
                await self._record(call, rewrite.usage)
            await stack.aclose()


_ATTEMPTS = 2


def _retry_adapter_miss(status: int, resolved: ResolvedModel, attempt: int, metrics: Metrics) -> bool:
    """Whether to send again: a replica may drop an adapter's name (an unload by another gateway replica, or
    its own disk cache) between accepting a request and starting it; asked again, it loads the adapter anew."""
    if status == 404 and resolved.adapter is not None and attempt < _ATTEMPTS:
        metrics.engine_errors.labels("adapter_retried").inc()
        return True
    return False


async def _open_stream(replica: Replica, call: _Call, state: AppState, *, attempt: int) -> httpx.Response | None:
    """The engine's stream, or None when it should be asked again (see :func:`_retry_adapter_miss`)."""
    request = replica.client.build_request("POST", call.path, json=call.body)
    try:
        response = await replica.client.send(request, stream=True)
    except httpx.HTTPError as e:
        state.metrics.engine_errors.labels("unavailable").inc()
        raise translate_transport_error(e) from e
    if response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        if _retry_adapter_miss(response.status_code, call.resolved, attempt, state.metrics):
            return None
        state.metrics.engine_errors.labels(f"status_{response.status_code // 100}xx").inc()
        raise _upstream_error(response.status_code, content, call.resolved)
    return response


class _NameRewriter:
    """Rewrites complete SSE events: the internal model name becomes the public one, an engine error
    event is re-rendered in the gateway's error shape, and ``sources`` (when given) become the first
    key of the first data event."""

    def __init__(self, resolved: ResolvedModel, *, sources: list[dict[str, Any]] | None = None,
                 strip_usage: bool = False) -> None:
        self._resolved = resolved
        self._strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self._needle = json.dumps(resolved.engine).encode() if resolved.adapter else b""
        self._replacement = json.dumps(resolved.public).encode()
        self._buffer = b""
        self._sources = b'"sources": ' + json.dumps(sources).encode() if sources is not None else b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buffer = data
            return b""
        self._buffer = data[cut + 2:]
        return self._rewrite(data[:cut + 2])

    def flush(self) -> bytes:
        data, self._buffer = self._buffer, b""
        return self._rewrite(data) if data else b""

    def _rewrite(self, events: bytes) -> bytes:
        if self._needle:
            events = events.replace(self._needle, self._replacement)
        if b'data: {"error"' in events:
            events = b"".join(self._render_error(e) for e in events.split(b"\n\n") if e)
        if b'"usage":{' in events:
            events = b"".join(self._take_usage(e) for e in events.split(b"\n\n") if e)
        if self._sources:
            events = self._add_sources(events)
        return events

    def _add_sources(self, events: bytes) -> bytes:
        """Put the sources in the first data event (an error event is not one): once."""
        at = events.find(b"data: {")
        if at < 0 or events.startswith(b'data: {"error"', at):
            return events
        cut = at + len(b"data: {")
        separator = b"" if events[cut:cut + 1] == b"}" else b", "
        sources, self._sources = self._sources, b""
        return events[:cut] + sources + separator + events[cut:]

    def _take_usage(self, event: bytes) -> bytes:
        """Note the usage of the final usage-only event; drop that event if the client did not ask for it."""
        if b'"choices":[]' not in event or not event.startswith(b"data: {"):
            return event + b"\n\n"
        parsed = json_or_none(event[len(b"data: "):])
        if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
            self.usage = parsed["usage"]
            if self._strip_usage:
                return b""
        return event + b"\n\n"

    def _render_error(self, event: bytes) -> bytes:
        if not event.startswith(b'data: {"error"'):
            return event + b"\n\n"
        parsed = json_or_none(event[len(b"data: "):])
        error = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        code = error.get("code")
        status = code if isinstance(code, int) else 500
        rendered = _upstream_error(status, json.dumps(parsed).encode(), self._resolved)
        return b"data: " + json.dumps(rendered.body()).encode() + b"\n\n"
