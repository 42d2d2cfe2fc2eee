"""Admin operations, one function per admin route: tenants, their keys, usage and adapters.

Each takes the app state and what its route parsed, raises the gateway's errors, and returns the wire
model the route sends. Records become wire models in one way only: the ``_*_out`` functions at the end,
field by field.

An upload goes: stage the files on local disk (archives extracted safely, known side files of a PEFT or trainer
output folder skipped) -> validate hard against the base model -> allocate a version -> publish it
(:func:`adapters.layout.publish_version`: the files, the manifest last, then the version recorded in Redis, the
commit point). Any failure before the commit removes what was written, so a rejected or failed upload leaves
nothing behind. An import stages the files from an S3 location instead (:class:`adapters.store.S3Source`), then
goes the same way; a bulk import runs many of those in the background (:mod:`adapters.imports`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.archive import extract_archive
from adapters.basemodel import BaseModelSpec
from adapters.errors import AdapterTooLargeError, InvalidAdapterError
from adapters.imports import ImportItem, ImportRecord, ImportRunner, ItemDone, ItemFailed, LeaseLost
from adapters.layout import (
    ADAPTER_FILES,
    CommitRefused,
    delete_stored,
    delete_version,
    publish_version,
    sweep_abandoned,
)
from adapters.naming import AdapterRef, is_valid_id, new_uid
from adapters.registry import AdapterRecord, Split, UnknownVersion, VersionMeta
from adapters.store import S3Source, SourceCredentials, SourceError, s3_config
from adapters.validation import AdapterInfo, sort_files, validate_adapter_dir
from gateway.admin import usage as usage_pages
from gateway.admin.protocol import (
    AdapterOut,
    AdapterSourceIn,
    AdapterUploadOut,
    AdapterVersionOut,
    BudgetOut,
    BudgetPeriodOut,
    CanaryIn,
    CanaryOut,
    Deleted,
    ImportCounts,
    ImportIn,
    ImportItemOut,
    ImportOut,
    KeyCreate,
    KeyCreated,
    KeyOut,
    ListOut,
    SourceCredentialsIn,
    TenantCreate,
    TenantListOut,
    TenantOut,
    TenantPatch,
    TenantUsageResultOut,
    UsageCounts,
    UsageOut,
    UsagePage,
    UsageQuery,
    UsageResultOut,
)
from gateway.errors import (
    BanyanError,
    Conflict,
    DependencyUnavailable,
    InvalidAdapter,
    InvalidRequest,
    NotFound,
    translate,
)
from gateway.fine_tuning.service import delete_tenant_data
from gateway.quotas import Spent
from gateway.settings import Settings
from gateway.state import AppState, ServedBase
from gateway.tenants import KeyInfo, Tenant
from gateway.usage import Counts

log = logging.getLogger("banyan.admin")

_COPY_CHUNK = 1024 * 1024
_MAX_SOURCE_OBJECTS = 1000
"""Most objects an import source may hold: a source is one adapter's folder (side files included)."""
_IMPORT_ID = re.compile(r"^imp_[0-9a-f]{24}$")

Note = Callable[[AdapterRef], Awaitable[None]]
"""Told the reference of a version about to be published (a bulk import records it: nothing is imported twice)."""


@dataclass(frozen=True, slots=True)
class UploadedFile:
    filename: str
    file: BinaryIO


@dataclass(frozen=True, slots=True)
class _Staged:
    folder: Path
    ignored: list[str]


# -- tenants -----------------------------------------------------------------------------------------


async def create_tenant(state: AppState, body: TenantCreate) -> TenantOut:
    tenant = await state.tenants.create(body.id, name=body.name or body.id,
                                        limits=body.model_dump(include={"rpm", "tpm", "max_concurrency",
                                                                        "daily_token_budget", "monthly_token_budget"}),
                                        fallback_to_base=body.fallback_to_base)
    if tenant is None:
        existing = await state.tenants.get(body.id)
        if existing is not None and existing.deleting:
            raise Conflict(f"Tenant `{body.id}` is still being deleted: repeat DELETE /admin/tenants/{body.id} "
                           "to finish it, then create it again.", param="id")
        raise Conflict(f"Tenant `{body.id}` already exists.", param="id")
    return (await _tenants_out(state, [tenant]))[0]


