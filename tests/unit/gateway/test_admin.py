"""The admin service with hand-written fakes behind the state it uses (stores, registry, engines): what each
operation changes, what it answers, and that it reads a record once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from pydantic import ValidationError

from adapters.naming import AdapterRef
from adapters.registry import AdapterRecord, Fence, VersionMeta
from adapters.store import StoreUnavailable
from gateway.admin import service
from gateway.admin.protocol import KeyCreate, TenantCreate, TenantPatch
from gateway.errors import Conflict, NotFound
from gateway.settings import Settings
from gateway.state import AppState
from gateway.tenants import KeyInfo, Tenant
from gateway.usage import Counts, TenantUsage


def _meta(version: int) -> VersionMeta:
    return VersionMeta(version=version, uid=f"uid{version:09d}", sha256="0" * 64, rank=8, alpha=16.0,
                       target_modules=["q_proj"], size_bytes=10, created=1)


@dataclass
class FakeTenants:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None]) -> Tenant | None:
        self.calls.append("create")
        if tenant_id in self.tenants:
            return None
        self.tenants[tenant_id] = Tenant(id=tenant_id, name=name, created=1, uid=f"uid-{len(self.calls)}",
                                         rpm=limits.get("rpm"), tpm=limits.get("tpm"),
                                         max_concurrency=limits.get("max_concurrency"))
        return self.tenants[tenant_id]

    def _live(self, tenant_id: str) -> bool:
        return tenant_id in self.tenants and not self.tenants[tenant_id].deleting

    async def begin_delete(self, tenant_id: str) -> Tenant | None:
        if tenant_id not in self.tenants:
            return None
        self.tenants[tenant_id] = dataclasses.replace(self.tenants[tenant_id], deleting=True)
        self.keys.clear()
        return self.tenants[tenant_id]

    async def finish_delete(self, tenant_id: str) -> None:
        self.tenants.pop(tenant_id, None)

    def fence(self, tenant: Tenant) -> Fence:
        return Fence(key=f"tenant:{tenant.id}", equals={"uid": tenant.uid})

    async def get(self, tenant_id: str) -> Tenant | None:
        self.calls.append("get")
        return self.tenants.get(tenant_id)

    async def list_tenants(self) -> list[Tenant]:
        return [self.tenants[t] for t in sorted(self.tenants)]

    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None:
        self.calls.append("update")
        if not self._live(tenant_id):
            return None
        self.tenants[tenant_id] = dataclasses.replace(self.tenants[tenant_id], **changes)
        return self.tenants[tenant_id]

    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str] | None:
        if not self._live(tenant_id):
            return None
        info = KeyInfo(key_id=f"key_{len(self.keys)}", name=name, created=2, prefix="bk_abcd")
        self.keys[info.key_id] = info
        return info, "bk_abcd-the-secret"

    async def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        return self.keys.pop(key_id, None) is not None


@dataclass
class FakeRegistry:
    records: dict[tuple[str, str], AdapterRecord] = field(default_factory=dict)
    gets: int = 0
    after_get: list[Callable[[], None]] = field(default_factory=list)  # what happens right after the next read
    pending_cleared: list[str] = field(default_factory=list)

    def add(self, tenant: str, name: str, versions: list[int], *, active: int | None) -> None:
        self.records[(tenant, name)] = AdapterRecord(tenant, name, active, {v: _meta(v) for v in versions})

    async def get(self, tenant: str, name: str) -> AdapterRecord | None:
        self.gets += 1
        record = self.records.get((tenant, name))
        while self.after_get:
            self.after_get.pop(0)()
        return record

    async def activate(self, tenant: str, name: str, version: int) -> VersionMeta | None:
        record = self.records.get((tenant, name))
        if record is None or version not in record.versions:
            return None
        self.records[(tenant, name)] = dataclasses.replace(record, active=version)
        return record.versions[version]

    async def delete(self, tenant: str, name: str) -> list[VersionMeta]:
        record = self.records.pop((tenant, name), None)
        return [record.versions[v] for v in sorted(record.versions)] if record else []

    async def clear_pending(self, ref: AdapterRef) -> None:
        self.pending_cleared.append(ref.engine_name)

    async def list_records(self, tenant: str) -> list[AdapterRecord]:
        return [r for (t, _), r in sorted(self.records.items()) if t == tenant]

    async def delete_tenant(self, tenant: str) -> list[str]:
        names = [n for (t, n) in self.records if t == tenant]
        for name in names:
            del self.records[(tenant, name)]
        return names


@dataclass
class FakeEngines:
    warmed: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def warm(self, engine_model: str) -> None:
        self.warmed.append(engine_model)

    async def unload(self, engine_model: str) -> None:
        self.unloaded.append(engine_model)


@dataclass
class FakeStore:
    deleted: list[str] = field(default_factory=list)
    failures: int = 0  # how many deletes fail (object storage down) before they work again

    async def delete_prefix(self, prefix: str) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("down")
        self.deleted.append(prefix)
        return 1


@dataclass
class FakeUsage:
    deleted: list[str] = field(default_factory=list)

    async def get(self, tenant: str) -> TenantUsage:
        return TenantUsage(total=Counts(requests=3, prompt_tokens=10, completion_tokens=5),
                           models={"bot": Counts(requests=3, prompt_tokens=10, completion_tokens=5)})

    async def delete(self, tenant: str) -> None:
        self.deleted.append(tenant)


@dataclass
class FakeDocuments:
    deleted: list[str] = field(default_factory=list)

    async def delete_tenant(self, tenant: str) -> int:
        self.deleted.append(tenant)
        return 0


@dataclass
class Parts:
    tenants: FakeTenants = field(default_factory=FakeTenants)
    adapters: FakeRegistry = field(default_factory=FakeRegistry)
    engines: FakeEngines = field(default_factory=FakeEngines)
    store: FakeStore = field(default_factory=FakeStore)
    usage: FakeUsage = field(default_factory=FakeUsage)
    documents: FakeDocuments = field(default_factory=FakeDocuments)
    settings: Settings = field(default_factory=lambda: Settings(mode="dev"))

    @property
    def state(self) -> AppState:
        return cast(AppState, self)  # the service reads only these attributes


@pytest.fixture
def parts() -> Parts:
    parts = Parts()
    parts.tenants.tenants["acme"] = Tenant(id="acme", name="Acme", created=1, rpm=60, uid="uid-0")
    return parts


async def test_create_tenant_answers_the_tenant_and_refuses_a_taken_id(parts: Parts) -> None:
    created = await service.create_tenant(parts.state, TenantCreate(id="globex", tpm=1000))
    assert (created.id, created.name, created.tpm, created.rpm) == ("globex", "globex", 1000, None)
    with pytest.raises(Conflict):
        await service.create_tenant(parts.state, TenantCreate(id="acme"))


async def test_update_tenant_reads_once_and_changes_only_what_was_sent(parts: Parts) -> None:
    updated = await service.update_tenant(parts.state, "acme", body=TenantPatch(tpm=500))
    assert (updated.name, updated.rpm, updated.tpm) == ("Acme", 60, 500)
    assert parts.tenants.calls == ["update"]


@pytest.mark.parametrize("tenant_id", ["nobody", "Not-An-Id"])
async def test_update_of_a_missing_tenant_is_not_found(parts: Parts, tenant_id: str) -> None:
    with pytest.raises(NotFound) as caught:
        await service.update_tenant(parts.state, tenant_id, body=TenantPatch(rpm=1))
    assert caught.value.param == "tenant_id"


async def test_keys_are_created_with_their_secret_once_and_revoked(parts: Parts) -> None:
    created = await service.create_key(parts.state, "acme", body=KeyCreate(name="ci"))
    assert (created.key_id, created.name, created.key) == ("key_0", "ci", "bk_abcd-the-secret")
    assert (await service.revoke_key(parts.state, "acme", key_id="key_0")).deleted
    with pytest.raises(NotFound):
        await service.revoke_key(parts.state, "acme", key_id="key_0")
    with pytest.raises(NotFound):
        await service.create_key(parts.state, "nobody", body=KeyCreate())


async def test_usage_counts_total_tokens(parts: Parts) -> None:
    usage = await service.tenant_usage(parts.state, "acme")
    assert usage.total.total_tokens == 15 and usage.models["bot"].requests == 3


async def test_activate_answers_the_new_active_version_from_one_read(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1, 2], active=2)
    out = await service.activate_version(parts.state, "acme", name="bot", version=1)
    assert out.active_version == 1 and [v.active for v in out.versions] == [True, False]
    assert parts.adapters.records[("acme", "bot")].active == 1
    assert parts.adapters.gets == 1
    assert parts.engines.warmed == ["banyan.acme.bot.v1.uid000000001"]


async def test_activating_a_missing_version_changes_nothing(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1, 2], active=2)
    with pytest.raises(NotFound) as caught:
        await service.activate_version(parts.state, "acme", name="bot", version=9)
    assert caught.value.param == "version"
    assert parts.adapters.records[("acme", "bot")].active == 2 and parts.engines.warmed == []


async def test_delete_adapter_removes_it_from_registry_engines_and_storage(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1, 2], active=2)
    parts.adapters.add("acme", "bot-2", [1], active=1)
    assert (await service.delete_adapter(parts.state, "acme", name="bot")).deleted
    assert list(parts.adapters.records) == [("acme", "bot-2")]
    names = ["banyan.acme.bot.v1.uid000000001", "banyan.acme.bot.v2.uid000000002"]
    assert parts.engines.unloaded == names
    # Only the files of the versions it removed: an upload of the same name committed meanwhile keeps its own.
    assert parts.store.deleted == ["adapters/acme/bot/v1-uid000000001/", "adapters/acme/bot/v2-uid000000002/"]
    assert parts.adapters.pending_cleared == names  # the sweep's marks, once the files are gone
    with pytest.raises(NotFound):
        await service.get_adapter(parts.state, "acme", name="bot")


async def test_activating_a_version_recorded_after_the_read_succeeds(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1], active=1)
    parts.adapters.after_get.append(lambda: parts.adapters.add("acme", "bot", [1, 2], active=1))
    out = await service.activate_version(parts.state, "acme", name="bot", version=2)
    assert out.active_version == 2 and [v.version for v in out.versions] == [1, 2]
    assert parts.adapters.records[("acme", "bot")].active == 2


async def test_activating_an_adapter_deleted_after_the_read_is_not_found(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1, 2], active=2)
    parts.adapters.after_get.append(lambda: parts.adapters.records.clear())
    with pytest.raises(NotFound):
        await service.activate_version(parts.state, "acme", name="bot", version=1)
    assert parts.adapters.records == {} and parts.engines.warmed == []


async def test_a_delete_that_failed_midway_is_finished_by_a_retry(parts: Parts) -> None:
    parts.adapters.add("acme", "bot", [1, 2], active=2)
    parts.tenants.keys["key_0"] = KeyInfo(key_id="key_0", name="ci", created=1, prefix="bk_abcd")
    parts.store.failures = 1  # object storage fails once, after the registry let go of the versions
    with pytest.raises(StoreUnavailable):
        await service.delete_tenant(parts.state, "acme")
    # The tombstone stands: keys are revoked, and nothing new can be added for the tenant meanwhile.
    assert (await service.get_tenant(parts.state, "acme")).status == "deleting"
    assert parts.tenants.keys == {}
    with pytest.raises(Conflict) as caught:
        await service.create_tenant(parts.state, TenantCreate(id="acme"))
    assert "being deleted" in caught.value.message and caught.value.param == "id"
    with pytest.raises(Conflict):
        await service.create_key(parts.state, "acme", body=KeyCreate(name="late"))
    with pytest.raises(Conflict):
        await service.upload_adapter(parts.state, "acme", name="late", files=[], archive=None, activate=True)
    with pytest.raises(Conflict):
        await service.update_tenant(parts.state, "acme", body=TenantPatch(rpm=5))
    # Repeating the delete continues the cleanup (instead of 404) and removes the record last.
    assert (await service.delete_tenant(parts.state, "acme")).deleted
    assert parts.tenants.tenants == {} and parts.adapters.records == {}
    assert "adapters/acme/" in parts.store.deleted and parts.documents.deleted == ["acme"]
    assert parts.usage.deleted == ["acme", "acme"]
    with pytest.raises(NotFound):
        await service.delete_tenant(parts.state, "acme")
    again = await service.create_tenant(parts.state, TenantCreate(id="acme"))
    assert again.status == "active" and (await service.list_adapters(parts.state, "acme")).data == []


async def test_a_tenant_being_deleted_is_listed_as_such(parts: Parts) -> None:
    await parts.tenants.begin_delete("acme")
    assert [(t.id, t.status) for t in (await service.list_tenants(parts.state)).data] == [("acme", "deleting")]


def test_a_null_name_is_refused_and_a_null_limit_means_none() -> None:
    with pytest.raises(ValidationError) as caught:
        TenantPatch.model_validate({"name": None})
    assert caught.value.errors()[0]["loc"] == ("name",)
    assert TenantPatch.model_validate({"rpm": None}).model_dump(exclude_unset=True) == {"rpm": None}
