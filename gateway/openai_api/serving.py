"""The request path of a completion: admit, resolve the model, ground it (``rag``), call a replica, render
JSON or relay SSE.

Everything that can fail for a reason the client should see (auth, the model, retrieval, engine refusal
of the request) fails before the first byte; after that, a failure becomes an SSE error event and
``[DONE]``. JSON and streams take one path to the engine (:meth:`CompletionService._send`). A stream is
relayed as bytes, each read from the engine written at once onto the ASGI ``send`` (:class:`_RelayResponse`: no
body iterator, nothing per event but the rewrite; the shutdown drain cuts a relay through a callback): the
internal model name is replaced in the bytes, an engine error event is re-rendered in the gateway's shape, and the
usage the engine puts on every event (``stream_options`` ``continuous_usage_stats``, always asked of it) is read
and, unless the client asked for it, cut out of the event's bytes; events are never re-encoded.

Before admission, the request's fields are checked against the surface's allowlist and the per-request caps,
and its worst case in tokens is reserved against the tenant's ``tpm`` (:mod:`gateway.openai_api.limits`). When the
tenant's last admission on this replica left ample room (``engine_first``, :class:`gateway.quotas.Headroom`), a
request without ``rag`` starts on the engine while its admission is decided (the Redis round trip is then off the
time to first token); a refusal cancels the engine call and is the answer, and nothing of the engine's is used
before the admission is granted.
Whatever way a request ends (answered, refused by the engine, the engine gone, the client gone, the task
cancelled), what the engine reported is recorded as usage and the admission is released (its lease given
back, the reserved tokens it did not use refunded, the tokens used charged to the ``tpm`` window and the
budgets), in a task of its own that a cancellation cannot cut short. Every response of an admitted request
(JSON, stream or error) carries the ``x-ratelimit-*`` headers of its admission. A client that leaves a JSON
request ends the engine's work on it (the engine call is closed) and keeps its reservation in the ``tpm`` window:
what the engine did for it is unknown.

With ``rag``, one call to retrieval returns the numbered context that fits the budget (what the model's
window leaves after the prompt and the answer, at most ``rag_max_context_tokens``) and its passages; the
request's surface puts the context in front of the model, and the passages come back as ``sources``: a
top-level field of the JSON response, or of the first event of a stream.

An adapter with a traffic split serves each request with its active or its canary version, by a bucket that is
a stable hash of the request's ``user`` (so a user stays on one version while the split holds; random without
``user``); ``x-banyan-adapter-version`` says which. When the engine cannot load the adapter (it could not fetch
it: a 404 after the retry; or it would not load it: a 400 the base model does not give the same request), a
tenant with ``fallback_to_base`` is served by the base model, with the grounding already done, the ``model``
the client sent echoed, ``x-banyan-fallback: base``, and the usage recorded against the base model.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from adapters.naming import AdapterRef, is_valid_id
from adapters.registry import VersionMeta, split_bucket
from gateway.engine import json_or_none, translate_transport_error
from gateway.engine_http import EngineResponse
from gateway.errors import (
    BanyanError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    sse_error_event,
)
from gateway.logs import annotate
from gateway.metrics import Metrics
from gateway.openai_api.limits import apply_output_cap, check_caps, prompt_sizes, worst_case_tokens
from gateway.openai_api.protocol import GenerationRequest, ModelCard, ModelList, RagOptions
from gateway.openai_api.surfaces import Surface
from gateway.quotas import Admission, CountNeeded
from gateway.redis_batch import once_id
from gateway.settings import Settings
from gateway.state import AppState
from retrieval.context import TokenCounter

log = logging.getLogger("banyan.serving")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ATTEMPTS = 2
_ADAPTER_LOAD_FAILURES = {404: "unresolved", 400: "refused"}
"""How vLLM answers a request whose adapter it cannot load: 404 when no resolver could provide it (Banyan's
resolver could not fetch it), 400 when it was found and would not load (or when the request itself is bad: the
base model tells the two apart on a fallback)."""
_T = TypeVar("_T")

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before its answer (nginx's convention; nobody reads it)."""

Disconnected = Callable[[], Awaitable[None]]
"""Returns once the client has gone away."""

_detached: set[asyncio.Task[None]] = set()
"""End-of-request work in flight: referenced here until done, so that it is never collected half-way."""


INLINE_COUNT_MAX_BYTES = 1024
"""A request body at most this large has its prompt counted on the event loop (tens of microseconds: less than
the hop to a worker thread costs); a larger one is counted in a thread."""