async def list_tenants(state: AppState, *, limit: int, after: str | None = None) -> TenantListOut:
    tenants, more = await state.tenants.list_tenants(limit=limit, after=after)
    return TenantListOut(data=await _tenants_out(state, tenants), has_more=more,
                         first_id=tenants[0].id if tenants else None, last_id=tenants[-1].id if tenants else None)


async def get_tenant(state: AppState, tenant_id: str) -> TenantOut:
    return (await _tenants_out(state, [await _require_tenant(state, tenant_id, live=False)]))[0]


async def update_tenant(state: AppState, tenant_id: str, *, body: TenantPatch) -> TenantOut:
    if not is_valid_id(tenant_id):
        raise _no_tenant(tenant_id)
    tenant = await state.tenants.update(tenant_id, body.model_dump(exclude_unset=True))  # None: not live
    if tenant is None:
        await _require_tenant(state, tenant_id)  # which of the two
        raise _being_deleted(tenant_id)
    return (await _tenants_out(state, [tenant]))[0]


async def delete_tenant(state: AppState, tenant_id: str) -> Deleted:
    """Tombstone first (keys revoked; no re-creation, key, upload, document, file or job for the tenant from then
    on), then every cleanup step, each of which can run again, then the record. Any failure leaves the tombstone:
    repeating the DELETE continues where it stopped."""
    if not is_valid_id(tenant_id) or await state.tenants.begin_delete(tenant_id) is None:
        raise _no_tenant(tenant_id)
    await state.usage.delete(tenant_id)
    await state.quotas.forget(tenant_id)  # its windows and budget counters (they would expire by themselves)
    await delete_tenant_data(state, tenant_id)  # fine-tuning jobs (a running one stops) and training files
    for record in await state.adapters.list_records(tenant_id):
        await _delete_adapter_everywhere(state, tenant_id, record.name)
    await state.adapters.delete_tenant(tenant_id)
    await delete_stored(state.store, tenant_id)
    await state.documents.delete_tenant(tenant_id)
    await state.tenants.finish_delete(tenant_id)
    return Deleted(id=tenant_id, object="tenant")


async def tenant_usage(state: AppState, tenant_id: str,
                       query: UsageQuery | None = None) -> UsageOut | UsagePage[UsageResultOut]:
    """The tenant's totals; with ``bucket_width``, a page of its usage over time (:mod:`gateway.admin.usage`)."""
    asked = query if query is not None and query.model_fields_set else None
    page = usage_pages.window(asked, now=time.time()) if asked is not None else None
    await _require_tenant(state, tenant_id)
    if page is not None:
        return await usage_pages.tenant_page(state.usage, tenant_id, page)
    usage = await state.usage.get(tenant_id)
    return UsageOut(tenant=tenant_id, total=_counts_out(usage.total),
                    models={model: _counts_out(counts) for model, counts in usage.models.items()})


async def all_usage(state: AppState, query: UsageQuery) -> UsagePage[TenantUsageResultOut]:
    """Every tenant's usage over time (a billing export), bounded per page."""
    page = usage_pages.window(query, now=time.time(), tenant_cursor=True)
    return await usage_pages.all_tenants_page(state.usage, page, max_rows=state.settings.admin_usage_max_rows)


# -- keys --------------------------------------------------------------------------------------------


async def create_key(state: AppState, tenant_id: str, *, body: KeyCreate) -> KeyCreated:
    await _require_tenant(state, tenant_id)
    created = await state.tenants.create_key(tenant_id, name=body.name)  # None: a delete started meanwhile
    if created is None:
        raise _being_deleted(tenant_id)
    return _key_created(*created)


async def list_keys(state: AppState, tenant_id: str) -> ListOut[KeyOut]:
    await _require_tenant(state, tenant_id, live=False)
    return ListOut(data=[_key_out(k) for k in await state.tenants.list_keys(tenant_id)])


