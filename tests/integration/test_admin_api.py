"""The admin API on the real stack: tenants, keys, adapter uploads and their rejections."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import RunningStack, TenantHandle, upload


def _snapshot(stack: RunningStack, tenant_id: str) -> tuple[list[str], dict[str, object]]:
    r = stack.redis()
    keys = sorted(k.decode() for k in r.scan_iter("banyan:adapter:*") if tenant_id in k.decode())
    state = {k: r.hgetall(k) for k in keys}
    state[f"names:{tenant_id}"] = r.smembers(f"banyan:tenant:{tenant_id}:adapters")
    return stack.s3_keys(f"adapters/{tenant_id}/"), state


def _listed_ids(admin: httpx.Client) -> list[str]:
    """Every tenant id ``GET /admin/tenants`` lists, page by page."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": 1000}
    while True:
        listed = admin.get("/admin/tenants", params=params)
        assert listed.status_code == 200, listed.text
        ids += [t["id"] for t in listed.json()["data"]]
        if not listed.json()["has_more"]:
            return ids
        params["after"] = ids[-1]


def test_tenant_crud(admin: httpx.Client) -> None:
    response = admin.post("/admin/tenants", json={"id": "crud-co", "name": "Crud Co", "rpm": 60})
    assert response.status_code == 201, response.text
    assert response.json()["rpm"] == 60
    assert admin.post("/admin/tenants", json={"id": "crud-co"}).json()["error"]["type"] == "conflict_error"
    assert "crud-co" in _listed_ids(admin)
    patched = admin.patch("/admin/tenants/crud-co", json={"tpm": 1000})
    assert patched.status_code == 200 and patched.json()["tpm"] == 1000 and patched.json()["rpm"] == 60
    assert admin.get("/admin/tenants/crud-co").json()["name"] == "Crud Co"
    assert admin.delete("/admin/tenants/crud-co").status_code == 200
    missing = admin.get("/admin/tenants/crud-co")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_patching_a_name_to_null_is_400_and_the_list_still_answers(admin: httpx.Client,
                                                                  tenant: TenantHandle) -> None:
    refused = admin.patch(f"/admin/tenants/{tenant.id}", json={"name": None})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "name"
    unlimited = admin.patch(f"/admin/tenants/{tenant.id}", json={"rpm": None})  # a null limit: no limit
    assert unlimited.status_code == 200 and unlimited.json()["rpm"] is None
    assert tenant.id in _listed_ids(admin)
    assert admin.get(f"/admin/tenants/{tenant.id}").json()["name"] == tenant.id


@pytest.mark.parametrize("bad_id", ["Upper", "-lead", "has space", "a" * 64, "dots.no", "under_score"])
def test_invalid_tenant_ids_are_400(admin: httpx.Client, bad_id: str) -> None:
    response = admin.post("/admin/tenants", json={"id": bad_id})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_upload_versions_and_metadata(admin: httpx.Client, tenant: TenantHandle, stack: RunningStack,
                                      peft_adapters: dict[str, Path]) -> None:
    first = upload(admin, tenant.id, "writer", peft_adapters["beta"])
    assert first.status_code == 201, first.text
    body = first.json()
    config = json.loads((peft_adapters["beta"] / "adapter_config.json").read_text())
    assert body["version"] == 1 and body["active"] is True and body["rank"] == config["r"] == 16
    assert body["alpha"] == config["lora_alpha"]
    assert body["target_modules"] == sorted(config["target_modules"])
    assert len(body["sha256"]) == 64 and body["size_bytes"] > 0
    second = upload(admin, tenant.id, "writer", peft_adapters["alpha"], activate="false")
    assert second.status_code == 201 and second.json()["version"] == 2 and second.json()["active"] is False
    keys = stack.s3_keys(f"adapters/{tenant.id}/writer/")
    folders = {k.rsplit("/", 2)[-2] for k in keys}  # v<N>-<upload uid>
    assert len(folders) == 2 and {f.split("-")[0] for f in folders} == {"v1", "v2"}
    detail = admin.get(f"/admin/tenants/{tenant.id}/adapters/writer").json()
    assert detail["active_version"] == 1 and [v["version"] for v in detail["versions"]] == [1, 2]
    listed = admin.get(f"/admin/tenants/{tenant.id}/adapters").json()["data"]
    assert [(a["name"], a["active_version"]) for a in listed] == [("writer", 1)]