USAGE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0)
"""How long a usage record that Redis refused is tried again (about a minute in all, then it is logged lost)."""


def _keep(task: asyncio.Task[None]) -> asyncio.Task[None]:
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    return task


async def _finish_whatever_happens(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` (accounting, releases) to its end even if the caller is being cancelled: in a task of its
    own, awaited through ``asyncio.shield`` (a cancelled caller stops waiting; the work goes on, referenced until
    done, its outcome retrieved by the shield). No anyio cancel scope: nothing on the request path cancels through
    anyio since the relay left Starlette's ``StreamingResponse``, and a shielded scope's ``__enter__`` and
    ``__exit__`` cost 3-4 % of a short request's CPU."""
    await asyncio.shield(_keep(asyncio.ensure_future(work)))


async def _record_later(record: Callable[[], Awaitable[None]]) -> None:
    """Tokens served while Redis was unreachable are still charged once it is back (within about a minute)."""
    for delay in USAGE_RETRY_DELAYS_S:
        await asyncio.sleep(delay)
        try:
            await record()
            log.info("recorded usage after Redis came back")
            return
        except RedisError:
            continue
    log.error("usage of a request is lost: Redis stayed unreachable for %.0f s", sum(USAGE_RETRY_DELAYS_S))


def client_disconnected(receive: Receive) -> Disconnected:
    """For a request whose body has been read: waits for the ASGI ``http.disconnect``."""
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    public: str
    engine: str
    adapter: AdapterRef | None
    fallback: bool = False
    """The adapter asked for could not be loaded and the base model (``engine``) serves instead."""
    base: str = ""
    """The base model that serves the request (the adapter version's own base): whose engine pool it goes to."""

    def headers(self) -> dict[str, str]:
        if self.fallback:
            return {"x-banyan-fallback": "base"}
        if self.adapter is None:
            return {}
        return {"x-banyan-adapter": self.adapter.name, "x-banyan-adapter-version": str(self.adapter.version)}

    @property
    def served(self) -> str:
        """The model usage is recorded against: what served the request (the base model on a fallback)."""
        return self.engine if self.fallback else self.public

    def on_base(self) -> ResolvedModel:
        """The same request served by its adapter's base model instead of the adapter."""
        return ResolvedModel(public=self.public, engine=self.base, adapter=None, fallback=True, base=self.base)


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")


def _base_of(state: AppState, meta: VersionMeta) -> str:
    """The base model a version serves on (records from before several bases: the default one)."""
    return meta.base_model or state.default_base


async def resolve_model(state: AppState, tenant: str, model: str, *, user: str | None = None) -> ResolvedModel:
    """The caller's ``model`` -> what the engine serves and on which base model's pool: for an adapter with a split,
    the version ``user``'s bucket picks (versions may differ in base). Another tenant's adapter is simply unknown."""
    if model in state.bases:
        state.metrics.model_resolutions.labels("base").inc()
        return ResolvedModel(public=model, engine=model, adapter=None, base=model)
    serving = await state.adapters.serving(tenant, model) if is_valid_id(model) else None
    if serving is None:
        state.metrics.model_resolutions.labels("not_found").inc()
        raise _not_found(model)
    meta, is_canary = serving.pick(split_bucket(tenant, model, user))
    base = _base_of(state, meta)
    if base not in state.bases:  # its base model was retired: activate a version made for a served one
        state.metrics.model_resolutions.labels("not_found").inc()
        raise ModelNotFound(f"Version {meta.version} of `{model}` was made for base model `{base}`, which is no "
                            f"longer served (served: {', '.join(state.bases)}).", param="model")
    ref = AdapterRef(tenant=tenant, name=model, version=meta.version, uid=meta.uid)
    state.metrics.model_resolutions.labels("adapter").inc()
    if serving.canary is not None:
        state.metrics.adapter_split_requests.labels("canary" if is_canary else "active").inc()
        annotate(adapter_role="canary" if is_canary else "active")
    annotate(adapter=model, adapter_version=meta.version)
    return ResolvedModel(public=model, engine=ref.engine_name, adapter=ref, base=base)


def _base_card(base: str) -> ModelCard:
    return ModelCard(id=base, created=0, owned_by="banyan", root=base)


def _adapter_card(state: AppState, tenant: str, name: str, meta: VersionMeta) -> ModelCard | None:
    """An adapter's card (``parent``/``root``: its active version's base); None when that base is not served."""
    base = _base_of(state, meta)
    if base not in state.bases:
        return None
    return ModelCard(id=name, created=meta.created, owned_by=tenant, parent=base, root=base)


async def list_models(state: AppState, tenant: str) -> ModelList:
    """Every served base model, then each of the tenant's adapters that has an active version on a served base."""
    cards = [_base_card(base) for base in state.bases]
    for record in await state.adapters.list_records(tenant):
        meta = record.active_meta
        card = _adapter_card(state, tenant, record.name, meta) if meta is not None else None
        if card is not None:
            cards.append(card)
    return ModelList(data=cards)


async def get_model(state: AppState, tenant: str, model: str) -> ModelCard:
    """The card ``GET /v1/models/{model}`` answers: the one :func:`list_models` lists; 404 ``model_not_found`` for
    an unknown id or another tenant's adapter."""
    if model in state.bases:
        return _base_card(model)
    meta = await state.adapters.active_meta(tenant, model) if is_valid_id(model) else None
    card = _adapter_card(state, tenant, model, meta) if meta is not None else None
    if card is None:
        raise _not_found(model)
    return card


def cache_salt(tenant: str) -> str:
    """A per-tenant salt so the engine's prefix cache is never shared across tenants."""
    return hashlib.sha256(f"banyan-tenant:{tenant}".encode()).hexdigest()[:32]


def _engine_body(request: GenerationRequest, settings: Settings) -> dict[str, Any]:
    """The allowlisted fields of the request within the caps (:class:`InvalidRequest` otherwise); the model and
    the cache salt are set once the model is resolved."""
    body = request.engine_body()
    check_caps(request, settings)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > settings.max_user_chars):
        raise InvalidRequest(f"user must be a string of at most {settings.max_user_chars} characters.", param="user")
    apply_output_cap(request, body, settings)
    return body


def _upstream_error(status: int, content: bytes, resolved: ResolvedModel) -> BanyanError:
    """Render the engine's error for the client, never leaking the internal model name."""
    parsed = json_or_none(content)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    if resolved.adapter is not None:
        message = message.replace(resolved.engine, resolved.public)
    message = message or "The engine rejected the request."
    if status >= 500 or (status == 404 and resolved.adapter is not None):
        return EngineUnavailable(f"The engine could not serve `{resolved.public}` right now.")
    if status == 404:
        return ModelNotFound(f"The model `{resolved.public}` does not exist.", param="model")
    return UpstreamError(message, status=status, param=param)


class _AdapterUnloadable(Exception):
    """The engine could not load the request's adapter (``reason``: ``unresolved``, it could not fetch it;
    ``refused``, it would not load it); ``error`` is what the client gets unless the base model serves instead."""

    def __init__(self, error: BanyanError, *, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason


@dataclass
class _Call:
    """One completion request on its way through the gateway."""

    tenant: str
    surface: Surface
    body: dict[str, Any]
    resolved: ResolvedModel
    admitted: asyncio.Future[Admission]
    """The admission: decided before the engine call, or (``engine_first``) while it starts."""
    started: float
    sources: list[dict[str, Any]] | None = None
    usage_shown: bool = False
    """The client asked for the final usage event (``stream_options.include_usage``)."""
    continuous_usage_shown: bool = False
    """The client asked for usage on every event too (``continuous_usage_stats``)."""

    @property
    def admission(self) -> Admission:
        """The admission, once granted (the engine's answer is never used before)."""
        return self.admitted.result()


class CompletionService:
    """Serves ``/v1/chat/completions`` and ``/v1/completions`` for one tenant request."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def handle(self, *, tenant: str, request: GenerationRequest,
                     disconnected: Disconnected | None = None, body_bytes: int | None = None) -> Response:
        """``body_bytes``: the size of the request's body, when it is known (its ``content-length``)."""
        started = time.perf_counter()
        settings = self.state.settings
        body = _engine_body(request, settings)
        # A base model's request counts in its tokenizer; an adapter's (its base unknown until it is resolved,
        # after admission) in the default base's, and is counted again for `rag` if its base differs.
        counted = self.state.bases[request.model].tokens if request.model in self.state.bases else self.state.tokens
        small = body_bytes is not None and body_bytes <= INLINE_COUNT_MAX_BYTES
        sizes: list[int] = []

        async def reserve_of() -> int:  # the prompts are counted once: admission and `rag` both use them
            if not sizes:
                sizes.extend(prompt_sizes(request, body, counted) if small else await asyncio.to_thread(
                    prompt_sizes, request, body, counted))
            return worst_case_tokens(request, body, prompt_sizes=sizes, settings=settings)

        tracing = self.state.tracing
        rag = request.rag_options()
        # Counted only if admission needs it (the tenant has a tpm, as far as this replica knows) or `rag` does.
        reserve = await reserve_of() if rag is not None or self.state.quotas.needs_count(tenant) else None
        admitted: asyncio.Future[Admission]
        if rag is None and settings.engine_first and self.state.headroom.ample(tenant, reserve or 0):
            admitted = asyncio.ensure_future(self._admit(tenant, reserve, reserve_of))  # decided as the engine starts
        else:
            admitted = asyncio.get_running_loop().create_future()
            with tracing.stage("admission"):
                admitted.set_result(await self._admit(tenant, reserve, reserve_of))
        streaming = False
        try:
            user = body.get("user")
            with tracing.stage("model_resolution", **{"banyan.model": request.model}):
                resolved = await resolve_model(self.state, tenant, request.model,
                                               user=user if isinstance(user, str) else None)
            body["model"] = resolved.engine
            body["cache_salt"] = cache_salt(tenant)
            options = request.stream_options
            call = _Call(tenant=tenant, surface=request.surface, body=body, resolved=resolved, admitted=admitted,
                         started=started, usage_shown=bool(options and options.include_usage),
                         continuous_usage_shown=bool(options and options.include_usage
                                                     and options.continuous_usage_stats))
            if rag is not None:
                tokens = self.state.bases[resolved.base].tokens
                prompt_tokens = sizes[0] if tokens is counted else (
                    await asyncio.to_thread(prompt_sizes, request, body, tokens))[0]
                with tracing.stage("retrieval"):
                    call.sources = await self._ground(call, rag, prompt_tokens=prompt_tokens,
                                                      output_tokens=request.output_tokens(), tokens=tokens)
            response = await self._send(call, stream=bool(request.stream), disconnected=disconnected)
            streaming = isinstance(response, _RelayResponse)  # the stream gives the slot back when it ends
            response.headers.update(call.admission.headers())
            return response
        except BanyanError as e:  # an admitted request's error says where its limits stand too
            admission = await asyncio.shield(admitted)  # a refusal, decided now, is the answer instead
            e.headers = {**admission.headers(), **(e.headers or {})}
            raise
        finally:
            if not streaming and not _released(admitted):  # an answer's usage record has released it already
                await _finish_whatever_happens(_release_once_decided(admitted))

    async def _admit(self, tenant: str, reserve: int | None, reserve_of: Callable[[], Awaitable[int]]) -> Admission:
        """The tenant's admission, its room noted for ``engine_first``. ``reserve``: None when the request was
        not counted (``reserve_of`` counts it if the tenant turns out to have a tpm)."""
        quotas = self.state.quotas
        try:
            try:
                admission = await quotas.admit(tenant, reserve_tokens=reserve)
            except CountNeeded:
                admission = await quotas.admit(tenant, reserve_tokens=await reserve_of())
        except BaseException:  # refused, or Redis unreachable: the next requests wait for their admission
            self.state.headroom.refused(tenant)
            raise
        self.state.headroom.note(tenant, admission)
        return admission

    async def _ground(self, call: _Call, rag: RagOptions, *, prompt_tokens: int, output_tokens: int | None,
                      tokens: TokenCounter) -> list[dict[str, Any]]:
        """Put the context retrieved for the request in front of the model (in ``call.body``), budgeted in the
        serving base model's ``tokens``; its passages are the ``sources``."""
        grounder, settings = call.surface.grounder, self.state.settings
        query = grounder.query(call.body)
        room = settings.max_model_len - (output_tokens or settings.rag_output_reserve_tokens) - prompt_tokens
        context = await self.state.documents.context_for(
            call.tenant, query, budget_tokens=max(0, min(settings.rag_max_context_tokens, room)), top_k=rag.top_k,
            collection=rag.collection, tokens=None if tokens is self.state.tokens else tokens)
        if context.text:
            grounder.apply(call.body, context.text)
        return [p.source() for p in context.passages]

    async def _send(self, call: _Call, *, stream: bool, disconnected: Disconnected | None) -> Response:
        """Call a replica: the JSON response, or the relay of its stream (which then owns the replica lease,
        the engine response and the admission until it ends)."""
        if stream:  # usage is always asked of the engine, on every event (for accounting)
            call.body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        metrics = self.state.metrics
        held = AsyncExitStack()
        metrics.inflight.inc()
        held.callback(metrics.inflight.dec)
        try:
            with self.state.tracing.stage("engine_call", **{"banyan.stream": stream}):
                if stream:  # until the engine's headers; the relay is the `stream` span
                    upstream = await _once_admitted(call, self._open_or_fall_back(call, held), metrics)
                else:  # the engine answers a JSON request when it is done: the client may leave before the headers
                    content = await _unless_left(_once_admitted(call, self._fetch(call, held), metrics), disconnected)
        except BaseException:
            await _finish_whatever_happens(held.aclose())
            raise
        if not stream:
            await _finish_whatever_happens(held.aclose())  # closing an unread engine response ends its work
            if content is None:
                metrics.client_disconnects.labels("json").inc()
                (await asyncio.shield(call.admitted)).keep_reservation()
                annotate(client_left=True)
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return await self._render_json(call, content)
        held.push_async_callback(call.admission.release)
        relay = _Relay(self, call, upstream, held)
        return _RelayResponse(relay, headers={**_SSE_HEADERS, **call.resolved.headers()})

    async def _fetch(self, call: _Call, held: AsyncExitStack) -> bytes:
        upstream = await self._open_or_fall_back(call, held)
        try:
            return await upstream.aread()
        except httpx.HTTPError as e:
            self.state.metrics.engine_errors.labels("unavailable").inc()
            raise translate_transport_error(e) from e

    async def _open_or_fall_back(self, call: _Call, held: AsyncExitStack) -> EngineResponse:
        """:meth:`_open`; when the adapter cannot be loaded and the tenant chose ``fallback_to_base``, the base
        model's response instead (``call.resolved`` then says so). The tenant is read only then."""
        try:
            return await self._open(call, held)
        except _AdapterUnloadable as failed:
            tenant = await self.state.tenants.get(call.tenant)
            if tenant is None or not tenant.fallback_to_base:
                raise failed.error from None
            adapter = call.resolved.adapter
            call.resolved = call.resolved.on_base()
            call.body["model"] = call.resolved.engine
            # A refusal the base model repeats was the request's own fault: its error goes out, not the adapter's.
            response = await self._open(call, held)
            self.state.metrics.adapter_fallbacks.labels(failed.reason).inc()
            annotate(fallback="base", fallback_reason=failed.reason)
            log.warning("adapter could not be loaded (%s): served by the base model", failed.reason,
                        extra={"adapter": adapter.name if adapter else None,
                               "version": adapter.version if adapter else None})
            return response

    async def _open(self, call: _Call, held: AsyncExitStack) -> EngineResponse:
        """The engine's 200 response, its body not read yet; ``held`` then holds it and its replica's lease.

        A replica may drop an adapter's name (an unload by another gateway replica, or its own disk cache)
        between accepting a request and starting it: an adapter 404 is asked again once, and the replica
        loads the adapter anew. An adapter the engine still cannot find, or refuses (400), is
        :class:`_AdapterUnloadable`."""
        metrics, resolved = self.state.metrics, call.resolved
        for attempt in range(1, _ATTEMPTS + 1):
            lease = AsyncExitStack()
            handed_over = False
            try:
                replica = await lease.enter_async_context(self.state.bases[resolved.base].engines.lease(
                    resolved.engine, is_adapter=resolved.adapter is not None))
                try:
                    response = await replica.caller.open(call.surface.path, call.body,
                                                         headers=self.state.tracing.engine_headers())
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
            error = _upstream_error(response.status_code, content, resolved)
            if resolved.adapter is not None and response.status_code in _ADAPTER_LOAD_FAILURES:
                raise _AdapterUnloadable(error, reason=_ADAPTER_LOAD_FAILURES[response.status_code])
            raise error
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _render_json(self, call: _Call, content: bytes) -> Response:
        payload = json_or_none(content)
        if not isinstance(payload, dict):
            self.state.metrics.engine_errors.labels("unavailable").inc()
            raise EngineUnavailable("The engine sent an unreadable response.")
        payload["model"] = call.resolved.public
        if call.sources is not None:
            payload["sources"] = call.sources
        await _finish_whatever_happens(self._record(call, payload.get("usage") or {}))
        return JSONResponse(payload, headers=call.resolved.headers())

    async def _record(self, call: _Call, usage: dict[str, Any]) -> None:
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.state.metrics.tokens.labels("prompt").inc(prompt)
        self.state.metrics.tokens.labels("completion").inc(completion)
        annotate(prompt_tokens=prompt, completion_tokens=completion)
        call.admission.spend(prompt + completion)  # charged to the tpm window and the budgets on release
        user = call.body.get("user")  # checked to be a short string (or absent) before admission
        record = functools.partial(self.state.usage.record, call.tenant, model=call.resolved.served,
                                   prompt_tokens=prompt, completion_tokens=completion,
                                   user=user if isinstance(user, str) and user else None,
                                   record_id=once_id())  # every try of this record counts once
        # The usage write and the admission's release (which charges what was spent: it is known now) are two
        # independent round trips: sent together, the request waits for one. Release is idempotent, so the
        # `finally` that releases on every other path stays as it is.
        recorded, released = await asyncio.gather(record(), call.admission.release(), return_exceptions=True)
        if isinstance(recorded, RedisError):  # the answer is served: keep trying in the background, never fail it
            log.warning("recording usage failed (%s): retrying in the background", type(recorded).__name__)
            _keep(asyncio.ensure_future(_record_later(record)))
        for outcome in (recorded, released):
            if isinstance(outcome, BaseException) and not isinstance(outcome, RedisError):
                raise outcome


async def _once_admitted(call: _Call, work: Coroutine[Any, Any, _T], metrics: Metrics) -> _T:
    """What ``work`` (the engine call) returns, once the request is admitted: with an admission still being decided,
    ``work`` runs meanwhile, and a refusal cancels it (closing the engine connection: the engine drops the request)
    and is raised."""
    admitted = call.admitted
    if admitted.done():
        admitted.result()  # a refusal is raised here
        return await work
    engine = asyncio.ensure_future(work)
    try:
        await asyncio.shield(admitted)
    except BaseException as e:
        if isinstance(e, RateLimited):
            metrics.engine_first.labels("refused").inc()
        engine.cancel()
        await asyncio.wait({engine})
        if not engine.cancelled():
            engine.exception()  # retrieved: the refusal (or the cancellation) is what is raised
        raise
    metrics.engine_first.labels("granted").inc()
    return await engine


def _released(admitted: asyncio.Future[Admission]) -> bool:
    """Whether the admission was granted and released already (nothing to do: no task to start for it)."""
    return admitted.done() and not admitted.cancelled() and admitted.exception() is None and admitted.result().released


async def _release_once_decided(admitted: asyncio.Future[Admission]) -> None:
    """Release the admission once it is decided (a refusal holds nothing)."""
    try:
        admission = await admitted
    except Exception:
        return
    await admission.release()


async def _unless_left(work: Coroutine[Any, Any, bytes], disconnected: Disconnected | None) -> bytes | None:
    """What ``work`` returns, or None if the client left first (``work`` is then cancelled: an engine call cut
    short closes its connection, and the engine drops the request). ``work`` runs in the caller's task, which the
    client's leaving cancels (as ``asyncio.timeout`` does: told apart from any other cancellation by
    ``uncancel``); only the watcher of the client is a task."""
    if disconnected is None:
        return await work
    me = asyncio.current_task()
    assert me is not None
    waiting, left = True, False

    def leave(gone: asyncio.Future[None]) -> None:
        nonlocal left
        if gone.cancelled() or not waiting:
            return
        gone.exception()  # a receive that failed: the client is gone too
        left = True
        me.cancel()

    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(leave)
    try:
        content = await work
    except asyncio.CancelledError:
        if left and me.uncancel() == 0:
            return None
        raise
    finally:
        waiting = False
        watcher.cancel()
    if left:  # the work swallowed the cancellation
        me.uncancel()
        return None
    return content


class _Relay:
    """The stream of one request, from the engine to the client: :meth:`pump` relays, :meth:`finish` (once,
    however the stream ended) closes the engine response, records the usage and releases what is held."""

    def __init__(self, service: CompletionService, call: _Call, upstream: EngineResponse,
                 held: AsyncExitStack) -> None:
        self._service = service
        self._call = call
        self._upstream = upstream
        self._held = held
        self._rewriter = _EventRewriter(call.resolved, sources=call.sources, show_usage=call.usage_shown,
                                        show_continuous_usage=call.continuous_usage_shown,
                                        choices_per_prompt=int(call.body.get("n") or 1))
        self._ended = False
        self._finished = False
        self._cutting = False
        self._pump: asyncio.Task[Any] | None = None
        self._span = service.state.tracing.start("stream")

    async def pump(self, send: Send, start: Message) -> None:
        """The response on ``send``: ``start``, the engine's events as they arrive (each read rewritten and written
        at once), an error event if the engine's stream breaks or the drain cuts it, then the end.

        The stream is settled (:meth:`finish`: its usage recorded, its admission and replica released) before the
        client sees its end (``data: [DONE]``, held back until then, and the last bytes): a client that asks for
        its usage, or sends its next request under a concurrency cap, right after a stream finds it counted and
        released."""
        self._pump = asyncio.current_task()
        await send(start)
        forget = self._service.state.drain.on_cut(self._cut)
        try:
            tail = await self._relay_events(send)
        finally:
            forget()  # from here on, a cut has nothing to interrupt
        self._ended = True
        await _finish_whatever_happens(self.finish())
        if tail:
            await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_events(self, send: Send) -> bytes:
        """Relay until the engine's stream ends; what is left to send (``[DONE]`` and whatever follows it, the
        rewriter's tail, or an error event)."""
        call, rewriter = self._call, self._rewriter
        metrics = self._service.state.metrics
        next_chunk = self._upstream.aiter_raw().__anext__
        first = True
        held = b""
        try:
            while True:
                try:
                    chunk = await next_chunk()
                except StopAsyncIteration:
                    return held + rewriter.flush()
                out = rewriter.feed(chunk)
                if held:  # after `[DONE]`: everything waits until the stream is settled
                    held, out = held + out, b""
                elif (done_at := out.find(_DONE)) >= 0:  # the end waits until the stream is settled
                    held, out = out[done_at:], out[:done_at]
                if out:
                    if first:
                        ttft = time.perf_counter() - call.started
                        metrics.ttft_seconds.labels(call.surface.label).observe(ttft)
                        annotate(ttft_ms=round(ttft * 1000, 2))
                        first = False
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except httpx.HTTPError as e:
            if held:  # the engine's stream was complete: its closing broke
                return held
            metrics.engine_errors.labels("stream_broken").inc()
            log.warning("engine stream broke: %s", type(e).__name__)
            return sse_error_event(EngineUnavailable("The engine stream was interrupted."))
        except asyncio.CancelledError:
            if not self._cutting or self._pump is None:
                raise
            self._pump.uncancel()  # the gateway is shutting down and its drain time is up
            return held or sse_error_event(ServiceUnavailable("The gateway is shutting down; send the request again."))

    def _cut(self) -> None:
        self._cutting = True
        if self._pump is not None:
            self._pump.cancel()

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            await self._upstream.aclose()  # first: a client that left stops the engine's work on its request
            if not self._ended:
                self._service.state.metrics.client_disconnects.labels("stream").inc()
                annotate(client_left=True)
            await self._service._record(self._call, self._rewriter.usage() or {})
        finally:
            try:
                await self._held.aclose()
            finally:
                if self._span is not None:
                    self._span.set_attribute("banyan.client_left", not self._ended)
                    self._span.end()


class _RelayResponse(Response):
    """A stream relayed straight onto the ASGI ``send`` (no body iterator in between), whose relay is finished
    however the response ends: relayed to the end, the client gone (its ``http.disconnect`` ends the relay), the
    response's task cancelled, or its ``send`` failing."""

    media_type = "text/event-stream"

    def __init__(self, relay: _Relay, *, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)  # no body: no content-length
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        pump = asyncio.ensure_future(self._relay.pump(send, start))
        gone = asyncio.ensure_future(client_disconnected(receive)())
        try:
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                task.cancel()
            await _finish_whatever_happens(self._close(pump, gone))
        if not pump.cancelled() and (error := pump.exception()) is not None:
            raise error

    async def _close(self, *tasks: asyncio.Task[None]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._relay.finish()


_CHOICE_INDEX = re.compile(rb'"choices":\[\{"index":(\d+)')
_DONE = b"data: [DONE]"
_USAGE = b'"usage":{'


def _object_end(data: bytes, start: int) -> int:
    """The end (exclusive) of the JSON object opening at ``data[start]``, for an object of numbers, nulls and
    objects (a usage object: no strings, so no brace inside a string); -1 if it does not close."""
    depth, at = 0, start
    while True:
        opening, closing = data.find(b"{", at), data.find(b"}", at)
        if closing < 0:
            return -1
        if 0 <= opening < closing:
            depth, at = depth + 1, opening + 1
            continue
        depth, at = depth - 1, closing + 1
        if depth == 0:
            return at


def _usage_of(raw: bytes) -> dict[str, Any]:
    parsed = json_or_none(raw)
    return parsed if isinstance(parsed, dict) else {}


@dataclass
class _UsageMeter:
    """The usage of a stream so far, from the engine's continuous usage stats: per choice, the usage object of its
    latest event, kept as bytes and parsed only when asked (choice ``i`` is of prompt ``i // n``); the final usage
    event, once seen, is the total."""

    choices_per_prompt: int = 1
    final: bytes | None = None
    latest: dict[int, bytes] = field(default_factory=dict)

    def total(self) -> dict[str, Any] | None:
        if self.final is not None:
            return _usage_of(self.final)
        if not self.latest:
            return None
        prompts: dict[int, int] = {}
        completion = 0
        for index, raw in self.latest.items():
            usage = _usage_of(raw)
            prompts[index // max(1, self.choices_per_prompt)] = int(usage.get("prompt_tokens") or 0)
            completion += int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion}


class _EventRewriter:
    """Rewrites the engine's complete SSE events for the client: the internal model name becomes the public
    one, an engine error event is re-rendered in the gateway's error shape, ``sources`` (when given) become
    the first key of the first data event, and the usage of every event is noted (and cut out of the event
    unless the client asked for it: the final usage event with ``include_usage``, the usage on every other
    event with ``continuous_usage_stats`` too)."""

    def __init__(self, resolved: ResolvedModel, *, sources: list[dict[str, Any]] | None = None,
                 show_usage: bool = True, show_continuous_usage: bool = True, choices_per_prompt: int = 1) -> None:
        self._resolved = resolved
        self._show_usage = show_usage
        self._show_continuous_usage = show_continuous_usage
        self._meter = _UsageMeter(choices_per_prompt=choices_per_prompt)
        if resolved.fallback:  # the base model's id may be a word the model writes: only the `model` field
            self._needle = b'"model":' + json.dumps(resolved.engine).encode()
            self._replacement = b'"model":' + json.dumps(resolved.public).encode()
        else:
            self._needle = json.dumps(resolved.engine).encode() if resolved.adapter else b""
            self._replacement = json.dumps(resolved.public).encode()
        self._buffer = b""
        self._sources = b'"sources": ' + json.dumps(sources).encode() if sources is not None else b""

    def usage(self) -> dict[str, Any] | None:
        """The usage of what the engine sent so far (None before any event that carried usage)."""
        return self._meter.total()

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
        """Note the usage an event carries; cut it out (or drop the final usage-only event) unless asked for.
        Nothing is parsed here: the usage object is found in the bytes (it is the one ``"usage":`` key whose value
        is an object: the same key inside a string would have its quotes escaped) and kept for :meth:`usage`."""
        if not event.startswith(b"data: {"):
            return event + b"\n\n"
        at = event.rfind(_USAGE)
        end = _object_end(event, at + len(_USAGE) - 1) if at >= 0 else -1
        if end < 0:
            return event + b"\n\n"
        usage = event[at + len(_USAGE) - 1:end]
        if b'"choices":[]' in event:  # the final usage event: the whole request's usage
            self._meter.final = usage
            return event + b"\n\n" if self._show_usage else b""
        self._meter.latest[_choice_index(event)] = usage
        if self._show_continuous_usage:
            return event + b"\n\n"
        if event[at - 1:at] == b",":
            at -= 1
        elif event[end:end + 1] == b",":
            end += 1
        return event[:at] + event[end:] + b"\n\n"

    def _render_error(self, event: bytes) -> bytes:
        if not event.startswith(b'data: {"error"'):
            return event + b"\n\n"
        parsed = json_or_none(event[len(b"data: "):])
        error = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        code = error.get("code")
        status = code if isinstance(code, int) else 500
        rendered = _upstream_error(status, json.dumps(parsed).encode(), self._resolved)
        return b"data: " + json.dumps(rendered.body()).encode() + b"\n\n"


def _choice_index(event: bytes) -> int:
    """The index of the one choice of a stream event (vLLM writes ``index`` first; else the event is parsed)."""
    match = _CHOICE_INDEX.search(event)
    if match:
        return int(match.group(1))
    parsed = json_or_none(event[len(b"data: "):])
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    index = first.get("index")
    return index if isinstance(index, int) else 0