async def revoke_key(state: AppState, tenant_id: str, *, key_id: str) -> Deleted:
    await _require_tenant(state, tenant_id)
    if not await state.tenants.revoke_key(tenant_id, key_id):
        raise NotFound(f"Key `{key_id}` does not exist.", param="key_id")
    return Deleted(id=key_id, object="api_key")


# -- adapters ----------------------------------------------------------------------------------------


async def list_adapters(state: AppState, tenant_id: str) -> ListOut[AdapterOut]:
    await _require_tenant(state, tenant_id)
    return ListOut(data=[_adapter_out(state, r) for r in await state.adapters.list_records(tenant_id)])


async def get_adapter(state: AppState, tenant_id: str, *, name: str) -> AdapterOut:
    return _adapter_out(state, await _require_adapter(state, tenant_id, name))


async def activate_version(state: AppState, tenant_id: str, *, name: str, version: int,
                           canary: CanaryIn | None = None) -> AdapterOut:
    """Make ``version`` active, with ``canary`` as its traffic split (none: any split ends)."""
    await _require_adapter(state, tenant_id, name)
    if canary is not None and canary.version == version:
        raise InvalidRequest("The canary version must differ from the active `version`.", param="canary.version")
    split = Split(version=canary.version, percent=canary.percent) if canary else None
    # The registry activates atomically and answers the record it left: a version recorded after the read above
    # is activated (and answered) too, one deleted meanwhile is not.
    try:
        record = await state.adapters.activate(tenant_id, name, version, canary=split)
    except UnknownVersion as e:
        param = "canary.version" if split is not None and e.version == split.version else "version"
        raise NotFound(f"Adapter `{name}` has no version {e.version}.", param=param) from e
    if state.settings.prefetch_on_activate:  # both versions of a split serve from now on
        served = [version, split.version] if split is not None and split.percent else [version]
        for v in served:
            _warm(state, AdapterRef(tenant_id, name, v, record.versions[v].uid), record.versions[v])
    return _adapter_out(state, record)


async def delete_adapter(state: AppState, tenant_id: str, *, name: str) -> Deleted:
    await _require_adapter(state, tenant_id, name)
    await _delete_adapter_everywhere(state, tenant_id, name)
    return Deleted(id=name, object="adapter")


async def upload_adapter(state: AppState, tenant_id: str, *, name: str, files: list[UploadedFile],
                         archive: UploadedFile | None, activate: bool,
                         base_model: str | None = None) -> AdapterUploadOut:
    """Stage, validate and publish one uploaded adapter version (committed only while this tenant is live)."""
    tenant = await _require_tenant(state, tenant_id)
    _check_name(name)
    if bool(files) == bool(archive):
        raise InvalidAdapter(f"Send the adapter either as `files` ({' and '.join(ADAPTER_FILES)}) or as one "
                             "`archive`, not both or neither.", param="files")
    base = _served_base(state, base_model)
    with tempfile.TemporaryDirectory(prefix="banyan-upload-") as tmp:
        staged = await asyncio.to_thread(_stage, Path(tmp), files, archive,
                                         max_bytes=state.settings.max_adapter_bytes)
        return await _store_version(state, tenant, name=name, staged=staged, activate=activate, base=base,
                                    asked=base_model is not None)


async def import_adapter(state: AppState, tenant_id: str, *, body: AdapterSourceIn) -> AdapterUploadOut:
    """Copy the adapter folder at ``body.source`` (side files skipped, bounded like an upload), then store it as an
    upload. The request's credentials, if any, serve this copy only."""
    return await _import_from(state, tenant_id, name=body.name, source=body.source, activate=body.activate,
                              base_model=body.base_model, credentials=_credentials(body.credentials))


async def _import_from(state: AppState, tenant_id: str, *, name: str, source: str, activate: bool,
                       base_model: str | None, credentials: SourceCredentials | None,
                       note: Note | None = None) -> AdapterUploadOut:
    tenant = await _require_tenant(state, tenant_id)
    _check_name(name)
    base = _served_base(state, base_model)
    with tempfile.TemporaryDirectory(prefix="banyan-import-") as tmp:
        staged = await asyncio.to_thread(_fetch, Path(tmp), source, settings=state.settings, credentials=credentials)
        return await _store_version(state, tenant, name=name, staged=staged, activate=activate, base=base,
                                    asked=base_model is not None, note=note)


