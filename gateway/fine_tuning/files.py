"""A tenant's training files (``/v1/files``): the bytes in the object store, the metadata in Redis.

Layout: the bytes at :func:`adapters.training.jobs.file_key` (``files/<tenant>/<file id>.jsonl``, where the trainer
reads them); ``banyan:files:<tenant>`` HASH file id -> the file's metadata (JSON). The bytes are written first and
the metadata last, the commit point: a file is listed only once its bytes are stored. The commit checks the
tenant's live guard and the per-tenant file count in the same atomic step, so nothing lands for a tenant whose
deletion has begun (its cleanup removes the prefix and the hash) and concurrent uploads cannot pass the count
together. A commit that is refused removes the bytes it wrote.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from adapters.registry import Fence
from adapters.store import ObjectStore
from adapters.training.jobs import file_key, new_file_id

FILES_PREFIX = "files/"
"""The object-store folder of every tenant's training files (``files/<tenant>/``)."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One stored file's metadata, as ``/v1/files`` shows it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_json(self, *, order: int) -> str:
        """``order``: when it was stored, finer than ``created_at`` (seconds), for listing newest first."""
        return json.dumps({**asdict(self), "order": order})

    @classmethod
    def from_json(cls, raw: builtins.bytes | str) -> tuple[int, FileRecord]:  # `bytes` is a field here
        """The stored order and the record."""
        fields = json.loads(raw)
        return int(fields.pop("order", 0)), cls(**fields)


class TooManyFiles(Exception):
    """The tenant already holds the most files it may."""


class FileRefused(Exception):
    """The tenant's guard did not hold at the commit: its deletion has begun."""


class Files(Protocol):
    """The training files as the gateway uses them (:class:`FileStore`; the unit tests' in-memory fake)."""

    async def add(self, tenant: str, *, filename: str, purpose: str, data: bytes, max_files: int,
                  guard: Fence) -> FileRecord: ...
    async def get(self, tenant: str, file_id: str) -> FileRecord | None: ...
    async def list_files(self, tenant: str) -> list[FileRecord]: ...
    async def content(self, tenant: str, file_id: str) -> bytes | None: ...
    async def delete(self, tenant: str, file_id: str) -> bool: ...
    async def delete_tenant(self, tenant: str) -> int: ...


def _files_key(tenant: str) -> str:
    return f"banyan:files:{tenant}"


def tenant_prefix(tenant: str) -> str:
    return f"{FILES_PREFIX}{tenant}/"


# Record a file if the guard holds (KEYS[2]) and the tenant has fewer than ARGV[3] files (KEYS[1]).
# ARGV: file id, record, max files, number of guard fields, then field/value pairs. -1: refused by the guard,
# 0: too many files, 1: recorded.
_RECORD = """
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  if (redis.call('HGET', KEYS[2], ARGV[5 + 2 * i]) or '') ~= ARGV[6 + 2 * i] then return -1 end
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class FileStore:
    """:class:`Files` on Redis and an :class:`ObjectStore`."""

    def __init__(self, redis: Redis, store: ObjectStore) -> None:
        self._redis = redis
        self._store = store
        self._record: Any = redis.register_script(_RECORD)

    async def add(self, tenant: str, *, filename: str, purpose: str, data: bytes, max_files: int,
                  guard: Fence) -> FileRecord:
        """Store ``data`` as a new file of ``tenant``; :class:`TooManyFiles` or :class:`FileRefused` (nothing
        stored) otherwise."""
        if await self._redis.hlen(_files_key(tenant)) >= max_files:  # before the upload; the commit checks again
            raise TooManyFiles
        record = FileRecord(id=new_file_id(), bytes=len(data), created_at=int(time.time()), filename=filename,
                            purpose=purpose)
        key = file_key(tenant, record.id)
        with tempfile.TemporaryDirectory(prefix="banyan-file-") as tmp:
            staged = Path(tmp) / "file.jsonl"
            await asyncio.to_thread(staged.write_bytes, data)
            await self._store.put_file(key, staged)
        try:
            outcome = int(await self._record(keys=[_files_key(tenant), guard.key],
                                             args=[record.id, record.to_json(order=time.time_ns()), max_files,
                                                   *guard.args()]))
        except BaseException:
            await self._store.delete_prefix(key)
            raise
        if outcome != 1:
            await self._store.delete_prefix(key)
            raise TooManyFiles if outcome == 0 else FileRefused
        return record

    async def get(self, tenant: str, file_id: str) -> FileRecord | None:
        raw = await self._redis.hget(_files_key(tenant), file_id)
        return FileRecord.from_json(raw)[1] if raw is not None else None

    async def list_files(self, tenant: str) -> list[FileRecord]:
        """Newest first."""
        stored = [FileRecord.from_json(v) for v in (await self._redis.hgetall(_files_key(tenant))).values()]
        return [record for _, record in sorted(stored, key=lambda s: (s[0], s[1].id), reverse=True)]

    async def content(self, tenant: str, file_id: str) -> bytes | None:
        if await self.get(tenant, file_id) is None:
            return None
        with tempfile.TemporaryDirectory(prefix="banyan-file-") as tmp:
            dest = Path(tmp) / "file.jsonl"
            await self._store.get_file(file_key(tenant, file_id), dest)
            return await asyncio.to_thread(dest.read_bytes)

    async def delete(self, tenant: str, file_id: str) -> bool:
        """The metadata first (the file is gone for every reader at once), then the bytes."""
        if not await self._redis.hdel(_files_key(tenant), file_id):
            return False
        await self._store.delete_prefix(file_key(tenant, file_id))
        return True

    async def delete_tenant(self, tenant: str) -> int:
        """Every file of the tenant: the bytes, then the metadata (repeatable: a failure leaves the list to retry
        from)."""
        count = int(await self._redis.hlen(_files_key(tenant)))
        await self._store.delete_prefix(tenant_prefix(tenant))
        await self._redis.delete(_files_key(tenant))
        return count
