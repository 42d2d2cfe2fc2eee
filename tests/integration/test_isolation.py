"""Tenant isolation and key handling on the real stack."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import httpx
import openai
import pytest
import redis.asyncio

from adapters.naming import AdapterRef
from adapters.registry import AdapterRegistry, VersionMeta
from gateway.tenants import TenantStore
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant, upload


def test_another_tenants_adapter_is_invisible(stack: RunningStack, admin: httpx.Client,
                                              peft_adapters: dict[str, Path]) -> None:
    owner = make_tenant(stack, admin, "owner")
    other = make_tenant(stack, admin, "other")
    assert upload(admin, owner.id, "secret-sauce", peft_adapters["gamma"]).status_code == 201

    assert "secret-sauce" in {m.id for m in owner.client().models.list()}
    assert "secret-sauce" not in {m.id for m in other.client().models.list()}
    with pytest.raises(openai.NotFoundError) as info:
        other.client().completions.create(model="secret-sauce", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    # The owner's request works: same name, the owner's tenant.
    assert owner.client().completions.create(model="secret-sauce", prompt="x", max_tokens=2).model == "secret-sauce"


def test_internal_engine_names_are_not_models(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle,
                                              peft_adapters: dict[str, Path]) -> None:
    owner = make_tenant(stack, admin, "victim")
    created = upload(admin, owner.id, "private", peft_adapters["gamma"])
    assert created.status_code == 201
    # Even a guess of the internal name format never reaches the engine as-is.
    for guess in (f"banyan.{owner.id}.private.v1", f"{owner.id}/private", "../private"):
        with pytest.raises(openai.NotFoundError):
            tenant.client().completions.create(model=guess, prompt="x", max_tokens=2)


def test_revoked_key_is_401(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle) -> None:
    assert tenant.client().models.list().data
    listed = admin.get(f"/admin/tenants/{tenant.id}/keys").json()["data"]
    assert [k["key_id"] for k in listed] == [tenant.key_id]
    assert all("key" not in k and "hash" not in k for k in listed)
    assert admin.delete(f"/admin/tenants/{tenant.id}/keys/{tenant.key_id}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        tenant.client().models.list()


def test_admin_key_on_tenant_routes_is_401(stack: RunningStack) -> None:
    response = httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {stack.admin_key}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_tenant_key_on_admin_routes_is_401(stack: RunningStack, tenant: TenantHandle) -> None:
    for method, path in (("GET", "/admin/tenants"), ("POST", f"/admin/tenants/{tenant.id}/keys"),
                         ("GET", f"/admin/tenants/{tenant.id}/adapters")):
        response = httpx.request(method, stack.url + path, headers={"Authorization": f"Bearer {tenant.key}"},
                                 json={"name": "x"})
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"


def test_deleting_a_tenant_revokes_keys_and_removes_adapters(stack: RunningStack, admin: httpx.Client,
                                                             peft_adapters: dict[str, Path]) -> None:
    doomed = make_tenant(stack, admin, "doomed")
    assert upload(admin, doomed.id, "a1", peft_adapters["gamma"]).status_code == 201
    assert stack.s3_keys(f"adapters/{doomed.id}/")
    assert admin.delete(f"/admin/tenants/{doomed.id}").status_code == 200
    assert admin.get(f"/admin/tenants/{doomed.id}").status_code == 404
    assert stack.s3_keys(f"adapters/{doomed.id}/") == []
    assert not list(stack.redis().scan_iter(f"banyan:*{doomed.id}*"))
    with pytest.raises(openai.AuthenticationError):
        doomed.client().models.list()


def _create_again(stack: RunningStack, admin: httpx.Client, tenant_id: str) -> TenantHandle:
    assert admin.post("/admin/tenants", json={"id": tenant_id}).status_code == 201
    key = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "again"})
    assert key.status_code == 201, key.text
    return TenantHandle(id=tenant_id, key=key.json()["key"], key_id=key.json()["key_id"], url=stack.url)


def test_a_tenant_created_again_inherits_nothing(stack: RunningStack, admin: httpx.Client,
                                                 peft_adapters: dict[str, Path]) -> None:
    old = make_tenant(stack, admin, "reborn")
    assert upload(admin, old.id, "secret-model", peft_adapters["gamma"]).status_code == 201
    with old.http() as http:
        assert http.post("/v1/documents", json={"title": "vault", "text": "The vault code is 4711."}).status_code == 201
        assert http.post("/v1/completions", json={"model": "secret-model", "prompt": "x", "max_tokens": 2}).is_success
    assert admin.delete(f"/admin/tenants/{old.id}").status_code == 200

    new = _create_again(stack, admin, old.id)
    assert [m.id for m in new.client().models.list() if m.owned_by == new.id] == []
    with new.http() as http:
        served = http.post("/v1/completions", json={"model": "secret-model", "prompt": "x", "max_tokens": 2})
        assert served.status_code == 404 and "x-banyan-adapter" not in served.headers
        assert http.get("/v1/documents").json()["data"] == []
        assert http.post("/v1/retrieve", json={"query": "vault code"}).json()["data"] == []
    assert admin.get(f"/admin/tenants/{new.id}/adapters").json()["data"] == []
    with pytest.raises(openai.AuthenticationError):
        old.client().models.list()
    # A new upload starts a new life: version 1, in a folder of its own.
    again = upload(admin, new.id, "secret-model", peft_adapters["alpha"])
    assert again.status_code == 201 and again.json()["version"] == 1


def test_a_delete_that_did_not_finish_blocks_the_tenant_until_repeated(
        stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path]) -> None:
    doomed = make_tenant(stack, admin, "half")
    assert upload(admin, doomed.id, "kept", peft_adapters["gamma"]).status_code == 201
    # What a delete that failed right after its first step leaves: the tombstone, everything else still there.
    stack.redis().hset(f"banyan:tenant:{doomed.id}", "deleting", "true")
    assert admin.get(f"/admin/tenants/{doomed.id}").json()["status"] == "deleting"
    with pytest.raises(openai.AuthenticationError):  # its keys no longer authenticate: no new documents
        doomed.client().models.list()
    with doomed.http() as http:
        assert http.post("/v1/documents", json={"text": "late"}).status_code == 401
    refused = admin.post("/admin/tenants", json={"id": doomed.id})
    assert refused.status_code == 409 and "being deleted" in refused.json()["error"]["message"]
    assert admin.post(f"/admin/tenants/{doomed.id}/keys", json={"name": "late"}).status_code == 409
    assert upload(admin, doomed.id, "late", peft_adapters["alpha"]).status_code == 409

    assert admin.delete(f"/admin/tenants/{doomed.id}").status_code == 200  # continues instead of 404
    assert admin.get(f"/admin/tenants/{doomed.id}").status_code == 404
    assert stack.s3_keys(f"adapters/{doomed.id}/") == []
    assert not list(stack.redis().scan_iter(f"banyan:*{doomed.id}*"))
    assert admin.delete(f"/admin/tenants/{doomed.id}").status_code == 404
    assert _create_again(stack, admin, doomed.id).client().models.list().data


async def test_nothing_commits_for_a_tenant_being_deleted_or_created_again(stack: RunningStack) -> None:
    client = redis.asyncio.Redis.from_url(stack.info["redis_url"])
    tenants, registry = TenantStore(client), AdapterRegistry(client)
    try:
        tenant = await tenants.create(f"fence-{secrets.token_hex(4)}", name="f", limits={})
        assert tenant is not None
        meta = VersionMeta(version=1, uid="0123456789ab", sha256="0" * 64, rank=4, alpha=8.0,
                           target_modules=["q_proj"], size_bytes=1, created=1)
        fence = tenants.fence(tenant)  # taken when the upload started
        assert await registry.record_version(tenant.id, "a", meta, activate=True, fence=fence)
        created = await tenants.create_key(tenant.id, name="k")
        assert created is not None and await tenants.authenticate(created[1]) == tenant.id

        assert await tenants.begin_delete(tenant.id) is not None
        assert await tenants.authenticate(created[1]) is None
        assert await tenants.create_key(tenant.id, name="late") is None
        assert await tenants.update(tenant.id, {"rpm": 5}) is None
        assert await tenants.create(tenant.id, name="again", limits={}) is None
        late = dataclasses.replace(meta, version=2, uid="ba9876543210")
        assert not await registry.record_version(tenant.id, "a", late, activate=True, fence=fence)

        await registry.delete_tenant(tenant.id)
        await tenants.finish_delete(tenant.id)
        assert await tenants.create(tenant.id, name="again", limits={}) is not None
        # An upload that started before the delete cannot commit into the tenant created again either.
        assert not await registry.record_version(tenant.id, "a", late, activate=True, fence=fence)
        assert await registry.get(tenant.id, "a") is None
        assert await registry.is_recorded(AdapterRef(tenant.id, "a", 2, "ba9876543210")) is False
        await tenants.begin_delete(tenant.id)
        await tenants.finish_delete(tenant.id)
    finally:
        await client.aclose()