async def _store_version(state: AppState, tenant: Tenant, *, name: str, staged: _Staged, activate: bool,
                         base: ServedBase, asked: bool, note: Note | None = None) -> AdapterUploadOut:
    """Validate the staged adapter against ``base`` (``asked``: the request named it) and publish it as a new
    version of ``name`` bound to it."""
    settings = state.settings
    info = await asyncio.to_thread(_validate_for, state, staged.folder, base, asked=asked)
    version = await state.adapters.allocate_version(tenant.id, name)
    meta = VersionMeta(version=version, uid=new_uid(), sha256=info.sha256, rank=info.rank, alpha=info.alpha,
                       target_modules=info.target_modules, size_bytes=info.size_bytes, created=int(time.time()),
                       base_model=base.id)
    ref = AdapterRef(tenant.id, name, version, meta.uid)
    try:
        if note is not None:
            await note(ref)
        await publish_version(state.store, state.adapters, ref=ref, folder=staged.folder, meta=meta,
                              activate=activate, fence=state.tenants.fence(tenant))
    except CommitRefused as e:
        state.metrics.adapter_uploads.labels("failed").inc()
        raise Conflict(f"Tenant `{tenant.id}` was deleted while the adapter was uploading; nothing was stored.",
                       param="tenant_id") from e
    except BaseException:
        state.metrics.adapter_uploads.labels("failed").inc()
        raise
    state.metrics.adapter_uploads.labels("stored").inc()
    if activate and settings.prefetch_on_activate:
        _warm(state, ref, meta)
    stored = _version_out(state, name, meta, active=version if activate else None)
    return AdapterUploadOut(**stored.model_dump(), ignored_files=staged.ignored)


# -- bulk imports ------------------------------------------------------------------------------------


class _ImportWorker:
    """One bulk import item is one import (:func:`_import_from`); whatever stops it becomes the item's error."""

    def __init__(self, state: AppState) -> None:
        self._state = state

    async def run(self, item: ImportItem, *, credentials: SourceCredentials | None, note: Note) -> ItemDone:
        try:
            out = await _import_from(self._state, item.tenant, name=item.name, source=item.source,
                                     activate=item.activate, base_model=item.base_model, credentials=credentials,
                                     note=note)
        except LeaseLost:
            raise
        except BanyanError as e:
            raise ItemFailed(e.body()["error"]) from e
        except Exception as e:
            error = translate(e)
            if type(error) is BanyanError:  # none of ours: a bug, logged like an unhandled request error
                log.exception("an import item failed unexpectedly")
            raise ItemFailed(error.body()["error"]) from e
        return ItemDone(version=out.version, active=out.active)

    async def landed(self, ref: AdapterRef) -> bool:
        return await self._state.adapters.is_recorded(ref)


async def create_import(state: AppState, body: ImportIn) -> ImportOut:
    """Record a bulk import and start running it here (its credentials, if any, stay in this process's memory)."""
    runner = _importer(state)
    if len(body.items) > state.settings.max_import_items:
        raise InvalidRequest(f"An import takes at most {state.settings.max_import_items:,} items; this one has "
                             f"{len(body.items):,}. Split it.", param="items")
    for base_model in {i.base_model for i in body.items}:
        _served_base(state, base_model)  # every item's base is served and can be checked against
    items = [ImportItem(tenant=i.tenant, name=i.name, source=i.source, activate=i.activate, base_model=i.base_model)
             for i in body.items]
    record = await runner.submit(items, _ImportWorker(state), credentials=_credentials(body.credentials))
    return _import_out(record)


