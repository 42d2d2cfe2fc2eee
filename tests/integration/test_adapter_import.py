"""Adapters as users bring them, on the real stack (#11 items 1, 2, 5): a PEFT ``save_pretrained`` folder with its
tokenizer and trainer files uploads as it is, ``.bin`` weights are refused, an ``s3://`` import stores a version that
serves exactly like PEFT, and a bulk import of a few dozen adapters reports each item and serves the good ones."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.layout import ADAPTER_FILES, CONFIG_FILE
from adapters.store import make_s3_client, s3_config
from gateway.dev.demo_model import build_adapter, synthetic_variant
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant
from tests.integration.test_correctness import MAX_TOKENS, PROMPTS, peft_greedy

SOURCE_BUCKET = "import-sources"
PICKLE = b"\x80\x04K\x01."  # a pickle: never opened by the gateway


@pytest.fixture(scope="module")
def trainer_folder(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``save_pretrained`` folder (PEFT on the stack's model: it writes a README.md too), with the tokenizer
    saved into it and what a trainer leaves beside it."""
    from transformers import AutoTokenizer

    folder = build_adapter(stack.model_path, tmp_path_factory.mktemp("trainer") / "output", seed=44, rank=8)
    AutoTokenizer.from_pretrained(stack.model_path).save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(PICKLE)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    checkpoint = folder / "checkpoint-10"
    checkpoint.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(folder / name, checkpoint / name)
    (checkpoint / "optimizer.pt").write_bytes(PICKLE)
    return folder


def _side_files(folder: Path) -> list[str]:
    """What an upload of ``folder`` reports as ignored: everything but the adapter's two files, folders once."""
    reported = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ADAPTER_FILES)
    assert {"README.md", "tokenizer.json", "tokenizer_config.json", "training_args.bin", "checkpoint-10/"} <= set(
        reported)  # what the tokenizer and PEFT wrote
    return reported


def _all_files(folder: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())


def _s3(stack: RunningStack) -> Any:
    client = make_s3_client(s3_config(stack.s3_settings()))
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=SOURCE_BUCKET)
    return client


def _put_folder(stack: RunningStack, folder: Path, prefix: str, *, only: tuple[str, ...] | None = None) -> str:
    s3 = _s3(stack)
    for relative, path in _all_files(folder):
        if only is None or relative in only:
            s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + relative, Body=path.read_bytes())
    return f"s3://{SOURCE_BUCKET}/{prefix}"


def _import(admin: httpx.Client, tenant_id: str, body: dict[str, Any]) -> httpx.Response:
    return admin.post(f"/admin/tenants/{tenant_id}/adapters", json=body)


def _nothing_stored(stack: RunningStack, admin: httpx.Client, tenant_id: str) -> None:
    assert admin.get(f"/admin/tenants/{tenant_id}/adapters").json()["data"] == []
    assert stack.s3_keys(f"adapters/{tenant_id}/") == []


# -- a PEFT output folder as it is ---------------------------------------------------------------------------------


def test_a_save_pretrained_folder_uploads_as_it_is(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle,
                                                    trainer_folder: Path) -> None:
    assert (trainer_folder / "README.md").exists() and (trainer_folder / "tokenizer.json").exists()  # PEFT's own
    files = [("files", (relative, path.read_bytes(), "application/octet-stream"))
             for relative, path in _all_files(trainer_folder)]
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "as-is"}, files=files)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ignored_files"] == _side_files(trainer_folder)
    assert body["base_model"] == stack.info["base_model"] and body["version"] == 1
    stored = sorted(key.rsplit("/", 1)[1] for key in stack.s3_keys(f"adapters/{tenant.id}/as-is/"))
    assert stored == sorted([*ADAPTER_FILES, "manifest.json"])  # nothing else was kept

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(trainer_folder, arcname="output")
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "as-is"},
                          files={"archive": ("output.tar.gz", archive.getvalue(), "application/gzip")})
    assert response.status_code == 201, response.text
    assert response.json()["ignored_files"] == _side_files(trainer_folder) and response.json()["version"] == 2

    with tenant.http() as http:
        served = http.post("/v1/completions", json={"model": "as-is", "prompt": "Hi", "max_tokens": 4})
    assert served.status_code == 200, served.text


