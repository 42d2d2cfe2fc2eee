"""The stored layout of adapter versions, and the only module that writes or names it.

In object storage every upload of a tenant's adapter is one immutable folder::

    adapters/<tenant>/<adapter>/v<version>-<uid>/
        adapter_config.json          the PEFT config       } ADAPTER_FILES
        adapter_model.safetensors    the LoRA weights      }
        manifest.json                a :class:`Manifest`, written last

The manifest ties the files to one upload (its ``uid``, which is also in the engine name) and gives their
size, so the engine's disk cache (:mod:`adapters.cache`) reads it first and can reserve room before the
files arrive. The uid is in the folder's name too (the engine name carries it, so the cache finds the folder
from the name alone): a version number is never reused for an adapter (the registry's counter survives a
delete), but it is for a tenant deleted and created again, and two uploads never share a folder, so deleting
or sweeping one upload's files can never remove another's.

:func:`publish_version` is the upload's storage protocol (mark pending -> files -> manifest -> record the
version in the registry, the commit point, optionally fenced); :func:`sweep_abandoned` removes what an upload
whose process died left behind; :func:`delete_version` removes one upload's files and :func:`delete_stored`
all of an adapter's or of a tenant's.

This module imports only the standard library and :mod:`adapters.naming` (the load scripts that run under
gevent use its file names).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from adapters.naming import AdapterRef

if TYPE_CHECKING:
    from adapters.registry import Fence, VersionMeta
    from adapters.store import ObjectStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
"""The files of an adapter version, as PEFT writes them and as the engine loads them."""
MANIFEST_FILE = "manifest.json"
ROOT = "adapters"

log = logging.getLogger("banyan.adapters")


def adapter_prefix(tenant: str, name: str | None = None) -> str:
    """The prefix of all versions of one adapter, or of all adapters of a tenant."""
    return f"{ROOT}/{tenant}/" + (f"{name}/" if name else "")


def version_prefix(ref: AdapterRef) -> str:
    """The folder of one version: its number and its upload's uid."""
    return f"{adapter_prefix(ref.tenant, ref.name)}v{ref.version}-{ref.uid}/"


def object_key(ref: AdapterRef, filename: str) -> str:
    return version_prefix(ref) + filename


@dataclass(frozen=True, slots=True)
class Manifest:
    """``manifest.json``: which upload the files of a version belong to, and their size in bytes."""

    uid: str
    sha256: str
    version: int
    size_bytes: int
    base_model: str | None = None
    """The base model the version was validated against: an engine serving another one refuses it (None: written
    before versions were bound to a base; any engine loads it)."""

    @classmethod
    def of(cls, ref: AdapterRef, meta: VersionMeta) -> Manifest:
        return cls(uid=ref.uid, sha256=meta.sha256, version=ref.version, size_bytes=meta.size_bytes,
                   base_model=meta.base_model)

    def to_json(self) -> str:
        data = asdict(self)
        if self.base_model is None:  # what versions without a base have always written
            del data["base_model"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Manifest:
        """Parse a stored manifest (unknown keys are ignored); ValueError when it is not one."""
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a manifest is a JSON object")
        uid, sha256, version, size = (data.get(k) for k in ("uid", "sha256", "version", "size_bytes"))
        if not (isinstance(uid, str) and isinstance(sha256, str) and _is_count(version) and _is_count(size)):
            raise ValueError("a manifest has a string uid and sha256 and whole-number version and size_bytes")
        base_model = data.get("base_model")
        return cls(uid=uid, sha256=sha256, version=version, size_bytes=size,
                   base_model=base_model if isinstance(base_model, str) else None)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class CommitRefused(Exception):
    """The version was not recorded because its fence no longer held (e.g. the tenant is being deleted);
    its files were removed."""


class UploadRecords(Protocol):
    """What publishing and sweeping need of the adapter registry (:class:`adapters.registry.AdapterRegistry`)."""

    async def mark_pending(self, ref: AdapterRef) -> None: ...
    async def clear_pending(self, ref: AdapterRef) -> None: ...
    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool,
                             fence: Fence | None = None) -> bool: ...
    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]: ...
    async def is_recorded(self, ref: AdapterRef) -> bool: ...


