"""The request path of a completion: admit, resolve the model, ground it (``rag``), call a replica, render
JSON or relay SSE.

Everything that can fail for a reason the client should see (auth, the model, retrieval, engine refusal
of the request) fails before the first byte; after that, a failure becomes an SSE error event and
``[DONE]``. JSON and streams take one path to the engine (:meth:`CompletionService._send`). A stream is
relayed as bytes, event by event: the internal model name is replaced in the bytes, an engine error event
is re-rendered in the gateway's shape, and the final usage event is read for accounting; other events are
never parsed or re-encoded.

With ``rag``, one call to retrieval returns the numbered context that fits the budget (what the model's
window leaves after the prompt and the answer, at most ``rag_max_context_tokens``) and its passages; the
request's surface puts the context in front of the model, and the passages come back as ``sources``: a
top-level field of the JSON response, or of the first event of a stream.
"""

from __future__ import annotations

import asyncio
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
from gateway.engine import json_or_none, translate_transport_error
from gateway.errors import (
    BanyanError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    sse_error_event,
)
from gateway.logs import annotate
from gateway.openai_api.protocol import ENGINE_ONLY_FIELDS, GenerationRequest, ModelCard, ModelList, RagOptions
from gateway.openai_api.surfaces import Surface
from gateway.quotas import Admission
from gateway.state import AppState

log = logging.getLogger("banyan.serving")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ATTEMPTS = 2


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
    surface: Surface
    body: dict[str, Any]
    resolved: ResolvedModel
    admission: Admission
    started: float
    sources: list[dict[str, Any]] | None = None
    strip_usage: bool = False