def test_bin_only_weights_are_refused_with_how_to_convert(admin: httpx.Client, tenant: TenantHandle,
                                                          stack: RunningStack, trainer_folder: Path) -> None:
    files = [("files", (CONFIG_FILE, (trainer_folder / CONFIG_FILE).read_bytes(), "application/json")),
             ("files", ("adapter_model.bin", PICKLE, "application/octet-stream")),
             ("files", ("tokenizer.json", (trainer_folder / "tokenizer.json").read_bytes(), "application/json"))]
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "pickled"}, files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsafe_weights_format"
    assert "adapter_model.bin" in error["message"] and "safe_serialization=True" in error["message"]
    _nothing_stored(stack, admin, tenant.id)


def test_an_unknown_file_beside_the_adapter_is_still_refused(admin: httpx.Client, tenant: TenantHandle,
                                                             trainer_folder: Path) -> None:
    files = [("files", (name, (trainer_folder / name).read_bytes(), "application/octet-stream"))
             for name in ADAPTER_FILES] + [("files", ("notes.txt", b"mine", "text/plain"))]
    response = admin.post(f"/admin/tenants/{tenant.id}/adapters", data={"name": "noted"}, files=files)
    assert response.status_code == 400 and "'notes.txt'" in response.json()["error"]["message"]


# -- register by reference -----------------------------------------------------------------------------------------