async def get_import(state: AppState, import_id: str, *, after: int, limit: int, failed_only: bool) -> ImportOut:
    runner = _importer(state)
    record = await runner.store.get(import_id) if _IMPORT_ID.match(import_id) else None
    if record is None:
        raise NotFound(f"Import `{import_id}` does not exist.", param="import_id")
    page = await runner.store.page(import_id, after=after, limit=limit, failed_only=failed_only)
    out = _import_out(record)
    out.data = [ImportItemOut(index=index, tenant=item.tenant, name=item.name, source=item.source,
                              status=result.status, version=result.version,
                              active=result.active if result.status == "succeeded" else None, error=result.error)
                for index, item, result in page.items]
    out.has_more = page.has_more
    return out


async def resume_imports_forever(state: AppState) -> None:
    """Take over the unfinished bulk imports nobody runs (their gateway stopped), now and every few seconds."""
    if state.imports is not None:
        await state.imports.resume_forever(_ImportWorker(state))


def _importer(state: AppState) -> ImportRunner:
    if state.imports is None:
        raise DependencyUnavailable("Bulk imports are not available on this gateway.")
    return state.imports


def _import_out(record: ImportRecord) -> ImportOut:
    return ImportOut(id=record.id, status=record.status, created=record.created, finished=record.finished,
                     credentials=record.credentials,
                     counts=ImportCounts(total=record.total, succeeded=record.succeeded, failed=record.failed,
                                         pending=record.pending))


async def sweep_abandoned_uploads(state: AppState, *, older_than_s: float) -> int:
    """Remove the files of uploads that never got recorded (the process died mid-upload)."""
    removed = await sweep_abandoned(state.store, state.adapters, older_than_s=older_than_s)
    for ref in removed:
        log.warning("removed the files of an abandoned upload", extra={"tenant": ref.tenant, "adapter": ref.name,
                                                                      "version": ref.version})
    return len(removed)


# -- helpers -----------------------------------------------------------------------------------------


def _no_tenant(tenant_id: str) -> NotFound:
    return NotFound(f"Tenant `{tenant_id}` does not exist.", param="tenant_id")


def _being_deleted(tenant_id: str) -> Conflict:
    return Conflict(f"Tenant `{tenant_id}` is being deleted; repeat DELETE /admin/tenants/{tenant_id} if it did "
                    "not finish.", param="tenant_id")


async def _require_tenant(state: AppState, tenant_id: str, *, live: bool = True) -> Tenant:
    """The tenant; 404 when there is none, 409 when it is being deleted (unless ``live`` is False: reads)."""
    tenant = await state.tenants.get(tenant_id) if is_valid_id(tenant_id) else None
    if tenant is None:
        raise _no_tenant(tenant_id)
    if live and tenant.deleting:
        raise _being_deleted(tenant_id)
    return tenant


async def _require_adapter(state: AppState, tenant_id: str, name: str) -> AdapterRecord:
    await _require_tenant(state, tenant_id)
    record = await state.adapters.get(tenant_id, name) if is_valid_id(name) else None
    if record is None:
        raise NotFound(f"Adapter `{name}` does not exist.", param="name")
    return record


async def _delete_adapter_everywhere(state: AppState, tenant_id: str, name: str) -> None:
    """Registry first (no new request can pick it; the versions it removed are marked for the sweep in the same
    step), then the engines, then the files of exactly those versions: an upload of the same name that commits
    meanwhile is a new version in a folder of its own, and stays."""
    for meta in await state.adapters.delete(tenant_id, name):
        ref = AdapterRef(tenant_id, name, meta.version, meta.uid)
        base = state.bases.get(meta.base_model or state.default_base)
        if base is not None:  # a retired base's engines are gone with it
            await base.engines.unload(ref.engine_name)
        await delete_version(state.store, ref)
        await state.adapters.clear_pending(ref)


def _check_name(name: str) -> None:
    if not is_valid_id(name):
        raise InvalidRequest("`name` must match ^[a-z0-9][a-z0-9-]{0,62}$.", param="name")


