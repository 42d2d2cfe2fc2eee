"""``POST /v1/embeddings``: the retrieval embedder (all-MiniLM-L6-v2) behind OpenAI's embeddings API, so that a
tenant embeds with the same model its documents are searched with.

The request is checked first (fields, ``model``, ``dimensions``, ``user``, the number and length of the inputs),
then its texts are counted with the embedder's own tokenizer, off the event loop: each must fit the embedder's
window (as OpenAI refuses an input over its model's context rather than cutting it), and their sum is the
request's ``prompt_tokens``. The request is then admitted like a completion (``rpm``, ``tpm`` with that sum
reserved, ``max_concurrency``, budgets; its ``x-ratelimit-*`` headers on the answer), embedded by the retrieval
service's embedding queue (the one model and thread, fair across tenants), rendered off the loop, and recorded as
usage against the embedder's id (with the request's ``user``).

A request whose texts fit in one embedding batch waits in the queue's query lane, like a ``rag`` query (an
interactive caller waiting on one batch); a larger one in the ingestion lane, taking turns with documents.
Vectors are L2-normalised float32, exactly what the document search computes for the same text; ``base64`` is
their little-endian float32 bytes, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
from redis.exceptions import RedisError
from starlette.responses import Response

from gateway.errors import BanyanError, InvalidRequest, ModelNotFound
from gateway.logs import annotate
from gateway.openai_api.protocol import EmbeddingRequest
from gateway.openai_api.serving import _finish_whatever_happens, _keep, _record_later
from gateway.redis_batch import once_id
from gateway.settings import Settings
from gateway.state import AppState

log = logging.getLogger("banyan.embeddings")


def checked_texts(request: EmbeddingRequest, *, settings: Settings, dimension: int) -> list[str]:
    """The request's texts, once every field is one the gateway serves (:class:`InvalidRequest` or
    :class:`ModelNotFound` otherwise)."""
    field = request.unrecognized()
    if field is not None:
        raise InvalidRequest(f"Unrecognized request argument supplied: `{field}`.", param=field)
    if request.model is not None and request.model != settings.embedding_model:
        raise ModelNotFound(f"The model `{request.model}` does not exist or you do not have access to it; "
                            f"embeddings are made with `{settings.embedding_model}`.", param="model")
    if request.dimensions is not None and request.dimensions != dimension:
        raise InvalidRequest(f"`{settings.embedding_model}` makes {dimension} dimensions; `dimensions` may only be "
                             f"{dimension}.", param="dimensions")
    if request.user is not None and len(request.user) > settings.max_user_chars:
        raise InvalidRequest(f"user must be a string of at most {settings.max_user_chars} characters.", param="user")
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not texts:
        raise InvalidRequest("`input` must be a string or a non-empty list of strings.", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("`input` as token ids is not supported: send the text.", param="input")
    if len(texts) > settings.max_embedding_inputs:
        raise InvalidRequest(f"At most {settings.max_embedding_inputs} inputs per request; got {len(texts)}.",
                             param="input")
    strings = [t for t in texts if isinstance(t, str)]
    for index, text in enumerate(strings):
        if not text:
            raise InvalidRequest(f"`input[{index}]` is empty.", param="input")
        if len(text) > settings.max_embedding_input_chars:
            raise InvalidRequest(f"`input[{index}]` has {len(text)} characters; the limit is "
                                 f"{settings.max_embedding_input_chars}.", param="input")
    return strings


def check_window(counts: list[int], *, window: int, model: str) -> None:
    """Each text must fit what the embedder reads (it would silently drop the rest)."""
    for index, count in enumerate(counts):
        if count > window:
            raise InvalidRequest(f"`input[{index}]` is {count} tokens; `{model}` reads at most {window} tokens "
                                 "(split the text).", param="input")


def render(vectors: np.ndarray, *, encoding_format: str, model: str, prompt_tokens: int) -> bytes:
    """The response body (OpenAI's shape). CPU work for a large request: call it off the event loop."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        embeddings: list[object] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        embeddings = rows.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                      separators=(",", ":")).encode()


async def create_embeddings(state: AppState, *, tenant: str, request: EmbeddingRequest) -> Response:
    settings, documents, tracing = state.settings, state.documents, state.tracing
    embedder = documents.embedder
    texts = checked_texts(request, settings=settings, dimension=embedder.dimension)
    counts = await asyncio.to_thread(embedder.count_tokens, texts)
    check_window(counts, window=embedder.max_tokens, model=settings.embedding_model)
    tokens = sum(counts)
    with tracing.stage("admission"):
        admission = await state.quotas.admit(tenant, reserve_tokens=tokens)
    try:
        with tracing.stage("embedding", inputs=len(texts)):
            vectors = await documents.embed(texts, tenant=tenant, query=len(texts) <= settings.embedding_batch_size)
        body = await asyncio.to_thread(render, vectors, encoding_format=request.encoding_format,
                                       model=settings.embedding_model, prompt_tokens=tokens)
        admission.spend(tokens)  # charged to the tpm window and the budgets on release
        await _finish_whatever_happens(_record(state, tenant=tenant, tokens=tokens, user=request.user))
    except BanyanError as e:
        e.headers = {**admission.headers(), **(e.headers or {})}
        raise
    finally:
        await _finish_whatever_happens(admission.release())
    annotate(prompt_tokens=tokens, inputs=len(texts))
    return Response(body, media_type="application/json", headers=admission.headers())


async def _record(state: AppState, *, tenant: str, tokens: int, user: str | None) -> None:
    record_id = once_id()  # every try of this record counts once

    async def record() -> None:
        await state.usage.record(tenant, model=state.settings.embedding_model, prompt_tokens=tokens,
                                 completion_tokens=0, user=user, record_id=record_id)

    try:
        await record()
    except RedisError as e:  # the vectors are made: keep trying in the background, never fail the answer
        log.warning("recording usage failed (%s): retrying in the background", type(e).__name__)
        _keep(asyncio.ensure_future(_record_later(record)))
