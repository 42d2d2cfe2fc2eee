"""The engine-side adapter disk cache: immutable adapter versions on local disk, bounded in bytes.

It runs inside the vLLM server (through the resolver plugin) and keeps three things in step: the files
on disk, vLLM's registry of adapter names, and the byte bound.

- Each adapter version is in one :class:`AdapterState` at a time. A fetch is single-flight per name
  (concurrent callers await the same download); a failed fetch is remembered for ``failure_ttl_s`` so a
  broken adapter fails fast instead of hammering object storage.
- Files are downloaded to a staging folder and renamed into place, so a half-written version is never
  visible; the manifest written at upload time (:mod:`adapters.layout`) ties the files to the exact upload
  (``uid``).
- Never delete files under a registered name, nor files just handed to vLLM that it has not
  registered yet: vLLM re-reads an adapter's files whenever its own CPU
  LRU reloads it. Room is made by deleting versions vLLM no longer has registered (the gateway unloads
  idle adapters), and only if that is not enough, by asking vLLM to unload the least recently
  fetched adapter that no running or waiting request uses, then deleting it. If no room can be made
  the fetch fails (the bound is never exceeded).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from adapters.layout import ADAPTER_FILES, MANIFEST_FILE, Manifest, object_key
from adapters.naming import AdapterRef
from adapters.store import ObjectMissing, ObjectStore, StoreError

log = logging.getLogger("banyan.resolver")

class AdapterState(Enum):
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


class AdapterFetchError(Exception):
    """The adapter version could not be made available on local disk."""


class CacheFull(AdapterFetchError):
    """No room could be made without touching adapters in use (transient: not remembered)."""


class EngineControl(Protocol):
    """What the cache needs to know from (and ask of) the vLLM server it lives in."""

    async def registered(self) -> set[str]: ...
    async def busy(self) -> set[str]: ...
    async def unload(self, name: str) -> None: ...


class CacheMetrics(Protocol):
    def load(self, *, stage: str, result: str, seconds: float | None = None) -> None: ...
    def usage(self, *, used_bytes: int, peak_bytes: int, resident: int) -> None: ...
    def evicted(self, reason: str) -> None: ...


class _NoMetrics:
    def load(self, *, stage: str, result: str, seconds: float | None = None) -> None:
        return None

    def usage(self, *, used_bytes: int, peak_bytes: int, resident: int) -> None:
        return None

    def evicted(self, reason: str) -> None:
        return None


@dataclass
class _Entry:
    ref: AdapterRef
    path: Path
    size: int
    state: AdapterState
    touched: float = 0.0
    seen_registered: bool = False


class AdapterDiskCache:
    def __init__(self, root: Path, store: ObjectStore, *, max_bytes: int, engine: EngineControl,
                 failure_ttl_s: float = 30.0, protect_s: float = 10.0, metrics: CacheMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._store = store
        self._engine = engine
        self._failure_ttl = failure_ttl_s
        self._protect = protect_s
        self._metrics = metrics or _NoMetrics()
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently fetched first
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._failures: dict[str, tuple[float, str]] = {}
        self._room = asyncio.Lock()  # one eviction pass at a time (not one load at a time)
        self._started = False
        self.peak_bytes = 0

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def state(self, name: str) -> AdapterState | None:
        if name in self._inflight:
            return AdapterState.DOWNLOADING
        entry = self._entries.get(name)
        if entry is None:
            return AdapterState.FAILED if name in self._failures else None
        return entry.state

    def _start(self) -> None:
        # Files left by an earlier server process are not registered in this one: start empty.
        if not self._started:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            self._started = True

    async def ensure(self, ref: AdapterRef) -> Path:
        """The local folder of ``ref``, fetching it from object storage if needed (single flight)."""
        self._start()
        name = ref.engine_name
        entry = self._entries.get(name)
        if entry is not None and entry.state is AdapterState.READY:
            self._entries.move_to_end(name)
            entry.touched = self._clock()
            entry.seen_registered = False  # vLLM asks again: it is registering the name anew
            self._metrics.load(stage="disk", result="hit")
            return entry.path
        failed = self._failures.get(name)
        if failed is not None:
            if self._clock() - failed[0] < self._failure_ttl:
                self._metrics.load(stage="fetch", result="failed_recently")
                raise AdapterFetchError(failed[1])
            del self._failures[name]
        pending = self._inflight.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            path = await self._fetch(ref)
        except BaseException as e:
            message = str(e) if isinstance(e, AdapterFetchError) else f"{name}: fetch failed"
            if not isinstance(e, CacheFull):
                self._failures[name] = (self._clock(), message)
            future.set_exception(e if isinstance(e, AdapterFetchError) else AdapterFetchError(message))
            future.exception()  # retrieved here; waiters re-raise it
            raise
        else:
            future.set_result(path)
            return path
        finally:
            del self._inflight[name]

    async def _fetch(self, ref: AdapterRef) -> Path:
        started = self._clock()
        target = self.root / ref.tenant / ref.name / f"v{ref.version}-{ref.uid}"
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            try:
                await self._store.get_file(object_key(ref, MANIFEST_FILE), staging / MANIFEST_FILE)
                manifest_done = self._clock()
                try:
                    manifest = Manifest.from_json((staging / MANIFEST_FILE).read_bytes())
                except ValueError as e:
                    raise AdapterFetchError(f"{ref.engine_name}: its manifest is unreadable") from e
                if manifest.uid != ref.uid:
                    raise AdapterFetchError(f"{ref.engine_name}: stored files belong to another upload")
                # The bound covers everything the version keeps on disk: its files and the manifest.
                size = manifest.size_bytes + (staging / MANIFEST_FILE).stat().st_size
                entry = _Entry(ref=ref, path=target, size=size, state=AdapterState.DOWNLOADING)
                await self._make_room(entry)
                room_made = self._clock()
                # The files side by side: with the manifest, a cold load waits for two round trips, not three.
                # Every download ends before the staging folder can be removed (no stray writes after).
                results = await asyncio.gather(
                    *(self._store.get_file(object_key(ref, f), staging / f) for f in ADAPTER_FILES),
                    return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            except ObjectMissing as e:
                self._metrics.load(stage="fetch", result="missing")
                raise AdapterFetchError(f"{ref.engine_name}: not in object storage") from e
            except StoreError as e:
                self._metrics.load(stage="fetch", result="store_error")
                raise AdapterFetchError(f"{ref.engine_name}: object storage unavailable") from e
            actual = sum((staging / f).stat().st_size for f in (*ADAPTER_FILES, MANIFEST_FILE))
            if actual != size:
                self._metrics.load(stage="fetch", result="size_mismatch")
                self._entries.pop(ref.engine_name, None)
                raise AdapterFetchError(f"{ref.engine_name}: files do not match their manifest")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            entry.state = AdapterState.READY
            entry.touched = self._clock()
            done = self._clock()
            self._metrics.load(stage="fetch", result="ok", seconds=done - started)
            log.info("fetched %s in %.3f s (manifest %.3f s, making room %.3f s, files %.3f s)", ref.engine_name,
                     done - started, manifest_done - started, room_made - manifest_done, done - room_made)
            return target
        except BaseException:
            self._entries.pop(ref.engine_name, None)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self._report()

    async def _make_room(self, entry: _Entry) -> None:
        """Reserve ``entry.size`` bytes under the bound, evicting what may be evicted."""
        if entry.size > self.max_bytes:
            raise AdapterFetchError(f"{entry.ref.engine_name}: larger than the whole adapter disk cache")
        async with self._room:
            if self.used_bytes + entry.size > self.max_bytes:
                await self._evict_unregistered(entry.size)
            if self.used_bytes + entry.size > self.max_bytes:
                await self._evict_idle(entry.size)
            if self.used_bytes + entry.size > self.max_bytes:
                self._metrics.load(stage="fetch", result="cache_full")
                raise CacheFull(f"{entry.ref.engine_name}: the adapter disk cache is full of adapters in use")
            self._entries[entry.ref.engine_name] = entry
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def _candidates(self) -> list[_Entry]:
        """Evictable entries, least recently fetched first. One just handed to vLLM and not yet seen in
        its registry is not: vLLM registers (and reads) it only after the resolver returns (protected
        until seen registered, or ``protect_s`` if vLLM never registers it)."""
        now = self._clock()
        return [e for e in self._entries.values()
                if e.state is AdapterState.READY and (e.seen_registered or now - e.touched >= self._protect)]

    async def _evict_unregistered(self, need: int) -> None:
        registered = await self._engine.registered()
        for entry in self._entries.values():
            if entry.ref.engine_name in registered:
                entry.seen_registered = True
        for entry in self._candidates():
            if self.used_bytes + need <= self.max_bytes:
                return
            if entry.ref.engine_name not in registered:
                await self._delete(entry, reason="unregistered")

    async def _evict_idle(self, need: int) -> None:
        busy = await self._engine.busy()
        for entry in self._candidates():
            if self.used_bytes + need <= self.max_bytes:
                return
            if entry.ref.engine_name in busy:
                continue
            await self._engine.unload(entry.ref.engine_name)
            await self._delete(entry, reason="idle")

    async def _delete(self, entry: _Entry, *, reason: str) -> None:
        self._entries.pop(entry.ref.engine_name, None)
        await asyncio.to_thread(shutil.rmtree, entry.path, True)
        self._metrics.evicted(reason)
        log.info("evicted adapter %s from the disk cache (%s)", entry.ref.engine_name, reason)

    def _report(self) -> None:
        self._metrics.usage(used_bytes=self.used_bytes, peak_bytes=self.peak_bytes,
                            resident=sum(1 for e in self._entries.values() if e.state is AdapterState.READY))
