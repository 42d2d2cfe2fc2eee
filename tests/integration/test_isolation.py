"""Tenant isolation and key handling on the real stack."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

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
