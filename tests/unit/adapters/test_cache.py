"""The engine-side disk cache with fakes behind its seams (object store, engine control)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.cache import AdapterDiskCache, AdapterFetchError, AdapterState
from adapters.layout import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, object_key
from adapters.naming import AdapterRef
from adapters.store import ObjectMissing

SIZE = 1000  # bytes of config + weights per fake adapter
MANIFEST_SIZE = len(Manifest(uid="uid000000001", sha256="0" * 64, version=1, size_bytes=SIZE).to_json())
ENTRY = SIZE + MANIFEST_SIZE  # what one version occupies in the cache


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0
        self.gate: asyncio.Event | None = None

    def add(self, ref: AdapterRef, *, uid: str | None = None) -> None:
        manifest = Manifest(uid=uid or ref.uid, sha256="0" * 64, version=ref.version, size_bytes=SIZE)
        self.objects[object_key(ref, MANIFEST_FILE)] = manifest.to_json().encode()
        self.objects[object_key(ref, CONFIG_FILE)] = b"{" + b" " * 98 + b"}"
        self.objects[object_key(ref, WEIGHTS_FILE)] = b"w" * (SIZE - 100)

    async def get_file(self, key: str, dest: Path) -> None:
        self.gets += 1
        if self.gate is not None:
            await self.gate.wait()
        if key not in self.objects:
            raise ObjectMissing(key)
        dest.write_bytes(self.objects[key])  # noqa: ASYNC240 - a fake; the real store writes in a thread


class FakeEngine:
    def __init__(self) -> None:
        self.registered_names: set[str] = set()
        self.busy_names: set[str] = set()
        self.unloaded: list[str] = []

    async def registered(self) -> set[str]:
        return set(self.registered_names)

    async def busy(self) -> set[str]:
        return set(self.busy_names)

    async def unload(self, name: str) -> None:
        self.unloaded.append(name)
        self.registered_names.discard(name)


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
    await asyncio.sleep(0)
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
