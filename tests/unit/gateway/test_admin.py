"""The admin service on the shared in-memory fakes of the state (``fakes`` in conftest.py) and a real engine pool
on a recording transport: what each operation changes, what it answers, and that it reads a record once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.layout import WEIGHTS_FILE, object_key
from adapters.naming import AdapterRef
from adapters.store import StoreUnavailable
from gateway.admin import service
from gateway.admin.protocol import KeyCreate, TenantCreate, TenantPatch
from gateway.errors import Conflict, NotFound
from gateway.usage import Counts
from retrieval.documents import NewDocument
from tests.unit.gateway.conftest import Fakes, version_meta


def _ref(name: str, version: int) -> AdapterRef:
    return AdapterRef("acme", name, version, version_meta(version).uid)


def _store_files(fakes: Fakes, *refs: AdapterRef) -> list[str]:
    keys = [object_key(ref, WEIGHTS_FILE) for ref in refs]
    fakes.store.objects.update(dict.fromkeys(keys, b"weights"))
    return keys


async def test_create_tenant_answers_the_tenant_and_refuses_a_taken_id(fakes: Fakes) -> None:
    created = await service.create_tenant(fakes.state, TenantCreate(id="globex", tpm=1000))
    assert (created.id, created.name, created.tpm, created.rpm) == ("globex", "globex", 1000, None)
    with pytest.raises(Conflict):
        await service.create_tenant(fakes.state, TenantCreate(id="acme"))


async def test_update_tenant_reads_once_and_changes_only_what_was_sent(fakes: Fakes) -> None:
    updated = await service.update_tenant(fakes.state, "acme", body=TenantPatch(tpm=500))
    assert (updated.name, updated.rpm, updated.tpm) == ("Acme", 60, 500)
    assert fakes.tenants.calls == ["update"]


@pytest.mark.parametrize("tenant_id", ["nobody", "Not-An-Id"])
async def test_update_of_a_missing_tenant_is_not_found(fakes: Fakes, tenant_id: str) -> None:
    with pytest.raises(NotFound) as caught:
        await service.update_tenant(fakes.state, tenant_id, body=TenantPatch(rpm=1))
    assert caught.value.param == "tenant_id"


async def test_keys_are_created_with_their_secret_once_and_revoked(fakes: Fakes) -> None:
    created = await service.create_key(fakes.state, "acme", body=KeyCreate(name="ci"))
    assert created.name == "ci" and created.prefix == created.key[:7]
    assert await fakes.tenants.authenticate(created.key) == "acme"
    listed = (await service.list_keys(fakes.state, "acme")).data
    assert [(k.key_id, k.prefix) for k in listed] == [(created.key_id, created.prefix)]
    assert (await service.revoke_key(fakes.state, "acme", key_id=created.key_id)).deleted
    assert await fakes.tenants.authenticate(created.key) is None
    with pytest.raises(NotFound):
        await service.revoke_key(fakes.state, "acme", key_id=created.key_id)
    with pytest.raises(NotFound):
        await service.create_key(fakes.state, "nobody", body=KeyCreate())


async def test_usage_counts_total_tokens(fakes: Fakes) -> None:
    for prompt, completion in ((4, 2), (3, 2), (3, 1)):
        await fakes.usage.record("acme", model="bot", prompt_tokens=prompt, completion_tokens=completion)
    await fakes.usage.record("globex", model="bot", prompt_tokens=100, completion_tokens=100)
    usage = await service.tenant_usage(fakes.state, "acme")
    assert usage.total.total_tokens == 15 and usage.models["bot"].requests == 3


async def test_activate_answers_the_new_active_version_from_one_read(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1, 2], active=2)
    out = await service.activate_version(fakes.state, "acme", name="bot", version=1)
    assert out.active_version == 1 and [v.active for v in out.versions] == [True, False]
    assert fakes.adapters.records[("acme", "bot")].active == 1
    assert fakes.adapters.gets == 1
    assert await fakes.engine.warmed(fakes.state.engines) == ["banyan.acme.bot.v1.uid000000001"]


async def test_activating_a_missing_version_changes_nothing(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1, 2], active=2)
    with pytest.raises(NotFound) as caught:
        await service.activate_version(fakes.state, "acme", name="bot", version=9)
    assert caught.value.param == "version"
    assert fakes.adapters.records[("acme", "bot")].active == 2
    assert await fakes.engine.warmed(fakes.state.engines) == []


async def test_delete_adapter_removes_it_from_registry_engines_and_storage(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1, 2], active=2)
    fakes.adapters.add("acme", "bot-2", [1], active=1)
    _store_files(fakes, _ref("bot", 1), _ref("bot", 2))
    # Another adapter, and an upload of the same name that commits meanwhile (files, not yet recorded).
    kept = _store_files(fakes, _ref("bot-2", 1), _ref("bot", 3))
    assert (await service.delete_adapter(fakes.state, "acme", name="bot")).deleted
    assert list(fakes.adapters.records) == [("acme", "bot-2")]
    names = ["banyan.acme.bot.v1.uid000000001", "banyan.acme.bot.v2.uid000000002"]
    assert [body["lora_name"] for body in fakes.engine.bodies("/v1/unload_lora_adapter")] == names
    assert sorted(fakes.store.objects) == sorted(kept)  # only the files of the versions it removed
    assert fakes.adapters.pending == {}  # the sweep's marks, cleared once the files are gone
    with pytest.raises(NotFound):
        await service.get_adapter(fakes.state, "acme", name="bot")


async def test_activating_a_version_recorded_after_the_read_succeeds(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1], active=1)
    fakes.adapters.after_get.append(lambda: fakes.adapters.add("acme", "bot", [1, 2], active=1))
    out = await service.activate_version(fakes.state, "acme", name="bot", version=2)
    assert out.active_version == 2 and [v.version for v in out.versions] == [1, 2]
    assert fakes.adapters.records[("acme", "bot")].active == 2


async def test_activating_an_adapter_deleted_after_the_read_is_not_found(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1, 2], active=2)
    fakes.adapters.after_get.append(lambda: fakes.adapters.records.clear())
    with pytest.raises(NotFound):
        await service.activate_version(fakes.state, "acme", name="bot", version=1)
    assert fakes.adapters.records == {}
    assert await fakes.engine.warmed(fakes.state.engines) == []


async def test_a_delete_that_failed_midway_is_finished_by_a_retry(fakes: Fakes) -> None:
    fakes.adapters.add("acme", "bot", [1, 2], active=2)
    _store_files(fakes, _ref("bot", 1), _ref("bot", 2))
    created = await fakes.tenants.create_key("acme", name="ci")
    assert created is not None
    await fakes.documents.add("acme", NewDocument(text="Parking is on level 2."))
    await fakes.usage.record("acme", model="bot", prompt_tokens=3, completion_tokens=2)
    fakes.store.failures = 1  # object storage fails once, after the registry let go of the versions
    with pytest.raises(StoreUnavailable):
        await service.delete_tenant(fakes.state, "acme")
    # The tombstone stands: keys are revoked, and nothing new can be added for the tenant meanwhile.
    assert (await service.get_tenant(fakes.state, "acme")).status == "deleting"
    assert await fakes.tenants.authenticate(created[1]) is None
    with pytest.raises(Conflict) as caught:
        await service.create_tenant(fakes.state, TenantCreate(id="acme"))
    assert "being deleted" in caught.value.message and caught.value.param == "id"
    with pytest.raises(Conflict):
        await service.create_key(fakes.state, "acme", body=KeyCreate(name="late"))
    with pytest.raises(Conflict):
        await service.upload_adapter(fakes.state, "acme", name="late", files=[], archive=None, activate=True)
    with pytest.raises(Conflict):
        await service.update_tenant(fakes.state, "acme", body=TenantPatch(rpm=5))
    # Repeating the delete continues the cleanup (instead of 404) and removes the record last.
    assert (await service.delete_tenant(fakes.state, "acme")).deleted
    assert fakes.tenants.tenants == {} and fakes.adapters.records == {} and fakes.store.objects == {}
    assert fakes.documents.documents == {} and (await fakes.usage.get("acme")).total == Counts()
    # The versions the failed attempt took out of the registry are left to the sweep, which forgets them.
    assert await service.sweep_abandoned_uploads(fakes.state, older_than_s=60) == 2
    assert fakes.adapters.pending == {}
    with pytest.raises(NotFound):
        await service.delete_tenant(fakes.state, "acme")
    again = await service.create_tenant(fakes.state, TenantCreate(id="acme"))
    assert again.status == "active" and (await service.list_adapters(fakes.state, "acme")).data == []


async def test_a_tenant_being_deleted_is_listed_as_such(fakes: Fakes) -> None:
    await fakes.tenants.begin_delete("acme")
    listed = (await service.list_tenants(fakes.state, limit=10)).data
    assert [(t.id, t.status) for t in listed] == [("acme", "deleting")]


def test_a_null_name_is_refused_and_a_null_limit_means_none() -> None:
    with pytest.raises(ValidationError) as caught:
        TenantPatch.model_validate({"name": None})
    assert caught.value.errors()[0]["loc"] == ("name",)
    assert TenantPatch.model_validate({"rpm": None}).model_dump(exclude_unset=True) == {"rpm": None}
