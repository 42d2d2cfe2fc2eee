"""Admin operations: tenants, keys and the adapter upload pipeline.

An upload goes: stage the files on local disk (archives extracted safely) -> validate hard against
the base model -> allocate a version -> publish it (:func:`adapters.layout.publish_version`: the files,
the manifest last, then the version recorded in Redis, the commit point). Any failure before the commit
removes what was written, so a rejected or failed upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.archive import extract_archive
from adapters.layout import delete_stored, publish_version, sweep_abandoned
from adapters.naming import AdapterRef, is_valid_id, new_uid
from adapters.registry import AdapterRecord, VersionMeta
from adapters.validation import check_file_set, validate_adapter_dir
from gateway.admin.protocol import AdapterOut, AdapterVersionOut, TenantOut
from gateway.errors import InvalidAdapter, InvalidRequest, NotFound
from gateway.state import AppState
from gateway.tenants import Tenant

log = logging.getLogger("banyan.admin")

_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class UploadedFile:
    filename: str
    file: BinaryIO


def tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut(**tenant.to_dict())


def version_out(name: str, meta: VersionMeta, *, active: int | None) -> AdapterVersionOut:
    return AdapterVersionOut(name=name, version=meta.version, active=meta.version == active, sha256=meta.sha256,
                             rank=meta.rank, alpha=meta.alpha, target_modules=meta.target_modules,
                             size_bytes=meta.size_bytes, created=meta.created)


def adapter_out(record: AdapterRecord) -> AdapterOut:
    versions = [version_out(record.name, record.versions[v], active=record.active) for v in sorted(record.versions)]
    return AdapterOut(name=record.name, active_version=record.active, versions=versions)


async def require_tenant(state: AppState, tenant_id: str) -> Tenant:
    tenant = await state.tenants.get(tenant_id) if is_valid_id(tenant_id) else None
    if tenant is None:
        raise NotFound(f"Tenant `{tenant_id}` does not exist.", param="tenant_id")
    return tenant


async def require_adapter(state: AppState, tenant_id: str, name: str) -> AdapterRecord:
    await require_tenant(state, tenant_id)
    record = await state.adapters.get(tenant_id, name) if is_valid_id(name) else None
    if record is None:
        raise NotFound(f"Adapter `{name}` does not exist.", param="name")
    return record


async def delete_adapter_everywhere(state: AppState, tenant_id: str, record: AdapterRecord) -> None:
    """Registry first (no new request can pick it), then the engines, then the files."""
    await state.adapters.delete(tenant_id, record.name)
    for meta in record.versions.values():
        await state.engines.unload(AdapterRef(tenant_id, record.name, meta.version, meta.uid).engine_name)
    await delete_stored(state.store, tenant_id, record.name)


async def delete_tenant(state: AppState, tenant_id: str) -> None:
    await require_tenant(state, tenant_id)
    await state.tenants.delete(tenant_id)  # keys are revoked first: nothing new can start
    await state.usage.delete(tenant_id)
    for record in await state.adapters.list_records(tenant_id):
        await delete_adapter_everywhere(state, tenant_id, record)
    await state.adapters.delete_tenant(tenant_id)
    await delete_stored(state.store, tenant_id)
    await state.documents.delete_tenant(tenant_id)


class AdapterUpload:
    """Stages, validates and stores one uploaded adapter version."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings = state.settings

    async def run(self, tenant_id: str, *, name: str, files: list[UploadedFile], archive: UploadedFile | None,
                  activate: bool) -> AdapterVersionOut:
        await require_tenant(self.state, tenant_id)
        if not is_valid_id(name):
            raise InvalidRequest("`name` must match ^[a-z0-9][a-z0-9-]{0,62}$.", param="name")
        if bool(files) == bool(archive):
            raise InvalidAdapter("Send the adapter either as `files` (adapter_config.json and "
                                 "adapter_model.safetensors) or as one `archive`, not both or neither.",
                                 param="files")
        if self.state.base_spec is None:
            raise InvalidRequest("This gateway has no base model configuration to check adapters against "
                                 "(set BANYAN_BASE_MODEL_CONFIG).")
        with tempfile.TemporaryDirectory(prefix="banyan-upload-") as tmp:
            folder = await asyncio.to_thread(self._stage, Path(tmp), files, archive)
            info = await asyncio.to_thread(validate_adapter_dir, folder, base=self.state.base_spec,
                                           max_rank=self.settings.max_lora_rank,
                                           max_bytes=self.settings.max_adapter_bytes)
            version = await self.state.adapters.allocate_version(tenant_id, name)
            meta = VersionMeta(version=version, uid=new_uid(), sha256=info.sha256, rank=info.rank,
                               alpha=info.alpha, target_modules=info.target_modules, size_bytes=info.size_bytes,
                               created=int(time.time()))
            ref = AdapterRef(tenant_id, name, version, meta.uid)
            await self._store(ref, folder, meta, activate=activate)
        self.state.metrics.adapter_uploads.labels("stored").inc()
        return version_out(name, meta, active=version if activate else None)

    def _stage(self, tmp: Path, files: list[UploadedFile], archive: UploadedFile | None) -> Path:
        if archive is not None:
            packed = tmp / "upload.archive"
            _copy(archive.file, packed)
            return extract_archive(packed, tmp / "extracted", filename=archive.filename,
                                   max_member_bytes=self.settings.max_adapter_bytes,
                                   max_total_bytes=self.settings.max_adapter_bytes)
        names = [Path(f.filename).name for f in files]
        if len(set(names)) != len(names):
            raise InvalidAdapter("The same file was sent twice.", param="files")
        check_file_set(names)
        folder = tmp / "files"
        folder.mkdir()
        for upload, filename in zip(files, names, strict=True):
            _copy(upload.file, folder / filename)
        return folder

    async def _store(self, ref: AdapterRef, folder: Path, meta: VersionMeta, *, activate: bool) -> None:
        try:
            await publish_version(self.state.store, self.state.adapters, ref=ref, folder=folder, meta=meta,
                                  activate=activate)
        except BaseException:
            self.state.metrics.adapter_uploads.labels("failed").inc()
            raise
        if activate and self.settings.prefetch_on_activate:
            self.state.engines.warm(ref.engine_name)


async def sweep_abandoned_uploads(state: AppState, *, older_than_s: float) -> int:
    """Remove the files of uploads that never got recorded (the process died mid-upload)."""
    removed = await sweep_abandoned(state.store, state.adapters, older_than_s=older_than_s)
    for ref in removed:
        log.warning("removed the files of an abandoned upload", extra={"tenant": ref.tenant, "adapter": ref.name,
                                                                      "version": ref.version})
    return len(removed)


async def activate_version(state: AppState, tenant_id: str, name: str, version: int) -> AdapterRecord:
    record = await require_adapter(state, tenant_id, name)
    if not await state.adapters.activate(tenant_id, name, version):
        raise NotFound(f"Adapter `{name}` has no version {version}.", param="version")
    meta = record.versions[version]
    if state.settings.prefetch_on_activate:
        state.engines.warm(AdapterRef(tenant_id, name, version, meta.uid).engine_name)
    return await require_adapter(state, tenant_id, name)


def _copy(source: BinaryIO, dest: Path) -> None:
    source.seek(0)
    with dest.open("wb") as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)
