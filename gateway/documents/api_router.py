"""Routes of the documents surface (tenant key): parse, call the retrieval service, render.

Every call is scoped by the tenant of the key; another tenant's document answers exactly like a
missing one (404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gateway.deps import StateDep, TenantDep
from gateway.documents.protocol import (
    DocumentCreate,
    DocumentDeleted,
    DocumentList,
    DocumentOut,
    DocumentSummary,
    PassageList,
    PassageOut,
    RetrieveRequest,
)

router = APIRouter(prefix="/v1", tags=["documents"])


@router.post("/documents", status_code=201)
async def create_document(body: DocumentCreate, state: StateDep, tenant: TenantDep) -> DocumentOut:
    return DocumentOut.of(await state.documents.add(tenant, body.to_new()))


@router.get("/documents")
async def list_documents(state: StateDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                         after: str | None = None) -> DocumentList:
    records, has_more = await state.documents.list_documents(tenant, limit=limit, after=after)
    return DocumentList(data=[DocumentSummary.of(r) for r in records], has_more=has_more)


@router.get("/documents/{document_id}")
async def get_document(document_id: str, state: StateDep, tenant: TenantDep) -> DocumentOut:
    return DocumentOut.of(await state.documents.get(tenant, document_id))


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, state: StateDep, tenant: TenantDep) -> DocumentDeleted:
    await state.documents.delete(tenant, document_id)
    return DocumentDeleted(id=document_id)


@router.post("/retrieve")
async def retrieve(body: RetrieveRequest, state: StateDep, tenant: TenantDep) -> PassageList:
    passages = await state.documents.retrieve(tenant, body.query, top_k=body.top_k, collection=body.collection)
    return PassageList(data=[PassageOut.of(p) for p in passages])
