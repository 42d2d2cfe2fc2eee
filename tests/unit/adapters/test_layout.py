"""The stored layout of adapter versions: the manifest, where things are, publishing, sweeping, deleting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from adapters.layout import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CommitRefused,
    Manifest,
    adapter_prefix,
    delete_stored,
    delete_version,
    object_key,
    publish_version,
    sweep_abandoned,
    version_prefix,
)
from adapters.naming import AdapterRef
from adapters.registry import Fence, VersionMeta
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
        self.commit_then_fail = False  # the commit lands, but its answer is lost (a dropped connection)
        self.fail_clear = False
        self.fail_is_recorded = False
        self.refuse: Fence | None = None  # a fence that no longer holds
        self.fences: list[Fence | None] = []
        self.store: FakeStore | None = None

    async def mark_pending(self, ref: AdapterRef) -> None:
        self.pending.add(ref)

    async def clear_pending(self, ref: AdapterRef) -> None:
        if self.fail_clear:
            raise ConnectionError("redis down")
        self.pending.discard(ref)

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool,
                             fence: Fence | None = None) -> bool:
        self.fences.append(fence)
        if self.fail_record:
            raise ConnectionError("redis down")
        if fence is not None and fence == self.refuse:
            return False
        self.stored_when_recorded = sorted(self.store.objects) if self.store else []
        self.recorded[(tenant, name, meta.version)] = (meta, activate)
        if self.commit_then_fail:
            raise ConnectionError("connection lost after the commit")
        return True

    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]:
        return sorted(self.pending, key=lambda r: r.engine_name)

    async def is_recorded(self, ref: AdapterRef) -> bool:
        if self.fail_is_recorded:
            raise ConnectionError("redis down")
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


def test_manifest_carries_the_versions_base_model() -> None:
    manifest = Manifest.of(REF, dataclasses.replace(META, base_model="smollm2-135m-instruct"))
    assert manifest.base_model == "smollm2-135m-instruct"
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert json.loads(manifest.to_json())["base_model"] == "smollm2-135m-instruct"


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
    # The upload's uid is in the path: a version number used again (by a tenant deleted and created again)
    # never names the files of another upload.
    assert version_prefix(REF) == "adapters/acme/bot/v3-0123456789ab/"
    assert object_key(REF, MANIFEST_FILE) == "adapters/acme/bot/v3-0123456789ab/manifest.json"
    assert version_prefix(AdapterRef("acme", "bot", 3, "ba9876543210")) != version_prefix(REF)
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
    store.objects["adapters/acme/bot/v2-aaaaaaaaaaaa/manifest.json"] = b"{}"  # another version stays
    if failure == "manifest":
        store.fail_put = object_key(REF, MANIFEST_FILE)
    else:
        records.fail_record = True
    with pytest.raises((StoreUnavailable, ConnectionError)):
        await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    assert list(store.objects) == ["adapters/acme/bot/v2-aaaaaaaaaaaa/manifest.json"]
    assert records.recorded == {} and records.pending == set()


async def test_a_commit_whose_answer_was_lost_is_a_success(folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    records.commit_then_fail = True
    await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    assert records.recorded[("acme", "bot", 3)] == (META, True)
    assert sorted(store.objects) == sorted(object_key(REF, f) for f in (*ADAPTER_FILES, MANIFEST_FILE))


async def test_a_commit_of_unknown_outcome_leaves_its_files_to_the_sweep(
        folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    records.fail_record = True
    records.fail_is_recorded = True  # whether it was recorded cannot be known: never delete files in use
    with pytest.raises(ConnectionError):
        await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    assert len(store.objects) == 3 and records.pending == {REF}
    records.fail_is_recorded = False
    assert await sweep_abandoned(store, records, older_than_s=0) == [REF]
    assert store.objects == {}


async def test_a_failed_clear_after_the_commit_is_still_a_success(
        folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    records.fail_clear = True
    await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    assert records.recorded[("acme", "bot", 3)] == (META, True) and records.pending == {REF}
    records.fail_clear = False
    assert await sweep_abandoned(store, records, older_than_s=0) == []  # recorded: the sweep only forgets the mark
    assert len(store.objects) == 3 and records.pending == set()


async def test_a_commit_refused_by_its_fence_stores_nothing(folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    fence = Fence(key="banyan:tenant:acme", equals={"uid": '"u1"'})
    records.refuse = fence
    with pytest.raises(CommitRefused):
        await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True, fence=fence)
    assert records.fences == [fence]
    assert store.objects == {} and records.recorded == {} and records.pending == set()


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
        store.objects[object_key(AdapterRef(tenant, name, 1, "0123456789ab"), WEIGHTS_FILE)] = b"w"
    assert await delete_stored(store, "acme", "bot") == 1
    assert sorted(k.split("/")[2] for k in store.objects if k.startswith("adapters/acme/")) == ["bot2", "other"]
    assert await delete_stored(store, "acme") == 2
    assert list(store.objects) == [object_key(AdapterRef("acme2", "bot", 1, "0123456789ab"), WEIGHTS_FILE)]


async def test_delete_version_removes_only_that_upload(folder: Path, parts: tuple[FakeStore, FakeRecords]) -> None:
    store, records = parts
    await publish_version(store, records, ref=REF, folder=folder, meta=META, activate=True)
    again = AdapterRef("acme", "bot", 4, "ba9876543210")  # uploaded while REF is being deleted
    await publish_version(store, records, ref=again, folder=folder,
                          meta=dataclasses.replace(META, version=4, uid=again.uid), activate=True)
    await delete_version(store, REF)
    assert sorted(store.objects) == sorted(object_key(again, f) for f in (*ADAPTER_FILES, MANIFEST_FILE))