def _served_base(state: AppState, base_model: str | None) -> ServedBase:
    """The base an upload or import is for: ``base_model`` when given (it must be served), else the default base
    model (the first configured). 400 when it is not served, or has no configuration to check adapters against."""
    base = state.bases.get(base_model or state.default_base)
    if base is None:
        raise InvalidRequest(f"Base model `{base_model}` is not served here; Banyan serves "
                             f"{', '.join(f'`{b}`' for b in state.bases)}.", param="base_model")
    if base.spec is None:
        raise InvalidRequest(f"This gateway has no configuration of base model `{base.id}` to check adapters "
                             "against (its config folder in BANYAN_BASE_MODELS, or BANYAN_BASE_MODEL_CONFIG).",
                             param="base_model" if base_model else None)
    return base


def _validate_for(state: AppState, folder: Path, base: ServedBase, *, asked: bool) -> AdapterInfo:
    """Validate the adapter in ``folder`` against ``base``. When it does not fit it but fits another served base,
    the error says which (the adapter was uploaded for the wrong base). Blocking."""
    settings = state.settings
    assert base.spec is not None, "checked by _served_base"
    others = [b for b in state.bases.values() if b.id != base.id]
    try:
        return validate_adapter_dir(folder, base=base.spec, max_rank=settings.max_lora_rank,
                                    max_bytes=settings.max_adapter_bytes, served_bases=list(state.bases))
    except InvalidAdapterError as e:
        fits = [b.id for b in others if b.spec is not None and _fits(folder, b.spec, settings)]
        if not fits:
            raise
        why = "the upload's base_model" if asked else "the default base model: the upload named no base_model"
        raise InvalidAdapter(f"{e.message}. It was checked against `{base.id}` ({why}); it fits `{fits[0]}`: upload "
                             f"it with base_model `{fits[0]}`.", code=e.code, param="base_model") from e


def _fits(folder: Path, spec: BaseModelSpec, settings: Settings) -> bool:
    try:
        validate_adapter_dir(folder, base=spec, max_rank=settings.max_lora_rank, max_bytes=settings.max_adapter_bytes)
    except (InvalidAdapterError, AdapterTooLargeError):
        return False
    return True


def _warm(state: AppState, ref: AdapterRef, meta: VersionMeta) -> None:
    """Have the home replica of the version's base model load it now."""
    base = state.bases.get(meta.base_model or state.default_base)
    if base is not None:
        base.engines.warm(ref.engine_name)


def _credentials(given: SourceCredentialsIn | None) -> SourceCredentials | None:
    if given is None:
        return None
    return SourceCredentials(access_key_id=given.access_key_id, secret_access_key=given.secret_access_key,
                             session_token=given.session_token, endpoint_url=given.endpoint_url, region=given.region)


def _stage(tmp: Path, files: list[UploadedFile], archive: UploadedFile | None, *, max_bytes: int) -> _Staged:
    """The uploaded files in one local folder (an archive extracted safely), side files left out. Blocking."""
    if archive is not None:
        packed = tmp / "upload.archive"
        _copy(archive.file, packed)
        extracted = extract_archive(packed, tmp / "extracted", filename=archive.filename,
                                    max_member_bytes=max_bytes, max_total_bytes=max_bytes)
        return _Staged(folder=extracted.folder, ignored=extracted.ignored)
    paths = [_relative(f.filename) for f in files]
    sorted_files = sort_files(paths)
    kept = [(upload, path) for upload, path in zip(files, paths, strict=True) if path in sorted_files.kept]
    if len(kept) != len(sorted_files.kept):
        raise InvalidAdapter("The same file was sent twice.", param="files")
    folder = tmp / "files"
    folder.mkdir()
    for upload, path in kept:
        _copy(upload.file, folder / path)
    return _Staged(folder=folder, ignored=sorted_files.ignored)


def _relative(filename: str) -> str:
    """An uploaded file's name as a path in the adapter's folder (a client may send ``checkpoint-5/x``), without
    anything that could leave it: only the plain names matter, and side folders are recognised by their name."""
    parts = [p for p in filename.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) if parts else filename


