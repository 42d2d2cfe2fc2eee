"""The engine-side adapter disk cache: immutable adapter versions on local disk, bounded in bytes.

It runs inside the vLLM server (through the resolver plugin) and keeps three things in step: the files
on disk, vLLM's registry of adapter names, and the byte bound.

- Each adapter version is in one :class:`AdapterState` at a time. A fetch is single-flight per name: the
  download runs in a task of its own that every caller awaits, so a caller that is cancelled (vLLM cancels
  the resolution of a request whose client left) ends only its own wait, never the download. A failure
  that is the stored version's fault (missing files, an unreadable manifest, files that do not match it) is
  remembered for ``failure_ttl_s`` so a broken adapter fails fast instead of hammering object storage;
  one that is not (object storage or the engine unreachable, the local disk full, the cache full of
  adapters in use, cancellation) is not remembered: the next request tries again.
- Files are downloaded to a staging folder, checked against the manifest written at upload time
  (:mod:`adapters.layout`: the upload's ``uid``, the size and the sha256 of the files) and renamed into
  place, so a half-written or altered version is never visible.
- The cache owns one folder inside the configured directory (:func:`cache_files_dir`), marked as its own
  and locked while a process uses it; on first use it empties that folder (files left by an earlier server
  process are not registered in this one) and never touches anything else in the directory.
- Never delete files under a registered name, nor files of an adapter that a running or waiting request
  uses, nor files just handed to vLLM that it has not registered yet: vLLM re-reads an adapter's files
  whenever its own CPU LRU reloads it. Room is made by deleting versions vLLM no longer has registered (the
  gateway unloads idle adapters), and only if that is not enough, by asking vLLM to unload the least
  recently fetched adapter that no running or waiting request uses, then deleting it. An entry leaves the
  cache's books before vLLM is asked to unload it, so a request that re-resolves the name meanwhile gets a
  fresh copy, never the folder being deleted. If no room can be made the fetch fails (the bound is never
  exceeded).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar, Protocol

from adapters.layout import ADAPTER_FILES, CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, object_key
from adapters.naming import AdapterRef
from adapters.store import ObjectMissing, ObjectStore, StoreError

log = logging.getLogger("banyan.resolver")

CACHE_FOLDER = "banyan-lora-cache"
"""The folder the cache owns inside its configured directory."""
OWNER_MARKER = ".banyan-lora-cache"
"""The file that marks :data:`CACHE_FOLDER` as the cache's own (and that a live process holds locked)."""
MAX_MANIFEST_BYTES = 64 * 1024
_HASH_CHUNK_BYTES = 1024 * 1024


def cache_files_dir(root: Path) -> Path:
    """Where the cache configured with directory ``root`` keeps its adapter folders."""
    return root / CACHE_FOLDER


