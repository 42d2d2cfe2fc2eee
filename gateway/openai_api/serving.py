"""The request path of a completion: resolve the model, call a replica, render JSON or SSE.

Everything that can fail for a reason the client should see (auth, the model, engine refusal of the
request) fails before the first byte; after that, a failure becomes an SSE error event and ``[DONE]``.
The stream is relayed event by event with the internal model name rewritten in the bytes; it is
never re-encoded as JSON.
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
from gateway.openai_api.protocol import ENGINE_ONLY_FIELDS, ModelCard, ModelList, _GenerationRequest
from gateway.state import AppState

log = logging.getLogger("banyan.serving")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


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
        return ResolvedModel(public=model, engine=model, adapter=None)
    record = await state.adapters.get(tenant, model) if is_valid_id(model) else None
    meta = record.active_meta if record else None
    if meta is None:
        raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.",
                            param="model")
    ref = AdapterRef(tenant=tenant, name=model, version=meta.version, uid=meta.uid)
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


def _engine_body(request: _GenerationRequest, resolved: ResolvedModel, tenant: str) -> dict[str, Any]:
    body = request.engine_body()
    forbidden = sorted(ENGINE_ONLY_FIELDS.intersection(body))
    if forbidden:
        raise InvalidRequest(f"Unsupported parameter: `{forbidden[0]}` is set by the gateway.", param=forbidden[0])
    body["model"] = resolved.engine
    body["cache_salt"] = cache_salt(tenant)
    return body


def _upstream_error(status: int, content: bytes, resolved: ResolvedModel) -> BanyanError:
    """Render the engine's error for the client, never leaking the internal model name."""
    parsed = json_or_none_bytes(content)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    message = message.replace(resolved.engine, resolved.public) or "The engine rejected the request."
    if status >= 500 or (status == 404 and resolved.adapter is not None):
        return EngineUnavailable(f"The engine could not serve `{resolved.public}` right now.")
    if status == 404:
        return ModelNotFound(f"The model `{resolved.public}` does not exist.", param="model")
    return UpstreamError(message, status=status, param=param)


def json_or_none_bytes(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


class CompletionService:
    """Serves ``/v1/chat/completions`` and ``/v1/completions`` for one tenant request."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def handle(self, *, tenant: str, request: _GenerationRequest, path: str) -> Response:
        if request.rag_options() is not None:
            raise InvalidRequest("Retrieval (`rag`) is not enabled on this gateway.", param="rag")
        resolved = await resolve_model(self.state, tenant, request.model)
        body = _engine_body(request, resolved, tenant)
        if request.stream:
            return await self._stream(path, body, resolved)
        return await self._json(path, body, resolved)

    async def _json(self, path: str, body: dict[str, Any], resolved: ResolvedModel) -> Response:
        metrics = self.state.metrics
        metrics.inflight.inc()
        try:
            async with self.state.engines.lease(resolved.engine, adapter=resolved.adapter is not None) as replica:
                try:
                    response = await replica.client.post(path, json=body)
                except httpx.HTTPError as e:
                    metrics.engine_errors.labels("unavailable").inc()
                    raise translate_transport_error(e) from e
        finally:
            metrics.inflight.dec()
        if response.status_code != 200:
            metrics.engine_errors.labels(f"status_{response.status_code // 100}xx").inc()
            raise _upstream_error(response.status_code, response.content, resolved)
        payload = json_or_none(response)
        if not isinstance(payload, dict):
            metrics.engine_errors.labels("unavailable").inc()
            raise EngineUnavailable("The engine sent an unreadable response.")
        payload["model"] = resolved.public
        usage = payload.get("usage") or {}
        metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens") or 0)
        metrics.tokens.labels("completion").inc(usage.get("completion_tokens") or 0)
        return JSONResponse(payload, headers=resolved.headers())

    async def _stream(self, path: str, body: dict[str, Any], resolved: ResolvedModel) -> Response:
        started = time.perf_counter()
        stack = AsyncExitStack()
        try:
            replica = await stack.enter_async_context(
                self.state.engines.lease(resolved.engine, adapter=resolved.adapter is not None))
            upstream = await _open_stream(replica, path, body, resolved, self.state)
            stack.push_async_callback(upstream.aclose)
        except BaseException:
            await stack.aclose()
            raise
        return StreamingResponse(self._relay(upstream, stack, resolved, started), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **resolved.headers()})

    async def _relay(self, upstream: httpx.Response, stack: AsyncExitStack, resolved: ResolvedModel,
                     started: float) -> AsyncIterator[bytes]:
        metrics = self.state.metrics
        rewrite = _NameRewriter(resolved)
        first = True
        metrics.inflight.inc()
        try:
            async for chunk in upstream.aiter_raw():
                out = rewrite.feed(chunk)
                if out:
                    if first:
                        metrics.ttft_seconds.labels("stream").observe(time.perf_counter() - started)
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
            await stack.aclose()


async def _open_stream(replica: Replica, path: str, body: dict[str, Any], resolved: ResolvedModel,
                       state: AppState) -> httpx.Response:
    try:
        response = await replica.client.send(replica.client.build_request("POST", path, json=body), stream=True)
    except httpx.HTTPError as e:
        state.metrics.engine_errors.labels("unavailable").inc()
        raise translate_transport_error(e) from e
    if response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        state.metrics.engine_errors.labels(f"status_{response.status_code // 100}xx").inc()
        raise _upstream_error(response.status_code, content, resolved)
    return response


class _NameRewriter:
    """Rewrites complete SSE events: the internal model name becomes the public one, and an engine
    error event is re-rendered in the gateway's error shape."""

    def __init__(self, resolved: ResolvedModel) -> None:
        self._resolved = resolved
        self._needle = json.dumps(resolved.engine).encode() if resolved.adapter else b""
        self._replacement = json.dumps(resolved.public).encode()
        self._buffer = b""

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
        return events

    def _render_error(self, event: bytes) -> bytes:
        if not event.startswith(b'data: {"error"'):
            return event + b"\n\n"
        parsed = json_or_none_bytes(event[len(b"data: "):])
        error = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        code = error.get("code")
        status = code if isinstance(code, int) else 500
        rendered = _upstream_error(status, json.dumps(parsed).encode(), self._resolved)
        return b"data: " + json.dumps(rendered.body()).encode() + b"\n\n"
