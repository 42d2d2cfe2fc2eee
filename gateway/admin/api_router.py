"""Routes of the admin surface (admin key only): parse, call the service, render."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from gateway.admin import service
from gateway.admin.protocol import (
    ActivateIn,
    AdapterOut,
    AdapterVersionOut,
    Deleted,
    KeyCreate,
    KeyCreated,
    KeyOut,
    ListOut,
    TenantCreate,
    TenantOut,
    TenantPatch,
    UsageCounts,
    UsageOut,
)
from gateway.deps import AdminDep, StateDep
from gateway.errors import Conflict, NotFound

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, state: StateDep) -> TenantOut:
    tenant = await state.tenants.create(body.id, name=body.name or body.id,
                                        limits=body.model_dump(include={"rpm", "tpm", "max_concurrency"}))
    if tenant is None:
        raise Conflict(f"Tenant `{body.id}` already exists.", param="id")
    return service.tenant_out(tenant)


@router.get("/tenants")
async def list_tenants(state: StateDep) -> ListOut[TenantOut]:
    return ListOut(data=[service.tenant_out(t) for t in await state.tenants.list_tenants()])


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, state: StateDep) -> TenantOut:
    return service.tenant_out(await service.require_tenant(state, tenant_id))


@router.patch("/tenants/{tenant_id}")
async def patch_tenant(tenant_id: str, body: TenantPatch, state: StateDep) -> TenantOut:
    await service.require_tenant(state, tenant_id)
    tenant = await state.tenants.update(tenant_id, body.model_dump(exclude_unset=True))
    if tenant is None:
        raise NotFound(f"Tenant `{tenant_id}` does not exist.", param="tenant_id")
    return service.tenant_out(tenant)


@router.delete("/tenants/{tenant_id}")
async def delete_tenant(tenant_id: str, state: StateDep) -> Deleted:
    await service.delete_tenant(state, tenant_id)
    return Deleted(id=tenant_id, object="tenant")


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, body: KeyCreate, state: StateDep) -> KeyCreated:
    await service.require_tenant(state, tenant_id)
    info, secret = await state.tenants.create_key(tenant_id, name=body.name)
    return KeyCreated(key_id=info.key_id, name=info.name, created=info.created, prefix=info.prefix, key=secret)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, state: StateDep) -> ListOut[KeyOut]:
    await service.require_tenant(state, tenant_id)
    keys = await state.tenants.list_keys(tenant_id)
    return ListOut(data=[KeyOut(key_id=k.key_id, name=k.name, created=k.created, prefix=k.prefix) for k in keys])


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, state: StateDep) -> Deleted:
    await service.require_tenant(state, tenant_id)
    if not await state.tenants.revoke_key(tenant_id, key_id):
        raise NotFound(f"Key `{key_id}` does not exist.", param="key_id")
    return Deleted(id=key_id, object="api_key")


@router.post("/tenants/{tenant_id}/adapters", status_code=201)
async def upload_adapter(
    tenant_id: str,
    state: StateDep,
    name: Annotated[str, Form()],
    files: Annotated[list[UploadFile] | None, File()] = None,
    archive: Annotated[UploadFile | None, File()] = None,
    activate: Annotated[bool, Form()] = True,
) -> AdapterVersionOut:
    uploaded = [service.UploadedFile(f.filename or "", f.file) for f in files or []]
    packed = service.UploadedFile(archive.filename or "", archive.file) if archive else None
    return await service.AdapterUpload(state).run(tenant_id, name=name, files=uploaded, archive=packed,
                                                  activate=activate)


@router.get("/tenants/{tenant_id}/adapters")
async def list_adapters(tenant_id: str, state: StateDep) -> ListOut[AdapterOut]:
    await service.require_tenant(state, tenant_id)
    return ListOut(data=[service.adapter_out(r) for r in await state.adapters.list_records(tenant_id)])


@router.get("/tenants/{tenant_id}/adapters/{name}")
async def get_adapter(tenant_id: str, name: str, state: StateDep) -> AdapterOut:
    return service.adapter_out(await service.require_adapter(state, tenant_id, name))


@router.post("/tenants/{tenant_id}/adapters/{name}/activate")
async def activate_adapter(tenant_id: str, name: str, body: ActivateIn, state: StateDep) -> AdapterOut:
    return service.adapter_out(await service.activate_version(state, tenant_id, name, body.version))


@router.delete("/tenants/{tenant_id}/adapters/{name}")
async def delete_adapter(tenant_id: str, name: str, state: StateDep) -> Deleted:
    record = await service.require_adapter(state, tenant_id, name)
    await service.delete_adapter_everywhere(state, tenant_id, record)
    return Deleted(id=name, object="adapter")


@router.get("/tenants/{tenant_id}/usage")
async def tenant_usage(tenant_id: str, state: StateDep) -> UsageOut:
    await service.require_tenant(state, tenant_id)
    usage = await state.usage.get(tenant_id)
    return UsageOut(tenant=tenant_id, total=UsageCounts(**usage.total.to_dict()),
                    models={m: UsageCounts(**c.to_dict()) for m, c in usage.models.items()})