def test_upload_as_archive(admin: httpx.Client, tenant: TenantHandle, peft_adapters: dict[str, Path]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(peft_adapters["gamma"] / f, arcname=f"my-adapter/{f}")
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "packed"},
                          files={"archive": ("my-adapter.tar.gz", buffer.getvalue(), "application/gzip")})
    assert response.status_code == 201, response.text
    assert tenant.client().completions.create(model="packed", prompt="hi", max_tokens=3).model == "packed"


def _files(folder: Path, names: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (n, (folder / n).read_bytes() if (folder / n).exists() else b"\x80\x04K\x01.",
                       "application/octet-stream")) for n in names]


@pytest.mark.parametrize("case", ["missing_weights", "pickle_bin", "bad_name", "no_files", "bad_json_config"])
def test_rejected_uploads_store_nothing(case: str, admin: httpx.Client, tenant: TenantHandle, stack: RunningStack,
                                        peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = peft_adapters["alpha"]
    name = "rejected"
    data = {"name": name}
    if case == "missing_weights":
        files = _files(folder, ["adapter_config.json"])
    elif case == "pickle_bin":
        files = _files(folder, ["adapter_config.json", "adapter_model.bin"])
    elif case == "bad_name":
        data = {"name": "Bad/Name"}
        files = _files(folder, ["adapter_config.json", "adapter_model.safetensors"])
    elif case == "no_files":
        files = []
    else:
        (tmp_path / "adapter_config.json").write_text("{not json")
        (tmp_path / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        files = _files(tmp_path, ["adapter_config.json", "adapter_model.safetensors"])
    before = _snapshot(stack, tenant.id)
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data=data, files=files or {"x": ("", b"", "")})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert _snapshot(stack, tenant.id) == before
    assert admin.get(f"/admin/tenants/{tenant.id}/adapters/{name}").status_code == 404


def test_upload_for_unknown_tenant_is_404(admin: httpx.Client, peft_adapters: dict[str, Path]) -> None:
    response = upload(admin, "no-such-tenant", "x", peft_adapters["alpha"])
    assert response.status_code == 404


def test_oversized_upload_is_413(admin: httpx.Client, tenant: TenantHandle, stack: RunningStack) -> None:
    big = b"\0" * (65 * 1024 * 1024)
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "huge"},
                          files=[("files", ("adapter_model.safetensors", big, "application/octet-stream"))])
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert stack.s3_keys(f"adapters/{tenant.id}/") == []


def test_activate_and_delete_adapter(admin: httpx.Client, tenant: TenantHandle, stack: RunningStack,
                                     peft_adapters: dict[str, Path]) -> None:
    assert upload(admin, tenant.id, "flip", peft_adapters["alpha"]).status_code == 201
    assert upload(admin, tenant.id, "flip", peft_adapters["gamma"]).status_code == 201
    with tenant.http() as http:
        served = http.post("/v1/completions", json={"model": "flip", "prompt": "a", "max_tokens": 2})
        assert served.headers["x-banyan-adapter-version"] == "2"
        rolled = admin.post(f"/admin/tenants/{tenant.id}/adapters/flip/activate", json={"version": 1})
        assert rolled.status_code == 200 and rolled.json()["active_version"] == 1
        served = http.post("/v1/completions", json={"model": "flip", "prompt": "a", "max_tokens": 2})
        assert served.headers["x-banyan-adapter-version"] == "1"
        assert admin.post(f"/admin/tenants/{tenant.id}/adapters/flip/activate",
                          json={"version": 9}).status_code == 404
        assert admin.delete(f"/admin/tenants/{tenant.id}/adapters/flip").status_code == 200
        gone = http.post("/v1/completions", json={"model": "flip", "prompt": "a", "max_tokens": 2})
        assert gone.status_code == 404
    assert stack.s3_keys(f"adapters/{tenant.id}/flip/") == []