def test_an_s3_import_stores_a_version_that_serves_like_peft(stack: RunningStack, admin: httpx.Client,
                                                             tenant: TenantHandle, trainer_folder: Path) -> None:
    source = _put_folder(stack, trainer_folder, f"team-a/{tenant.id}/run-1/")
    response = _import(admin, tenant.id, {"name": "from-s3", "source": source,
                                          "base_model": stack.info["base_model"]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["version"] == 1 and body["active"] and body["ignored_files"] == _side_files(trainer_folder)
    assert body["base_model"] == stack.info["base_model"] and body["rank"] == 8

    expected = peft_greedy(stack.model_path, trainer_folder, PROMPTS[:4])
    assert expected != peft_greedy(stack.model_path, None, PROMPTS[:4])  # the adapter matters
    with tenant.http() as http:
        for prompt, want in zip(PROMPTS[:4], expected, strict=True):
            got = http.post("/v1/completions", json={"model": "from-s3", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0})
            assert got.status_code == 200, got.text
            assert got.headers["x-banyan-adapter-version"] == "1"
            assert got.json()["choices"][0]["text"] == want


def test_an_import_with_the_request_credentials(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle,
                                                trainer_folder: Path) -> None:
    source = _put_folder(stack, trainer_folder, f"creds/{tenant.id}/", only=ADAPTER_FILES)
    credentials = {"access_key_id": "someone-else", "secret_access_key": "their-secret-0123456789",
                   "endpoint_url": stack.info["s3_endpoint_url"], "region": "us-east-1"}
    response = _import(admin, tenant.id, {"name": "theirs", "source": source, "credentials": credentials})
    assert response.status_code == 201, response.text
    assert response.json()["ignored_files"] == []


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"source": "s3://no-such-bucket-here/x/"}, "source", "does not exist"),
    ({"source": f"s3://{SOURCE_BUCKET}/nothing-here/"}, "source", "nothing at"),
    ({"credentials": {"access_key_id": "k", "secret_access_key": "s", "endpoint_url": "http://127.0.0.1:9"}},
     "source", "could not be reached"),
    ({"base_model": "meta-llama/Llama-3.1-8B"}, "base_model", "is not served here"),
    ({"source": "https://example.com/adapter/"}, "source", "pattern"),
])
def test_an_import_that_cannot_happen_is_a_400_that_stores_nothing(change: dict[str, Any], param: str, words: str,
                                                                   stack: RunningStack, admin: httpx.Client,
                                                                   tenant: TenantHandle,
                                                                   trainer_folder: Path) -> None:
    source = _put_folder(stack, trainer_folder, f"bad/{tenant.id}/", only=ADAPTER_FILES)
    response = _import(admin, tenant.id, {"name": "bad", "source": source, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    _nothing_stored(stack, admin, tenant.id)


def test_an_adapter_for_another_base_says_which(stack: RunningStack, admin: httpx.Client, tenant: TenantHandle,
                                                 trainer_folder: Path, tmp_path: Path) -> None:
    folder = synthetic_variant(trainer_folder, tmp_path / "other", seed=5)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(base_model_name_or_path="org/bigger-model", layers_to_transform=[5])  # the stack's has 2 layers
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    response = _import(admin, tenant.id, {"name": "other", "source": _put_folder(stack, folder, f"o/{tenant.id}/")})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "'org/bigger-model'" in message and f"Banyan serves '{stack.info['base_model']}'" in message


# -- bulk import ---------------------------------------------------------------------------------------------------


def test_a_bulk_import_reports_each_item_and_serves_the_good_ones(stack: RunningStack, admin: httpx.Client,
                                                                   trainer_folder: Path, tmp_path: Path) -> None:
    tenants = [make_tenant(stack, admin, "bulk") for _ in range(3)]
    items: list[dict[str, Any]] = []
    for i in range(30):
        folder = synthetic_variant(trainer_folder, tmp_path / f"a{i}", seed=1000 + i)
        owner = tenants[i % 3]
        items.append({"tenant": owner.id, "name": f"user-{i}",
                      "source": _put_folder(stack, folder, f"fleet/{owner.id}/user-{i}/", only=ADAPTER_FILES)})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_FILE).write_bytes((trainer_folder / CONFIG_FILE).read_bytes())
    (pickled / "adapter_model.bin").write_bytes(PICKLE)
    bad = {5: {"source": f"s3://{SOURCE_BUCKET}/fleet/missing/"},
           17: {"source": _put_folder(stack, pickled, "fleet/pickled/")},
           23: {"tenant": "no-such-tenant"}}
    for index, change in bad.items():
        items[index].update(change)

    response = admin.post("/admin/imports", json={"items": items})
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["status"] == "in_progress" and started["counts"]["total"] == 30
    assert started["credentials"] == "gateway"

    deadline = time.monotonic() + 600
    while True:
        state = admin.get(f"/admin/imports/{started['id']}", params={"limit": 1000}).json()
        if state["status"] != "in_progress" or time.monotonic() > deadline:
            break
        assert state["counts"]["succeeded"] + state["counts"]["failed"] + state["counts"]["pending"] == 30
        time.sleep(1)
    assert state["status"] == "completed", state["counts"]
    assert state["counts"] == {"total": 30, "succeeded": 27, "failed": 3, "pending": 0}
    by_index = {item["index"]: item for item in state["data"]}
    assert sorted(by_index) == list(range(30)) and not state["has_more"]
    assert by_index[5]["error"]["param"] == "source"
    assert by_index[17]["error"]["code"] == "unsafe_weights_format"
    assert by_index[23]["error"]["type"] == "not_found_error"
    assert all(item["status"] == "succeeded" and item["version"] == 1 and item["active"]
               for index, item in by_index.items() if index not in bad)

    failed = admin.get(f"/admin/imports/{started['id']}", params={"status": "failed", "limit": 2}).json()
    assert [item["index"] for item in failed["data"]] == [5, 17] and failed["has_more"]
    after = admin.get(f"/admin/imports/{started['id']}", params={"status": "failed", "after": 17}).json()
    assert [item["index"] for item in after["data"]] == [23] and not after["has_more"]

    for index in (0, 13, 29):
        owner = next(t for t in tenants if t.id == items[index]["tenant"])
        with owner.http() as http:
            served = http.post("/v1/completions", json={"model": f"user-{index}", "prompt": "Hi", "max_tokens": 4})
        assert served.status_code == 200, served.text
        assert served.headers["x-banyan-adapter"] == f"user-{index}"


def test_a_bulk_import_is_checked_before_it_starts(admin: httpx.Client) -> None:
    response = admin.post("/admin/imports", json={"items": [{"tenant": "Bad Id", "name": "x", "source": "s3://b/"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "items.0.tenant"
    assert admin.get("/admin/imports/imp_" + "0" * 24).status_code == 404
