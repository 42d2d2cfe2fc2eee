"""Routes of the documents surface (tenant key): parse, call the retrieval service, render.

Every call is scoped by the tenant of the key; another tenant's document answers exactly like a
missing one (404). Every call is admitted like a completion (:data:`AdmittedTenant`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

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
from gateway.tenants import live_guard

router = APIRouter(prefix="/v1", tags=["documents"])


async def _admitted(state: StateDep, tenant: TenantDep, response: Response) -> AsyncIterator[str]:
    """The caller's tenant, let in by its limits for as long as the route runs. A call counts as one request
    against ``rpm`` and holds a concurrency slot; it adds nothing to ``tpm`` or the budgets (embedding is not
    model tokens: a document's chunks count against the tenant's document quotas instead), and a spent budget
    does not refuse it (budgets are for generation), but a minute whose tokens are spent refuses it like any other
    request. The response carries the ``x-ratelimit-*`` headers."""
    admission = await state.quotas.admit(tenant, budgeted=False)
    response.headers.update(admission.headers())
    try:
        yield tenant
    finally:
        await admission.release()


AdmittedTenant = Annotated[str, Depends(_admitted, scope="function")]
"""The slot is given back when the route returns, before the response is sent (``scope="function"``)."""


@router.post("/documents", status_code=201)
async def create_document(body: DocumentCreate, state: StateDep, tenant: AdmittedTenant) -> DocumentOut:
    return DocumentOut.of(await state.documents.add(tenant, body.to_new(), guard=live_guard(tenant)))


@router.get("/documents")
async def list_documents(state: StateDep, tenant: AdmittedTenant, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                         after: str | None = None) -> DocumentList:
    records, has_more = await state.documents.list_documents(tenant, limit=limit, after=after)
    return DocumentList(data=[DocumentSummary.of(r) for r in records], has_more=has_more)


@router.get("/documents/{document_id}")
async def get_document(document_id: str, state: StateDep, tenant: AdmittedTenant) -> DocumentOut:
    return DocumentOut.of(await state.documents.get(tenant, document_id))


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, state: StateDep, tenant: AdmittedTenant) -> DocumentDeleted:
    await state.documents.delete(tenant, document_id)
    return DocumentDeleted(id=document_id)


@router.post("/retrieve")
async def retrieve(body: RetrieveRequest, state: StateDep, tenant: AdmittedTenant) -> PassageList:
    passages = await state.documents.retrieve(tenant, body.query, top_k=body.top_k, collection=body.collection)
    return PassageList(data=[PassageOut.of(p) for p in passages])