def version_sha256(folder: Path) -> str:
    """The sha256 of an adapter version's files as the manifest records it (validation's ``sha256``): the
    config file's bytes, then the weights file's bytes. Blocking."""
    hasher = hashlib.sha256()
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        with (folder / filename).open("rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                hasher.update(chunk)
    return hasher.hexdigest()


class AdapterState(Enum):
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


class AdapterFetchError(Exception):
    """The adapter version could not be made available on local disk because of the stored version itself
    (remembered for the failure TTL)."""

    remembered: ClassVar[bool] = True


class TransientFetchError(AdapterFetchError):
    """The fetch failed for a reason that is not the adapter's fault (not remembered: the next request retries)."""

    remembered = False


class CacheFull(TransientFetchError):
    """No room could be made without touching adapters in use."""


class EngineControlError(Exception):
    """The engine's own API (registered names, busy adapters, unload) did not answer; raised by
    :class:`EngineControl` implementations."""


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
        self.files = cache_files_dir(root)
        self.max_bytes = max_bytes
        self._store = store
        self._engine = engine
        self._failure_ttl = failure_ttl_s
        self._protect = protect_s
        self._metrics = metrics or _NoMetrics()
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently fetched first
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._failures: dict[str, tuple[float, str]] = {}
        self._room = asyncio.Lock()  # one eviction pass at a time (not one load at a time)
        self._claiming = asyncio.Lock()
        self._owner_fd: int | None = None  # the locked marker, held for the life of the process
        self.peak_bytes = 0

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def state(self, name: str) -> AdapterState | None:
        if name in self._inflight:
            return AdapterState.DOWNLOADING
        entry = self._entries.get(name)
        if entry is None:
            return AdapterState.FAILED if self.remembered_failure(name) is not None else None
        return entry.state

    def remembered_failure(self, name: str) -> str | None:
        """Why fetching ``name`` failed, while that failure is remembered (within the failure TTL)."""
        failed = self._failures.get(name)
        if failed is None or self._clock() - failed[0] >= self._failure_ttl:
            return None
        return failed[1]

    async def ensure(self, ref: AdapterRef) -> Path:
        """The local folder of ``ref``, fetching it from object storage if needed (single flight).

        Raises :class:`AdapterFetchError` (or its transient subclasses) and nothing else but the caller's
        own cancellation."""
        await self._claim()
        name = ref.engine_name
        entry = self._entries.get(name)
        if entry is not None and entry.state is AdapterState.READY:
            self._entries.move_to_end(name)
            entry.touched = self._clock()
            entry.seen_registered = False  # vLLM asks again: it is registering the name anew
            self._metrics.load(stage="disk", result="hit")
            return entry.path
        failed = self.remembered_failure(name)
        if failed is not None:
            self._metrics.load(stage="fetch", result="failed_recently")
            raise AdapterFetchError(failed)
        self._failures.pop(name, None)
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.create_task(self._load(ref), name=f"banyan-fetch-{name}")
            task.add_done_callback(_retrieve_exception)
            self._inflight[name] = task
        # A waiter's cancellation ends only its own wait: the shared download goes on for the others.
        return await asyncio.shield(task)

    async def _load(self, ref: AdapterRef) -> Path:
        """The shared download task of one name: every failure leaves as an AdapterFetchError, and only
        those that are the stored version's fault are remembered."""
        name = ref.engine_name
        try:
            return await self._fetch(ref)
        except AdapterFetchError as e:
            if e.remembered:
                self._failures[name] = (self._clock(), str(e))
            raise
        except EngineControlError as e:
            self._metrics.load(stage="fetch", result="engine_error")
            raise TransientFetchError(f"{name}: the engine's own API did not answer while making room") from e
        except OSError as e:
            self._metrics.load(stage="fetch", result="disk_error")
            reason = errno.errorcode.get(e.errno, "error") if e.errno is not None else "error"
            raise TransientFetchError(f"{name}: the local disk refused the files ({reason})") from e
        except Exception as e:  # a bug: say so in the log, and do not blame the adapter for it
            log.exception("unexpected error while fetching %s", name)
            self._metrics.load(stage="fetch", result="error")
            raise TransientFetchError(f"{name}: fetch failed") from e
        finally:
            del self._inflight[name]

    async def _claim(self) -> None:
        """Make the cache's folder its own, once per process, and empty it."""
        if self._owner_fd is not None:
            return
        async with self._claiming:
            if self._owner_fd is None:
                try:
                    self._owner_fd = await asyncio.to_thread(self._claim_sync)
                except OSError as e:
                    raise TransientFetchError(f"the adapter disk cache at {self.files} cannot be used: {e}") from e

    def _claim_sync(self) -> int:
        folder, marker = self.files, self.files / OWNER_MARKER
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise TransientFetchError(f"{folder} is not a folder the adapter disk cache can own")
        if folder.is_dir() and not marker.is_file() and any(folder.iterdir()):
            raise TransientFetchError(f"{folder} holds files but no {OWNER_MARKER} marker: it is not the adapter "
                                      "disk cache's, and it is left alone (move it or set another cache directory)")
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise TransientFetchError(f"{folder} is in use by another engine process; give each engine its "
                                      "own cache directory") from e
        except BaseException:
            os.close(fd)
            raise
        for child in folder.iterdir():  # files of an earlier process are not registered in this one
            if child.name != OWNER_MARKER:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return fd

    async def _fetch(self, ref: AdapterRef) -> Path:
        started = self._clock()
        name = ref.engine_name
        target = self.files / ref.tenant / ref.name / f"v{ref.version}-{ref.uid}"
        staging = self.files / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            try:
                await self._store.get_file(object_key(ref, MANIFEST_FILE), staging / MANIFEST_FILE)
                manifest_done = self._clock()
                manifest = _read_manifest(staging / MANIFEST_FILE, name=name)
                if manifest.uid != ref.uid:
                    raise AdapterFetchError(f"{name}: stored files belong to another upload")
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
                raise AdapterFetchError(f"{name}: not in object storage") from e
            except StoreError as e:
                self._metrics.load(stage="fetch", result="store_error")
                raise TransientFetchError(f"{name}: object storage unavailable") from e
            actual = sum((staging / f).stat().st_size for f in (*ADAPTER_FILES, MANIFEST_FILE))
            if actual != size:
                self._metrics.load(stage="fetch", result="size_mismatch")
                raise AdapterFetchError(f"{name}: files do not match their manifest")
            if await asyncio.to_thread(version_sha256, staging) != manifest.sha256:
                self._metrics.load(stage="fetch", result="checksum_mismatch")
                raise AdapterFetchError(f"{name}: files do not match their manifest's sha256")
            target.parent.mkdir(parents=True, exist_ok=True)
            leftover = _set_aside(target, self.files)  # of an entry that left the books: never a served folder
            if leftover is not None:
                await asyncio.to_thread(shutil.rmtree, leftover, True)
            staging.rename(target)
            entry.state = AdapterState.READY
            entry.touched = self._clock()
            done = self._clock()
            self._metrics.load(stage="fetch", result="ok", seconds=done - started)
            log.info("fetched %s in %.3f s (manifest %.3f s, making room %.3f s, files %.3f s)", name,
                     done - started, manifest_done - started, room_made - manifest_done, done - room_made)
            return target
        except BaseException:
            self._entries.pop(name, None)
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
                busy = await self._engine.busy()
                await self._evict_unregistered(entry.size, busy=busy)
                if self.used_bytes + entry.size > self.max_bytes:
                    await self._evict_idle(entry.size, busy=busy)
            if self.used_bytes + entry.size > self.max_bytes:
                self._metrics.load(stage="fetch", result="cache_full")
                raise CacheFull(f"{entry.ref.engine_name}: the adapter disk cache is full of adapters in use")
            self._entries[entry.ref.engine_name] = entry
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def _candidates(self, busy: set[str]) -> list[_Entry]:
        """Evictable entries, least recently fetched first. One that a running or waiting request uses is
        not (vLLM reloads its files if its CPU LRU dropped it), nor one just handed to vLLM and not yet seen
        in its registry: vLLM registers (and reads) it only after the resolver returns (protected until seen
        registered, or ``protect_s`` if vLLM never registers it)."""
        now = self._clock()
        return [e for e in self._entries.values()
                if e.state is AdapterState.READY and e.ref.engine_name not in busy
                and (e.seen_registered or now - e.touched >= self._protect)]

    async def _evict_unregistered(self, need: int, *, busy: set[str]) -> None:
        registered = await self._engine.registered()
        for entry in self._entries.values():
            if entry.ref.engine_name in registered:
                entry.seen_registered = True
        for entry in self._candidates(busy):
            if self.used_bytes + need <= self.max_bytes:
                return
            if entry.ref.engine_name not in registered:
                await self._delete(entry, reason="unregistered")

    async def _evict_idle(self, need: int, *, busy: set[str]) -> None:
        for entry in self._candidates(busy):
            if self.used_bytes + need <= self.max_bytes:
                return
            name = entry.ref.engine_name
            # Off the books first: a request that re-resolves the name while vLLM unloads it gets a fresh copy.
            self._entries.pop(name, None)
            try:
                await self._engine.unload(name)
            except BaseException:
                self._entries[name] = entry  # still registered and served: keep its files
                self._entries.move_to_end(name, last=False)
                raise
            await self._delete(entry, reason="idle")

    async def _delete(self, entry: _Entry, *, reason: str) -> None:
        self._entries.pop(entry.ref.engine_name, None)
        # Renamed aside at once (on the loop): a fresh fetch of the same name may move a new folder in meanwhile.
        trash = _set_aside(entry.path, self.files)
        if trash is not None:
            await asyncio.to_thread(shutil.rmtree, trash, True)
        self._metrics.evicted(reason)
        log.info("evicted adapter %s from the disk cache (%s)", entry.ref.engine_name, reason)

    def _report(self) -> None:
        self._metrics.usage(used_bytes=self.used_bytes, peak_bytes=self.peak_bytes,
                            resident=sum(1 for e in self._entries.values() if e.state is AdapterState.READY))


def _read_manifest(path: Path, *, name: str) -> Manifest:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise AdapterFetchError(f"{name}: its manifest is unreadable (over {MAX_MANIFEST_BYTES:,} bytes)")
    try:
        return Manifest.from_json(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise AdapterFetchError(f"{name}: its manifest is unreadable") from e


def _set_aside(path: Path, files: Path) -> Path | None:
    """Move a version's folder out of the way (one atomic rename) and return where it went, to be removed."""
    trash = files / ".trash" / uuid.uuid4().hex
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.rename(trash)
    except FileNotFoundError:
        return None
    return trash


def _retrieve_exception(task: asyncio.Task[Path]) -> None:
    """Every waiter may have left: the outcome is read here so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()
