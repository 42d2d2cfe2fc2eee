"""The adapter lifecycle on the real stack: rejections that store nothing, versions and rollback with
outputs compared to PEFT, in-flight requests keeping their version, abandoned uploads, and churn."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
from pydantic import SecretStr

from adapters.layout import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, version_prefix
from adapters.naming import AdapterRef
from gateway.admin.service import sweep_abandoned_uploads
from gateway.app import build_state
from gateway.dev.demo_model import synthetic_variant
from gateway.settings import Settings
from tests.integration.adapter_files import (
    MUTATIONS,
    copy_adapter,
    tar_gz,
    zip_bytes,
)
from tests.integration.conftest import CACHE_MAX_BYTES, RunningStack, TenantHandle, make_tenant, upload
from tests.integration.test_correctness import peft_greedy


def _state_of(stack: RunningStack, tenant_id: str) -> tuple[list[str], dict[str, object]]:
    r = stack.redis()
    keys = sorted(k.decode() for k in r.scan_iter(f"banyan:adapter:{tenant_id}:*"))
    state: dict[str, object] = {k: r.hgetall(k) for k in keys}
    state["names"] = r.smembers(f"banyan:tenant:{tenant_id}:adapters")
    state["pending"] = r.zrange("banyan:uploads:pending", 0, -1)
    return stack.s3_keys(f"adapters/{tenant_id}/"), state


@pytest.fixture(scope="module")
def lifecycle_tenant(stack: RunningStack, admin: httpx.Client) -> TenantHandle:
    return make_tenant(stack, admin, "life")


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_invalid_adapter_is_rejected_and_nothing_is_stored(
        mutation: str, stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(peft_adapters["alpha"], tmp_path / "bad")
    MUTATIONS[mutation](folder)
    before = _state_of(stack, lifecycle_tenant.id)
    response = upload(admin, lifecycle_tenant.id, "broken", folder)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] and error["message"]
    assert _state_of(stack, lifecycle_tenant.id) == before


def _archive_cases(folder: Path) -> dict[str, tuple[str, bytes, int]]:
    good = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
    config = {CONFIG_FILE: good[CONFIG_FILE]}
    return {
        "dotdot_member": ("a.tar.gz", tar_gz({**good, "../escape.txt": b"x"}), 400),
        "absolute_member": ("a.tar.gz", tar_gz({**good, "/etc/banyan.txt": b"x"}), 400),
        "symlink_member": ("a.tar.gz", tar_gz(good, symlink=("link", "/etc/passwd")), 400),
        "extra_unknown_file": ("a.zip", zip_bytes({**good, "notes.exe": b"MZ"}), 400),
        "pickle_weights": ("a.zip", zip_bytes({**config, "adapter_model.bin": b"\x80\x04K\x01."}), 400),
        "zip_bomb": ("a.zip", zip_bytes({**config, WEIGHTS_FILE: b"\0" * (70 * 1024 * 1024)}), 413),
        "not_an_archive": ("a.tar.gz", b"plain bytes, no archive", 400),
    }


@pytest.mark.parametrize("case", ["dotdot_member", "absolute_member", "symlink_member", "extra_unknown_file",
                                  "pickle_weights", "zip_bomb", "not_an_archive"])
def test_unsafe_archives_are_rejected_and_nothing_is_stored(
        case: str, stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path]) -> None:
    filename, data, status = _archive_cases(peft_adapters["alpha"])[case]
    before = _state_of(stack, lifecycle_tenant.id)
    response = admin.post(f"/admin/tenants/{lifecycle_tenant.id}/adapters", data={"name": "packed-bad"},
                          files={"archive": (filename, data, "application/octet-stream")})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert _state_of(stack, lifecycle_tenant.id) == before


def test_versions_rollback_and_staging_serve_the_right_weights(
        stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path]) -> None:
    tenant, prompts = lifecycle_tenant, ["Roll back", "forward!"]
    want = {v: peft_greedy(stack.model_path, peft_adapters[n], prompts) for v, n in ((1, "alpha"), (2, "beta"))}

    def served() -> tuple[str, list[str]]:
        outputs, version = [], ""
        with tenant.http() as http:
            for prompt in prompts:
                r = http.post("/v1/completions", json={"model": "versioned", "prompt": prompt, "max_tokens": 20,
                                                       "temperature": 0})
                assert r.status_code == 200, r.text
                version = r.headers["x-banyan-adapter-version"]
                outputs.append(r.json()["choices"][0]["text"])
        return version, outputs

    assert upload(admin, tenant.id, "versioned", peft_adapters["alpha"]).status_code == 201
    assert served() == ("1", want[1])
    staged = upload(admin, tenant.id, "versioned", peft_adapters["beta"], activate="false")
    assert staged.status_code == 201 and staged.json()["active"] is False
    assert served() == ("1", want[1])  # staged, not serving
    base = f"/admin/tenants/{tenant.id}/adapters/versioned"
    assert admin.post(base + "/activate", json={"version": 2}).json()["active_version"] == 2
    assert served() == ("2", want[2])
    assert admin.post(base + "/activate", json={"version": 1}).json()["active_version"] == 1
    assert served() == ("1", want[1])  # rollback
    assert admin.post(base + "/activate", json={"version": 2}).status_code == 200
    assert served() == ("2", want[2])  # roll forward


def test_request_started_on_v1_finishes_on_v1_while_v2_is_activated(
        stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path]) -> None:
    tenant, prompt, tokens = lifecycle_tenant, "A long answer, please:", 400
    assert upload(admin, tenant.id, "inflight", peft_adapters["alpha"]).status_code == 201
    assert upload(admin, tenant.id, "inflight", peft_adapters["beta"], activate="false").status_code == 201
    with tenant.http() as http, http.stream("POST", "/v1/completions", json={
            "model": "inflight", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}) as stream:
        assert stream.headers["x-banyan-adapter-version"] == "1"
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The request is running on v1 now; activate v2 under it.
        activated = admin.post(f"/admin/tenants/{tenant.id}/adapters/inflight/activate", json={"version": 2})
        assert activated.status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
        during = http.post("/v1/completions", json={"model": "inflight", "prompt": prompt, "max_tokens": 5})
        assert during.headers["x-banyan-adapter-version"] == "2"
    events = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert len(text) == tokens
    expected = peft_greedy(stack.model_path, peft_adapters["alpha"], [prompt], max_new_tokens=tokens)[0]
    assert text == expected


async def test_files_of_an_abandoned_upload_are_swept(stack: RunningStack, lifecycle_tenant: TenantHandle) -> None:
    info = stack.info
    ref = AdapterRef(lifecycle_tenant.id, "crashed", 7, "deadbeef0001")
    s3 = boto3.client("s3", endpoint_url=info["s3_endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="banyan-dev", aws_secret_access_key="banyan-dev-secret")
    s3.put_object(Bucket=info["s3_bucket"], Key=version_prefix(ref) + WEIGHTS_FILE, Body=b"half written")
    stack.redis().zadd("banyan:uploads:pending", {f"{ref.tenant}/{ref.name}/7/{ref.uid}": time.time() - 3600})
    settings = Settings(mode="dev", admin_key=SecretStr(stack.admin_key), redis_url=info["redis_url"],
                        s3_endpoint_url=info["s3_endpoint_url"], s3_bucket=info["s3_bucket"],
                        s3_access_key_id=SecretStr("banyan-dev"), s3_secret_access_key=SecretStr("banyan-dev-secret"),
                        engine_urls=[info["engine_url"]], engine_api_key=SecretStr(info["engine_api_key"]))
    state = build_state(settings)
    try:
        assert await sweep_abandoned_uploads(state, older_than_s=600) == 1
    finally:
        await state.engines.aclose()
        await state.redis.aclose()
    assert stack.s3_keys(version_prefix(ref)) == []
    assert stack.redis().zrange("banyan:uploads:pending", 0, -1) == []


def test_churn_of_200_adapters_has_no_errors_and_keeps_the_disk_bound(
        stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    tenants = [make_tenant(stack, admin, "churn") for _ in range(20)]
    adapters = []
    for i in range(200):
        tenant = tenants[i % len(tenants)]
        folder = synthetic_variant(peft_adapters["alpha"], tmp_path / f"a{i}", seed=1000 + i)
        adapters.append((tenant, f"user-{i}", folder))

    def put(job: tuple[TenantHandle, str, Path]) -> int:
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_key}"},
                          timeout=120) as client:
            return upload(client, job[0].id, job[1], job[2]).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(put, adapters)) == {201}
    evictions_before = stack.engine_metric("banyan_resolver_evictions_total")

    order = [*range(200), *random.Random(7).sample(range(200), 100)]  # every adapter cold once, then revisits

    def ask(i: int) -> tuple[int, int, str]:
        tenant, name, _ = adapters[i]
        with tenant.http() as http:
            r = http.post("/v1/completions", json={"model": name, "prompt": "churn", "max_tokens": 8,
                                                   "temperature": 0})
        return i, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, order))
    errors = [(i, text) for i, status, text in results if status != 200]
    assert errors == []
    # Outputs still equal PEFT's for a sample of the adapters.
    for i in (0, 77, 199):
        want = peft_greedy(stack.model_path, adapters[i][2], ["churn"], max_new_tokens=8)[0]
        assert {text for j, _, text in results if j == i} == {want}
    assert stack.engine_metric("banyan_resolver_disk_cache_peak_bytes") <= CACHE_MAX_BYTES
    assert stack.engine_metric("banyan_resolver_evictions_total") > evictions_before
    gateway_metrics = httpx.get(stack.url + "/metrics").text
    assert 'banyan_adapter_unloads_total{result="ok"}' in gateway_metrics


def test_deleting_an_adapter_unloads_it_and_removes_its_files(
        stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path]) -> None:
    tenant = lifecycle_tenant
    created = upload(admin, tenant.id, "short-lived", peft_adapters["gamma"])
    assert created.status_code == 201
    with tenant.http() as http:
        assert http.post("/v1/completions", json={"model": "short-lived", "prompt": "x", "max_tokens": 2}).is_success
    loaded = {m["id"] for m in httpx.get(stack.engine_url + "/v1/models", headers=stack.engine_headers).json()["data"]}
    assert any(".short-lived." in name for name in loaded)
    assert admin.delete(f"/admin/tenants/{tenant.id}/adapters/short-lived").status_code == 200
    loaded = {m["id"] for m in httpx.get(stack.engine_url + "/v1/models", headers=stack.engine_headers).json()["data"]}
    assert not any(".short-lived." in name for name in loaded)
    assert stack.s3_keys(f"adapters/{tenant.id}/short-lived/") == []


def test_an_adapter_that_cannot_load_fails_fast(stack: RunningStack, admin: httpx.Client,
                                                lifecycle_tenant: TenantHandle, peft_adapters: dict[str, Path]) -> None:
    tenant = lifecycle_tenant
    staged = upload(admin, tenant.id, "vanishing", peft_adapters["gamma"], activate="false")  # not prefetched
    assert staged.status_code == 201
    s3 = boto3.client("s3", endpoint_url=stack.info["s3_endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="banyan-dev", aws_secret_access_key="banyan-dev-secret")
    for key in stack.s3_keys(f"adapters/{tenant.id}/vanishing/"):  # storage lost the files behind our back
        s3.delete_object(Bucket=stack.info["s3_bucket"], Key=key)
    activated = admin.post(f"/admin/tenants/{tenant.id}/adapters/vanishing/activate", json={"version": 1})
    assert activated.status_code == 200
    remembered = stack.engine_metric("banyan_resolver_adapter_loads_total", stage="fetch", result="failed_recently")
    with tenant.http() as http:
        for _ in range(3):
            r = http.post("/v1/completions", json={"model": "vanishing", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    # The failure was remembered: later attempts did not go back to object storage.
    after = stack.engine_metric("banyan_resolver_adapter_loads_total", stage="fetch", result="failed_recently")
    assert after >= remembered + 2


def test_versions_continue_after_a_delete_and_the_new_upload_serves(
        stack: RunningStack, admin: httpx.Client, lifecycle_tenant: TenantHandle,
        peft_adapters: dict[str, Path]) -> None:
    tenant = lifecycle_tenant
    first = upload(admin, tenant.id, "phoenix", peft_adapters["alpha"])
    assert first.status_code == 201 and first.json()["version"] == 1
    assert admin.delete(f"/admin/tenants/{tenant.id}/adapters/phoenix").status_code == 200
    again = upload(admin, tenant.id, "phoenix", peft_adapters["gamma"])
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 2  # never v1 again: v1 named other weights
    with tenant.http() as http:
        served = http.post("/v1/completions", json={"model": "phoenix", "prompt": "rise", "max_tokens": 6,
                                                    "temperature": 0})
    assert served.status_code == 200, served.text
    assert served.headers["x-banyan-adapter-version"] == "2"
    want = peft_greedy(stack.model_path, peft_adapters["gamma"], ["rise"], max_new_tokens=6)[0]
    assert served.json()["choices"][0]["text"] == want
    # The files are in the upload's own folder, named by the uid the engine name carries.
    loaded = [m["id"] for m in httpx.get(stack.engine_url + "/v1/models", headers=stack.engine_headers).json()["data"]]
    ref = next(r for r in map(AdapterRef.from_engine_name, loaded) if r and r.tenant == tenant.id
               and r.name == "phoenix")
    assert ref.version == 2
    assert sorted(stack.s3_keys(f"adapters/{tenant.id}/phoenix/")) == sorted(
        version_prefix(ref) + f for f in (*ADAPTER_FILES, "manifest.json"))
    assert stack.redis().zrange("banyan:uploads:pending", 0, -1) == []