async def publish_version(store: ObjectStore, records: UploadRecords, *, ref: AdapterRef, folder: Path,
                          meta: VersionMeta, activate: bool, fence: Fence | None = None) -> None:
    """Store the validated adapter files in ``folder`` as version ``ref`` and record it (the commit point).

    The upload is marked pending first, so that if this process dies before the end, :func:`sweep_abandoned`
    finds its files. The manifest is written (into ``folder``, then to the store) after the adapter files.
    The version is recorded only while ``fence`` holds (:class:`CommitRefused` otherwise).

    Before the commit, any failure removes the version's files again and re-raises. When the commit itself
    fails, whether it landed is asked: landed is a success (the answer was lost, the work is done); not
    landed removes the files; unknown leaves files and pending mark to the sweep, which removes them only
    if the version is not recorded. Once committed, a failure to forget the pending mark is not the
    upload's failure (the sweep forgets it). If even a removal fails, the pending mark stays for the sweep.
    """
    manifest = folder / MANIFEST_FILE
    manifest.write_text(Manifest.of(ref, meta).to_json())
    await records.mark_pending(ref)
    try:
        for filename in ADAPTER_FILES:
            await store.put_file(object_key(ref, filename), folder / filename)
        await store.put_file(object_key(ref, MANIFEST_FILE), manifest)
    except BaseException:
        await _remove_upload(store, records, ref)
        raise
    try:
        committed = await records.record_version(ref.tenant, ref.name, meta, activate=activate, fence=fence)
    except BaseException:
        landed = await asyncio.shield(_recorded_or_none(records, ref))
        if landed is None:
            raise  # unknown: the sweep decides once the registry answers again
        if not landed:
            await _remove_upload(store, records, ref)
            raise
        committed = True
    if not committed:
        await _remove_upload(store, records, ref)
        raise CommitRefused(f"version {ref.version} of {ref.name!r} was not recorded: its fence no longer holds")
    try:
        await records.clear_pending(ref)
    except Exception as e:  # committed: the sweep finds the version recorded and only forgets the mark
        log.warning("could not clear the pending mark of a stored upload: %s", type(e).__name__)


async def _remove_upload(store: ObjectStore, records: UploadRecords, ref: AdapterRef) -> None:
    await asyncio.shield(store.delete_prefix(version_prefix(ref)))
    await asyncio.shield(records.clear_pending(ref))


async def _recorded_or_none(records: UploadRecords, ref: AdapterRef) -> bool | None:
    try:
        return await records.is_recorded(ref)
    except Exception:
        return None


async def sweep_abandoned(store: ObjectStore, records: UploadRecords, *, older_than_s: float) -> list[AdapterRef]:
    """Remove the files of uploads pending for longer than ``older_than_s`` that were never recorded (their
    process died mid-upload); forget the pending marks. The versions whose files were removed."""
    removed = []
    for ref in await records.abandoned(older_than_s=older_than_s):
        if not await records.is_recorded(ref):
            await store.delete_prefix(version_prefix(ref))
            removed.append(ref)
        await records.clear_pending(ref)
    return removed


async def delete_version(store: ObjectStore, ref: AdapterRef) -> int:
    """Remove the stored files of one upload (another upload of the same adapter is never touched)."""
    return await store.delete_prefix(version_prefix(ref))


async def delete_stored(store: ObjectStore, tenant: str, name: str | None = None) -> int:
    """Remove the stored files of every version of adapter ``name``, or of all of ``tenant``'s adapters
    (only for what no upload can add to meanwhile: a tenant being deleted)."""
    return await store.delete_prefix(adapter_prefix(tenant, name))