class CompletionService:
    """Serves ``/v1/chat/completions`` and ``/v1/completions`` for one tenant request."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def handle(self, *, tenant: str, request: GenerationRequest) -> Response:
        started = time.perf_counter()
        admission = await self.state.quotas.admit(tenant)
        streaming = False
        try:
            resolved = await resolve_model(self.state, tenant, request.model)
            call = _Call(tenant=tenant, surface=request.surface, body=_engine_body(request, resolved, tenant),
                         resolved=resolved, admission=admission, started=started)
            rag = request.rag_options()
            if rag is not None:
                call.sources = await self._ground(call, rag, output_tokens=request.output_tokens())
            response = await self._send(call, stream=bool(request.stream))
            streaming = isinstance(response, StreamingResponse)  # the stream gives the slot back when it ends
            return response
        finally:
            if not streaming:
                await admission.release()

    async def _ground(self, call: _Call, rag: RagOptions, *, output_tokens: int | None) -> list[dict[str, Any]]:
        """Put the context retrieved for the request in front of the model (in ``call.body``); its passages
        are the ``sources``."""
        grounder, settings = call.surface.grounder, self.state.settings
        query = grounder.query(call.body)
        prompt = await asyncio.to_thread(grounder.prompt_tokens, call.body, self.state.tokens)
        room = settings.max_model_len - (output_tokens or settings.rag_output_reserve_tokens) - prompt
        context = await self.state.documents.context_for(
            call.tenant, query, budget_tokens=max(0, min(settings.rag_max_context_tokens, room)), top_k=rag.top_k,
            collection=rag.collection)
        if context.text:
            grounder.apply(call.body, context.text)
        return [p.source() for p in context.passages]

    async def _send(self, call: _Call, *, stream: bool) -> Response:
        """Call a replica: the JSON response, or the relay of its stream (which then owns the replica lease,
        the engine response and the admission slot until it ends)."""
        if stream:  # usage is always asked of the engine (for accounting); the client sees it only if it asked
            options = call.body.setdefault("stream_options", {})
            call.strip_usage = not options.get("include_usage")
            options["include_usage"] = True
        metrics = self.state.metrics
        held = AsyncExitStack()
        metrics.inflight.inc()
        held.callback(metrics.inflight.dec)
        try:
            upstream = await self._open(call, held)
            if not stream:
                try:
                    content = await upstream.aread()
                except httpx.HTTPError as e:
                    metrics.engine_errors.labels("unavailable").inc()
                    raise translate_transport_error(e) from e
        except BaseException:
            await held.aclose()
            raise
        if not stream:
            await held.aclose()
            return await self._render_json(call, content)
        held.push_async_callback(call.admission.release)
        return StreamingResponse(self._relay(call, upstream, held), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **call.resolved.headers()})

    async def _open(self, call: _Call, held: AsyncExitStack) -> httpx.Response:
        """The engine's 200 response, its body not read yet; ``held`` then holds it and its replica's lease.

        A replica may drop an adapter's name (an unload by another gateway replica, or its own disk cache)
        between accepting a request and starting it: an adapter 404 is asked again once, and the replica
        loads the adapter anew."""
        metrics, resolved = self.state.metrics, call.resolved
        for attempt in range(1, _ATTEMPTS + 1):
            lease = AsyncExitStack()
            handed_over = False
            try:
                replica = await lease.enter_async_context(
                    self.state.engines.lease(resolved.engine, is_adapter=resolved.adapter is not None))
                request = replica.client.build_request("POST", call.surface.path, json=call.body)
                try:
                    response = await replica.client.send(request, stream=True)
                    if response.status_code != 200:
                        try:
                            content = await response.aread()
                        finally:
                            await response.aclose()
                except httpx.HTTPError as e:
                    metrics.engine_errors.labels("unavailable").inc()
                    raise translate_transport_error(e) from e
                if response.status_code == 200:
                    held.push_async_callback(lease.aclose)
                    held.push_async_callback(response.aclose)
                    handed_over = True
                    return response
            finally:
                if not handed_over:
                    await lease.aclose()
            if response.status_code == 404 and resolved.adapter is not None and attempt < _ATTEMPTS:
                metrics.engine_errors.labels("adapter_retried").inc()
                continue
            metrics.engine_errors.labels(f"status_{response.status_code // 100}xx").inc()
            raise _upstream_error(response.status_code, content, resolved)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _render_json(self, call: _Call, content: bytes) -> Response:
        payload = json_or_none(content)
        if not isinstance(payload, dict):
            self.state.metrics.engine_errors.labels("unavailable").inc()
            raise EngineUnavailable("The engine sent an unreadable response.")
        payload["model"] = call.resolved.public
        if call.sources is not None:
            payload["sources"] = call.sources
        await self._record(call, payload.get("usage") or {})
        return JSONResponse(payload, headers=call.resolved.headers())

    async def _relay(self, call: _Call, upstream: httpx.Response, held: AsyncExitStack) -> AsyncIterator[bytes]:
        metrics = self.state.metrics
        rewriter = _EventRewriter(call.resolved, sources=call.sources, strip_usage=call.strip_usage)
        first = True
        try:
            async for chunk in upstream.aiter_raw():
                out = rewriter.feed(chunk)
                if out:
                    if first:
                        ttft = time.perf_counter() - call.started
                        metrics.ttft_seconds.labels(call.surface.label).observe(ttft)
                        annotate(ttft_ms=round(ttft * 1000, 2))
                        first = False
                    yield out
            tail = rewriter.flush()
            if tail:
                yield tail
        except httpx.HTTPError as e:
            metrics.engine_errors.labels("stream_broken").inc()
            log.warning("engine stream broke: %s", type(e).__name__)
            yield sse_error_event(EngineUnavailable("The engine stream was interrupted."))
        finally:
            if rewriter.usage is not None:
                await self._record(call, rewriter.usage)
            await held.aclose()

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


class _EventRewriter:
    """Rewrites the engine's complete SSE events for the client: the internal model name becomes the public
    one, an engine error event is re-rendered in the gateway's error shape, ``sources`` (when given) become
    the first key of the first data event, and the usage of the final usage event is noted (and the event
    dropped when the client did not ask for usage)."""

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
