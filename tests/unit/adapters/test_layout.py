"""The stored layout of adapter versions: the manifest, where things are, publishing, sweeping, deleting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.layout import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    adapter_prefix,
    delete_stored,
    object_key,
    publish_version,
    sweep_abandoned,
    version_prefix,
)
from adapters.naming import AdapterRef
from adapters.registry import VersionMeta
from adapters.store import StoreUnavailable

REF = AdapterRef("acme", "bot", 3, "0123456789ab")
META = VersionMeta(version=3, uid="0123456789ab", sha256="f" * 64, rank=8, alpha=16.0, target_modules=["q_proj"],
                   size_bytes=1234, created=1)


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_put: str | None = None
        self.fail_delete = False

    async def put_file(self, key: str, path: Path) -> None:
        if key == self.fail_put:
            raise StoreUnavailable("down")
        self.objects[key] = path.read_bytes()  # noqa: ASYNC240 - a fake

    async def get_file(self, key: str, dest: Path) -> None:
        dest.write_bytes(self.objects[key])  # noqa: ASYNC240 - a fake

    async def list_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def delete_prefix(self, prefix: str) -> int:
        if self.fail_delete:
            raise StoreUnavailable("down")
        gone = [k for k in self.objects if k.startswith(prefix)]
        for key in gone:
            del self.objects[key]
        return len(gone)


class FakeRecords:
    def __init__(self) -> None:
        self.pending: set[AdapterRef] = set()
        self.recorded: dict[tuple[str, str, int], tuple[VersionMeta, bool]] = {}
        self.stored_when_recorded: list[str] = []
        self.fail_record = False
        self.store: FakeStore | None = None

    async def mark_pending(self, ref: AdapterRef) -> None:
        self.pending.add(ref)

    async def clear_pending(self, ref: AdapterRef) -> None:
        self.pending.discard(ref)

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool) -> None:
        if self.fail_record:
            raise ConnectionError("redis down")
        self.stored_when_recorded = sorted(self.store.objects) if self.store else []
        self.recorded[(tenant, name, meta.version)] = (meta, activate)

    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]:
        return sorted(self.pending, key=lambda r: r.engine_name)

    async def is_recorded(self, ref: AdapterRef) -> bool:
        entry = self.recorded.get((ref.tenant, ref.name, ref.version))
        return entry is not None and entry[0].uid == ref.uid


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / CONFIG_FILE).write_text('{"r": 8}')
    (tmp_path / WEIGHTS_FILE).write_bytes(b"w" * 100)
    return tmp_path


@pytest.fixture
def parts() -> tuple[FakeStore, FakeRecords]:
    store, records = FakeStore(), FakeRecords()
    records.store = store
    return store, records


def test_manifest_round_trip() -> None:
    manifest = Manifest.of(REF, META)
    assert manifest == Manifest(uid="0123456789ab", sha256="f" * 64, version=3, size_bytes=1234)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.to_json().encode()) == manifest
    # The stored form stays what uploads have always written (manifests already in object storage parse).
    assert json.loads(manifest.to_json()) == {"uid": "0123456789ab", "sha256": "f" * 64, "version": 3,
                                              "size_bytes": 1234}


def test_manifest_ignores_unknown_keys() -> None:
    raw = json.dumps({"uid": "u1", "sha256": "s", "version": 1, "size_bytes": 0, "later": {"x": 1}})
    assert Manifest.from_json(raw) == Manifest(uid="u1", sha256="s", version=1, size_bytes=0)


@pytest.mark.parametrize("raw", [
    "not json", "[]", '"uid"', '{"uid": "u1", "sha256": "s", "version": 1}',
    '{"uid": 1, "sha256": "s", "version": 1, "size_bytes": 10}',
    '{"uid": "u1", "sha256": "s", "version": "1", "size_bytes": 10}',
    '{"uid": "u1", "sha256": "s", "version": 1, "size_bytes": -1}',
    '{"uid": "u1", "sha256": "s", "version": true, "size_bytes": 10}',
    '{"uid": "u1", "sha256": "s", "version": 1, "size_bytes": 10.5}',
])
def test_manifest_refuses_what_is_not_one(raw: str) -> None:
    with pytest.raises(ValueError):
        Manifest.from_json(raw)


def test_where_versions_are_stored() -> None:
    assert version_prefix(REF) == "adapters/acme/bot/v3/"
    assert object_key(REF, MANIFEST_FILE) == "adapters/acme/bot/v3/manifest.json"
    assert adapter_prefix("acme") == "adapters/acme/"
    assert adapter_prefix("acme", "bot") == "adapters/acme/bot/"
    assert ADAPTER_FILES == ("adapter_config.json", "adapter_model.safetensors")


async def test_publish_writes_the_files_then_the_manifest_then_records(
        folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    keys = [object_key(REF, f) for f in (*ADAPTER_FILES, MANIFEST_FILE)]
    assert list(store.objects) == keys  # the manifest last
    assert records.stored_when_recorded == sorted(keys)  # recorded only once every file is stored
    assert store.objects[object_key(REF, WEIGHTS_FILE)] == b"w" * 100
    assert Manifest.from_json(store.objects[object_key(REF, MANIFEST_FILE)]) == Manifest.of(REF, META)
    assert records.recorded[("acme", "bot", 3)] == (META, True)
    assert records.pending == set()


@pytest.mark.parametrize("failure", ["manifest", "record"])
async def test_a_failed_publish_leaves_nothing_behind(folder: Path, parts: tuple[FakeStore, FakeRecords],
                                                      failure: str) -> None:
    store, records = parts
    store.objects["adapters/acme/bot/v2/manifest.json"] = b"{}"  # another version stays
    if failure == "manifest":
        store.fail_put = object_key(REF, MANIFEST_FILE)
    else:
        records.fail_record = True
    with pytest.raises((StoreUnavailable, ConnectionError)):
        await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    assert list(store.objects) == ["adapters/acme/bot/v2/manifest.json"]
    assert records.recorded == {} and records.pending == set()


async def test_files_a_failed_publish_could_not_remove_are_left_to_the_sweep(
        folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    records.fail_record = True
    store.fail_delete = True
    with pytest.raises(StoreUnavailable):
        await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=False)
    assert records.pending == {REF}
    store.fail_delete = False
    assert await sweep_abandoned(store, records, older_than_s=0) == [REF]
    assert store.objects == {} and records.pending == set()


async def test_sweep_removes_only_unrecorded_uploads(folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    records.pending.add(REF)  # recorded, but its writer died before clearing the mark
    dead = AdapterRef("acme", "bot", 4, "ba9876543210")
    store.objects[object_key(dead, WEIGHTS_FILE)] = b"half written"
    records.pending.add(dead)
    assert await sweep_abandoned(store, records, older_than_s=0) == [dead]
    assert sorted(store.objects) == sorted(object_key(REF, f) for f in (*ADAPTER_FILES, MANIFEST_FILE))
    assert records.pending == set()


async def test_delete_stored_removes_one_adapter_or_one_tenant(parts: tuple[FakeStore, FakeRecords]) -> None:
    store, _ = parts
    for tenant, name in [("acme", "bot"), ("acme", "bot2"), ("acme", "other"), ("acme2", "bot")]:
        store.objects[f"adapters/{tenant}/{name}/v1/{WEIGHTS_FILE}"] = b"w"
    assert await delete_stored(store, "acme", "bot") == 1
    assert sorted(store.objects) == [f"adapters/acme/bot2/v1/{WEIGHTS_FILE}", f"adapters/acme/other/v1/{WEIGHTS_FILE}",
                                     f"adapters/acme2/bot/v1/{WEIGHTS_FILE}"]
    assert await delete_stored(store, "acme") == 2
    assert list(store.objects) == [f"adapters/acme2/bot/v1/{WEIGHTS_FILE}"]
