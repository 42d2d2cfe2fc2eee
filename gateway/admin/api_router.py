"""Routes of the admin surface (admin key only): each parses, calls one service function, and sends what it
returns."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile as FormFile

from adapters.naming import ID_PATTERN
from gateway.admin import protocol as wire
from gateway.admin import service
from gateway.deps import AdminDep, StateDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/tenants", status_code=201)
async def create_tenant(body: wire.TenantCreate, state: StateDep) -> wire.TenantOut:
    return await service.create_tenant(state, body)


@router.get("/tenants")
async def list_tenants(state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                       after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None) -> wire.TenantListOut:
    return await service.list_tenants(state, limit=limit, after=after)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, state: StateDep) -> wire.TenantOut:
    return await service.get_tenant(state, tenant_id)


@router.patch("/tenants/{tenant_id}")
async def patch_tenant(tenant_id: str, body: wire.TenantPatch, state: StateDep) -> wire.TenantOut:
    return await service.update_tenant(state, tenant_id, body=body)


@router.delete("/tenants/{tenant_id}")
async def delete_tenant(tenant_id: str, state: StateDep) -> wire.Deleted:
    return await service.delete_tenant(state, tenant_id)


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, body: wire.KeyCreate, state: StateDep) -> wire.KeyCreated:
    return await service.create_key(state, tenant_id, body=body)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, state: StateDep) -> wire.ListOut[wire.KeyOut]:
    return await service.list_keys(state, tenant_id)


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, state: StateDep) -> wire.Deleted:
    return await service.revoke_key(state, tenant_id, key_id=key_id)


@router.post("/tenants/{tenant_id}/adapters", status_code=201)
async def upload_adapter(tenant_id: str, request: Request, state: StateDep) -> wire.AdapterUploadOut:
    """Multipart: the adapter's files or archive. JSON: an import from an S3 location. The content type decides."""
    if wire.is_json(request.headers.get("content-type")):
        body = wire.parse_body(wire.AdapterSourceIn, await request.body())
        return await service.import_adapter(state, tenant_id, body=body)
    async with request.form() as form:
        fields = wire.parse_body(wire.AdapterUploadForm, {k: v for k, v in form.multi_items() if isinstance(v, str)})
        uploaded = [service.UploadedFile(f.filename or "", f.file) for f in form.getlist("files")
                    if isinstance(f, FormFile)]
        archive = form.get("archive")
        packed = service.UploadedFile(archive.filename or "", archive.file) if isinstance(archive, FormFile) else None
        return await service.upload_adapter(state, tenant_id, name=fields.name, files=uploaded, archive=packed,
                                            activate=fields.activate, base_model=fields.base_model)


@router.post("/imports", status_code=202)
async def create_import(body: wire.ImportIn, state: StateDep) -> wire.ImportOut:
    return await service.create_import(state, body)


@router.get("/imports/{import_id}")
async def get_import(import_id: str, state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     after: Annotated[int, Query(ge=-1)] = -1,
                     status: Annotated[Literal["failed"] | None, Query()] = None) -> wire.ImportOut:
    return await service.get_import(state, import_id, after=after, limit=limit, failed_only=status == "failed")


@router.get("/tenants/{tenant_id}/adapters")
async def list_adapters(tenant_id: str, state: StateDep) -> wire.ListOut[wire.AdapterOut]:
    return await service.list_adapters(state, tenant_id)


@router.get("/tenants/{tenant_id}/adapters/{name}")
async def get_adapter(tenant_id: str, name: str, state: StateDep) -> wire.AdapterOut:
    return await service.get_adapter(state, tenant_id, name=name)


@router.post("/tenants/{tenant_id}/adapters/{name}/activate")
async def activate_adapter(tenant_id: str, name: str, body: wire.ActivateIn, state: StateDep) -> wire.AdapterOut:
    return await service.activate_version(state, tenant_id, name=name, version=body.version, canary=body.canary)


@router.delete("/tenants/{tenant_id}/adapters/{name}")
async def delete_adapter(tenant_id: str, name: str, state: StateDep) -> wire.Deleted:
    return await service.delete_adapter(state, tenant_id, name=name)


@router.get("/tenants/{tenant_id}/usage")
async def tenant_usage(tenant_id: str, state: StateDep, query: Annotated[wire.UsageQuery, Query()]
                       ) -> wire.UsageOut | wire.UsagePage[wire.UsageResultOut]:
    return await service.tenant_usage(state, tenant_id, query)


@router.get("/usage")
async def all_usage(state: StateDep, query: Annotated[wire.UsageQuery, Query()]
                    ) -> wire.UsagePage[wire.TenantUsageResultOut]:
    return await service.all_usage(state, query)
