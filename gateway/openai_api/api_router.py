"""Routes of the OpenAI-compatible surface: parse, call the service, render."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.deps import StateDep, TenantDep
from gateway.openai_api.embeddings import create_embeddings
from gateway.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from gateway.openai_api.serving import CompletionService, client_disconnected, get_model, list_models

router = APIRouter(prefix="/v1", tags=["openai"])


def _body_bytes(http: Request) -> int | None:
    """The body's declared size (the middleware has held the body to it), if it declared one."""
    declared = http.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


@router.get("/models", response_model=ModelList)
async def models(state: StateDep, tenant: TenantDep) -> ModelList:
    return await list_models(state, tenant)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, state: StateDep, tenant: TenantDep) -> ModelCard:
    return await get_model(state, tenant, model_id)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request, state: StateDep, tenant: TenantDep) -> Response:
    return await CompletionService(state).handle(tenant=tenant, request=body,
                                                 disconnected=client_disconnected(http.receive),
                                                 body_bytes=_body_bytes(http))


@router.post("/completions")
async def completions(body: CompletionRequest, http: Request, state: StateDep, tenant: TenantDep) -> Response:
    return await CompletionService(state).handle(tenant=tenant, request=body,
                                                 disconnected=client_disconnected(http.receive),
                                                 body_bytes=_body_bytes(http))


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, state: StateDep, tenant: TenantDep) -> Response:
    return await create_embeddings(state, tenant=tenant, request=body)
