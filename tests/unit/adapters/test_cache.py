"""The engine-side disk cache with fakes behind its seams (object store, engine control)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.cache import (
    OWNER_MARKER,
    AdapterDiskCache,
    AdapterFetchError,
    AdapterState,
    EngineControlError,
    TransientFetchError,
    cache_files_dir,
)
from adapters.layout import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, object_key
from adapters.naming import AdapterRef
from adapters.store import ObjectMissing, StoreUnavailable

SIZE = 1000  # bytes of config + weights per fake adapter
CONFIG = b"{" + b" " * 98 + b"}"
WEIGHTS = b"w" * (SIZE - 100)
SHA256 = hashlib.sha256(CONFIG + WEIGHTS).hexdigest()
MANIFEST_SIZE = len(Manifest(uid="uid000000001", sha256=SHA256, version=1, size_bytes=SIZE).to_json())
ENTRY = SIZE + MANIFEST_SIZE  # what one version occupies in the cache


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None  # raised by the next get_file
        self.started = asyncio.Event()  # set once a download has begun

    def add(self, ref: AdapterRef, *, uid: str | None = None) -> None:
        manifest = Manifest(uid=uid or ref.uid, sha256=SHA256, version=ref.version, size_bytes=SIZE)
        self.objects[object_key(ref, MANIFEST_FILE)] = manifest.to_json().encode()
        self.objects[object_key(ref, CONFIG_FILE)] = CONFIG
        self.objects[object_key(ref, WEIGHTS_FILE)] = WEIGHTS

    async def get_file(self, key: str, dest: Path) -> None:
        self.gets += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if key not in self.objects:
            raise ObjectMissing(key)
        dest.write_bytes(self.objects[key])  # noqa: ASYNC240 - a fake; the real store writes in a thread


class FakeEngine:
    def __init__(self) -> None:
        self.registered_names: set[str] = set()
        self.busy_names: set[str] = set()
        self.unloaded: list[str] = []
        self.on_unload: Callable[[str], None] | None = None
        self.error: Exception | None = None  # raised by registered()

    async def registered(self) -> set[str]:
        if self.error is not None:
            raise self.error
        return set(self.registered_names)

    async def busy(self) -> set[str]:
        return set(self.busy_names)

    async def unload(self, name: str) -> None:
        self.unloaded.append(name)
        self.registered_names.discard(name)
        if self.on_unload is not None:
            self.on_unload(name)
        for _ in range(10):  # the unload's answer takes a while: requests arrive at vLLM meanwhile
            await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ref(i: int) -> AdapterRef:
    return AdapterRef("tenant", f"a{i}", 1, f"uid{i:09d}")


async def _load_registered(cache: AdapterDiskCache, store: FakeStore, engine: FakeEngine,
                           ids: list[int]) -> dict[int, Path]:
    """Fetch these adapters and have the fake engine register them, as vLLM does after resolving."""
    paths = {}
    for i in ids:
        store.add(_ref(i))
        paths[i] = await cache.ensure(_ref(i))
        engine.registered_names.add(_ref(i).engine_name)
    return paths


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeStore, FakeEngine, Clock]:
    return FakeStore(), FakeEngine(), Clock()


def _cache(tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock], *, max_adapters: float = 3.5,
           protect_s: float = 0.0) -> AdapterDiskCache:
    store, engine, clock = parts
    return AdapterDiskCache(tmp_path / "cache", store, max_bytes=int(ENTRY * max_adapters), engine=engine,  # type: ignore[arg-type]
                            failure_ttl_s=30.0, protect_s=protect_s, clock=clock)


async def test_fetches_once_for_concurrent_callers(tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.gate = asyncio.Event()
    cache = _cache(tmp_path, parts)
    waiters = [asyncio.create_task(cache.ensure(_ref(1))) for _ in range(10)]
    await store.started.wait()
    assert cache.state(_ref(1).engine_name) is AdapterState.DOWNLOADING
    store.gate.set()
    paths = await asyncio.gather(*waiters)
    assert len(set(paths)) == 1 and (paths[0] / WEIGHTS_FILE).stat().st_size == SIZE - 100
    assert store.gets == 3  # manifest + two files, once
    assert cache.state(_ref(1).engine_name) is AdapterState.READY


async def test_failure_is_remembered_for_its_ttl(tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, clock = parts
    cache = _cache(tmp_path, parts)
    with pytest.raises(AdapterFetchError, match="not in object storage"):
        await cache.ensure(_ref(1))
    gets = store.gets
    store.add(_ref(1))
    with pytest.raises(AdapterFetchError):
        await cache.ensure(_ref(1))
    assert store.gets == gets  # failed fast, object storage not asked again
    assert cache.state(_ref(1).engine_name) is AdapterState.FAILED
    clock.now += 31
    assert (await cache.ensure(_ref(1))).exists()


async def test_files_of_another_upload_are_refused(tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1), uid="otheruid00001")
    with pytest.raises(AdapterFetchError, match="another upload"):
        await _cache(tmp_path, parts).ensure(_ref(1))


async def test_an_unreadable_manifest_fails_the_fetch(tmp_path: Path,
                                                      parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.objects[object_key(_ref(1), MANIFEST_FILE)] = b'{"uid": "uid000000001"}'
    cache = _cache(tmp_path, parts)
    with pytest.raises(AdapterFetchError, match="manifest is unreadable"):
        await cache.ensure(_ref(1))
    assert cache.state(_ref(1).engine_name) is AdapterState.FAILED and cache.used_bytes == 0


async def test_bound_is_kept_by_evicting_unregistered_first(tmp_path: Path,
                                                           parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts)
    paths = await _load_registered(cache, store, engine, [1, 2, 3])
    engine.registered_names.discard(_ref(2).engine_name)  # the gateway unloaded a2
    store.add(_ref(4))
    await cache.ensure(_ref(4))
    assert not paths[2].exists() and paths[1].exists() and paths[3].exists()
    assert engine.unloaded == []
    assert cache.used_bytes <= cache.max_bytes and cache.peak_bytes <= cache.max_bytes


async def test_idle_registered_adapter_is_unloaded_before_its_files_go(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts)
    paths = await _load_registered(cache, store, engine, [1, 2, 3])
    engine.busy_names = {_ref(1).engine_name}
    store.add(_ref(4))
    await cache.ensure(_ref(4))
    assert engine.unloaded == [_ref(2).engine_name]  # a1 is busy: the least recently fetched idle one goes
    assert paths[1].exists() and not paths[2].exists()


async def test_never_deletes_busy_adapters_and_never_exceeds_the_bound(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts, max_adapters=2)
    for i in (1, 2):
        store.add(_ref(i))
        await cache.ensure(_ref(i))
        engine.registered_names.add(_ref(i).engine_name)
    engine.busy_names = set(engine.registered_names)
    store.add(_ref(3))
    with pytest.raises(AdapterFetchError, match="full"):
        await cache.ensure(_ref(3))
    assert engine.unloaded == [] and cache.used_bytes == 2 * ENTRY


async def test_just_fetched_adapters_are_protected_until_registered(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, clock = parts
    cache = _cache(tmp_path, parts, max_adapters=1, protect_s=30)
    for i in (1, 2, 3):
        store.add(_ref(i))
    first = await cache.ensure(_ref(1))  # handed to vLLM, not yet registered
    with pytest.raises(AdapterFetchError):
        await cache.ensure(_ref(2))
    assert first.exists()
    engine.registered_names.add(_ref(1).engine_name)  # vLLM registered it and a request uses it ...
    engine.busy_names.add(_ref(1).engine_name)
    with pytest.raises(AdapterFetchError):
        await cache.ensure(_ref(2))
    engine.registered_names.clear()  # ... then the gateway unloaded it: now it may go
    engine.busy_names.clear()
    second = await cache.ensure(_ref(2))
    assert not first.exists() and second.exists()
    clock.now += 31  # never registered within protect_s: vLLM dropped it, the files may go
    await cache.ensure(_ref(3))
    assert not second.exists()


async def test_a_cancelled_cold_load_does_not_poison_the_adapter(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.gate = asyncio.Event()
    cache = _cache(tmp_path, parts)
    first = asyncio.create_task(cache.ensure(_ref(1)))
    await store.started.wait()  # the download has begun and is blocked in the store
    second = asyncio.create_task(cache.ensure(_ref(1)))
    await asyncio.sleep(0)
    first.cancel()  # vLLM cancels the resolution of a request whose client left
    with pytest.raises(asyncio.CancelledError):
        await first
    assert cache.state(_ref(1).engine_name) is AdapterState.DOWNLOADING  # the shared download goes on
    store.gate.set()
    path = await second
    assert (path / WEIGHTS_FILE).exists() and cache.state(_ref(1).engine_name) is AdapterState.READY
    assert cache.remembered_failure(_ref(1).engine_name) is None
    assert await cache.ensure(_ref(1)) == path and store.gets == 3  # one download in all


async def test_the_download_goes_on_when_its_only_waiter_leaves(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.gate = asyncio.Event()
    cache = _cache(tmp_path, parts)
    first = asyncio.create_task(cache.ensure(_ref(1)))
    await store.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    store.gate.set()
    path = await cache.ensure(_ref(1))  # joins the download still under way, or finds it done
    assert (path / WEIGHTS_FILE).exists() and store.gets == 3
    assert cache.remembered_failure(_ref(1).engine_name) is None


async def test_a_full_disk_is_not_the_adapters_fault(tmp_path: Path,
                                                     parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.error = OSError(errno.ENOSPC, "No space left on device")
    cache = _cache(tmp_path, parts)
    with pytest.raises(TransientFetchError, match="local disk"):
        await cache.ensure(_ref(1))
    assert cache.remembered_failure(_ref(1).engine_name) is None
    assert (await cache.ensure(_ref(1))).exists()  # room again: the next request is served


async def test_object_storage_down_is_not_remembered(tmp_path: Path,
                                                     parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.error = StoreUnavailable("object storage unreachable during get_object")
    cache = _cache(tmp_path, parts)
    with pytest.raises(TransientFetchError, match="object storage unavailable"):
        await cache.ensure(_ref(1))
    assert (await cache.ensure(_ref(1))).exists()  # storage is back: no 30 s of refusals


async def test_the_engine_api_failing_while_making_room_is_wrapped_and_not_remembered(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts, max_adapters=1)
    await _load_registered(cache, store, engine, [1])
    engine.registered_names.clear()
    store.add(_ref(2))
    engine.error = EngineControlError("connection refused")
    with pytest.raises(TransientFetchError, match="engine"):
        await cache.ensure(_ref(2))
    engine.error = None
    assert (await cache.ensure(_ref(2))).exists()


async def test_a_corrupt_manifest_is_wrapped_and_remembered(tmp_path: Path,
                                                            parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.objects[object_key(_ref(1), MANIFEST_FILE)] = b"[" * 60_000 + b"]" * 60_000  # too deep for json
    cache = _cache(tmp_path, parts)
    with pytest.raises(AdapterFetchError, match="manifest is unreadable"):
        await cache.ensure(_ref(1))
    assert cache.state(_ref(1).engine_name) is AdapterState.FAILED


async def test_files_that_do_not_match_the_manifest_sha256_are_refused(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    store.objects[object_key(_ref(1), WEIGHTS_FILE)] = b"x" * len(WEIGHTS)  # same size, other bytes
    cache = _cache(tmp_path, parts)
    with pytest.raises(AdapterFetchError, match="sha256"):
        await cache.ensure(_ref(1))
    assert cache.state(_ref(1).engine_name) is AdapterState.FAILED and cache.used_bytes == 0
    assert not list((cache_files_dir(tmp_path / "cache") / "tenant").rglob(WEIGHTS_FILE))


async def test_only_its_own_marked_folder_is_cleared_on_start(tmp_path: Path,
                                                              parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    root = tmp_path / "cache"
    (root / "tenant" / "a1").mkdir(parents=True)
    (root / "precious.txt").write_text("not the cache's")
    (root / "tenant" / "a1" / "notes.txt").write_text("not the cache's either")
    mine = cache_files_dir(root)
    (mine / "stale").mkdir(parents=True)
    (mine / OWNER_MARKER).touch()
    store.add(_ref(1))
    path = await _cache(tmp_path, parts).ensure(_ref(1))
    assert path.is_relative_to(mine) and not (mine / "stale").exists()
    assert (root / "precious.txt").exists() and (root / "tenant" / "a1" / "notes.txt").exists()


async def test_a_folder_without_the_marker_is_left_alone(tmp_path: Path,
                                                         parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    mine = cache_files_dir(tmp_path / "cache")
    mine.mkdir(parents=True)
    (mine / "someone-elses.txt").write_text("keep me")
    store.add(_ref(1))
    with pytest.raises(TransientFetchError, match="marker"):
        await _cache(tmp_path, parts).ensure(_ref(1))
    assert (mine / "someone-elses.txt").read_text() == "keep me"


async def test_two_processes_never_share_one_cache_folder(tmp_path: Path,
                                                          parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, _, _ = parts
    store.add(_ref(1))
    first = _cache(tmp_path, parts)
    path = await first.ensure(_ref(1))
    with pytest.raises(TransientFetchError, match="another engine process"):
        await _cache(tmp_path, parts).ensure(_ref(1))  # a second owner would clear the first one's files
    assert (path / WEIGHTS_FILE).exists()


async def test_a_re_resolve_while_vllm_unloads_gets_files_that_stay(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts, max_adapters=3.5, protect_s=30)
    await _load_registered(cache, store, engine, [1, 2, 3])
    engine.busy_names = {_ref(1).engine_name}
    again: list[asyncio.Task[Path]] = []

    def re_resolve(name: str) -> None:  # a request for a2 reaches vLLM right after it dropped the name
        if not again:
            again.append(asyncio.create_task(cache.ensure(_ref(2))))

    engine.on_unload = re_resolve
    store.add(_ref(4))
    await cache.ensure(_ref(4))
    assert engine.unloaded[0] == _ref(2).engine_name
    path = await again[0]
    assert (path / WEIGHTS_FILE).read_bytes() == WEIGHTS  # vLLM will read these files: they must stay


async def test_files_of_an_unregistered_adapter_that_requests_use_stay(
        tmp_path: Path, parts: tuple[FakeStore, FakeEngine, Clock]) -> None:
    store, engine, _ = parts
    cache = _cache(tmp_path, parts, max_adapters=2)
    paths = await _load_registered(cache, store, engine, [1, 2])
    engine.registered_names.clear()  # unloaded by a gateway (another replica, an admin delete) ...
    engine.busy_names = {_ref(1).engine_name}  # ... while a request on a1 still waits in vLLM's queue
    store.add(_ref(3))
    await cache.ensure(_ref(3))
    assert paths[1].exists() and not paths[2].exists()