def _fetch(tmp: Path, source: str, *, settings: Settings, credentials: SourceCredentials | None) -> _Staged:
    """The adapter's files at ``source`` in one local folder, side files left out, within the upload's byte bound.
    Blocking (boto3)."""
    max_bytes = settings.max_adapter_bytes
    try:
        reader = S3Source.open(source, default=s3_config(settings), credentials=credentials)
        objects = reader.list(max_objects=_MAX_SOURCE_OBJECTS)
        found = sort_files(o.relative for o in objects)
        wanted = [o for o in objects if o.relative in found.kept]
        if sum(o.size for o in wanted) > max_bytes:
            raise AdapterTooLargeError(f"the adapter's files at {source} total {sum(o.size for o in wanted):,} "
                                       f"bytes, over the {max_bytes:,}-byte limit")
        folder = tmp / "files"
        folder.mkdir()
        budget = max_bytes
        for obj in wanted:
            budget -= reader.download(obj, folder / obj.relative, max_bytes=budget)
    except SourceError as e:
        raise InvalidRequest(f"Cannot import from `source`: {e}.", param="source") from e
    except OverflowError as e:
        raise AdapterTooLargeError(f"the adapter's files at {source} grew over the {max_bytes:,}-byte limit while "
                                   "they were read") from e
    return _Staged(folder=folder, ignored=found.ignored)


def _copy(source: BinaryIO, dest: Path) -> None:
    source.seek(0)
    with dest.open("wb") as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)


# -- records -> wire models --------------------------------------------------------------------------


async def _tenants_out(state: AppState, tenants: list[Tenant]) -> list[TenantOut]:
    """The tenants with their budgets: what each spent is read for all of them in one round trip."""
    spent = await state.quotas.spent([t.id for t in tenants])
    return [_tenant_out(t, spent[t.id]) for t in tenants]


def _tenant_out(tenant: Tenant, spent: Spent) -> TenantOut:
    budget = BudgetOut(
        daily=_budget_out(tenant.daily_token_budget, used=spent.daily, resets_at=spent.daily_resets_at),
        monthly=_budget_out(tenant.monthly_token_budget, used=spent.monthly, resets_at=spent.monthly_resets_at))
    return TenantOut(id=tenant.id, name=tenant.name, created=tenant.created, rpm=tenant.rpm, tpm=tenant.tpm,
                     max_concurrency=tenant.max_concurrency, status="deleting" if tenant.deleting else "active",
                     fallback_to_base=tenant.fallback_to_base, daily_token_budget=tenant.daily_token_budget,
                     monthly_token_budget=tenant.monthly_token_budget, budget=budget)


def _budget_out(limit: int | None, *, used: int, resets_at: int) -> BudgetPeriodOut:
    return BudgetPeriodOut(limit=limit, used=used, remaining=None if limit is None else max(0, limit - used),
                           resets_at=resets_at)


def _key_out(info: KeyInfo) -> KeyOut:
    return KeyOut(key_id=info.key_id, name=info.name, created=info.created, prefix=info.prefix)


def _key_created(info: KeyInfo, secret: str) -> KeyCreated:
    return KeyCreated(key_id=info.key_id, name=info.name, created=info.created, prefix=info.prefix, key=secret)


def _counts_out(counts: Counts) -> UsageCounts:
    return UsageCounts(requests=counts.requests, prompt_tokens=counts.prompt_tokens,
                       completion_tokens=counts.completion_tokens, total_tokens=counts.total_tokens)


def _version_out(state: AppState, name: str, meta: VersionMeta, *, active: int | None) -> AdapterVersionOut:
    return AdapterVersionOut(name=name, version=meta.version, active=meta.version == active, sha256=meta.sha256,
                             rank=meta.rank, alpha=meta.alpha, target_modules=meta.target_modules,
                             size_bytes=meta.size_bytes, created=meta.created,
                             base_model=meta.base_model or state.default_base)


def _adapter_out(state: AppState, record: AdapterRecord) -> AdapterOut:
    versions = [_version_out(state, record.name, record.versions[v], active=record.active)
                for v in sorted(record.versions)]
    canary = CanaryOut(version=record.canary.version, percent=record.canary.percent) if record.canary else None
    return AdapterOut(name=record.name, active_version=record.active, canary=canary, versions=versions)
