"""One real stack for the whole test session, started the way a user starts it: ``banyan dev --empty``
(Valkey with the search module, moto S3, vLLM on the CPU, the gateway), stopped with SIGINT at the end."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import openai
import pytest
import redis

from gateway.dev.demo_model import build_adapter
from gateway.dev.processes import free_port

READY_LINE = "banyan dev is ready"
CACHE_MAX_BYTES = 12 * 1024 * 1024
STACK_TIMEOUT_S = 420


@dataclass
class RunningStack:
    url: str
    admin_key: str
    info: dict[str, Any]
    data_dir: Path

    @property
    def model_path(self) -> Path:
        return Path(self.info["model_path"])

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=120)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.info["redis_url"])

    def engine_metric(self, name: str, **labels: str) -> float:
        """The sum of one metric's samples (matching ``labels``) on the engine's own /metrics."""
        return _metric_sum(self.info["engine_url"], name, labels)

    def gateway_metric(self, name: str, **labels: str) -> float:
        """The sum of one metric's samples (matching ``labels``) on the gateway's /metrics."""
        return _metric_sum(self.url, name, labels)

    def s3_keys(self, prefix: str = "") -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.info["s3_endpoint_url"], region_name="us-east-1",
                          aws_access_key_id="banyan-dev", aws_secret_access_key="banyan-dev-secret")
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.info["s3_bucket"], Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys


def _metric_sum(url: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def start_dev(data_dir: Path, *, empty: bool, admin_key: str | None = None, extra_env: dict[str, str] | None = None,
              timeout: float = STACK_TIMEOUT_S) -> tuple[subprocess.Popen[bytes], Path, int]:
    """Start ``banyan dev`` as a user would; return the process, its output file and the gateway port."""
    port = free_port()
    env = {**os.environ, "BANYAN_DATA_DIR": str(data_dir), "BANYAN_PORT": str(port), **(extra_env or {})}
    env.pop("BANYAN_ADMIN_KEY", None)
    if admin_key:
        env["BANYAN_ADMIN_KEY"] = admin_key
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir / "banyan-dev.out"
    cmd = [str(Path(sys.executable).parent / "banyan"), "dev", *(["--empty"] if empty else [])]
    with out.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if READY_LINE in text:
            return process, out, port
        if process.poll() is not None:
            raise RuntimeError(f"banyan dev exited with {process.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    raise RuntimeError(f"banyan dev was not ready after {timeout} s:\n{out.read_text()[-4000:]}")


def stop_dev(process: subprocess.Popen[bytes], *, timeout: float = 90) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=timeout)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    admin_key = "adm_test_" + secrets.token_hex(12)
    # Small bounds, so that the adapter tests also exercise eviction (gateway unloads, disk cache bound).
    process, _, port = start_dev(data_dir, empty=True, admin_key=admin_key, extra_env={
        "BANYAN_LORA_CACHE_MAX_BYTES": str(CACHE_MAX_BYTES), "BANYAN_ENGINE_RESIDENT_ADAPTERS": "24",
        "BANYAN_LOG_LEVEL": "info"})  # the access log lines, checked by test_logs.py
    try:
        info = json.loads((data_dir / "stack.json").read_text())
        yield RunningStack(url=f"http://127.0.0.1:{port}", admin_key=admin_key, info=info, data_dir=data_dir)
    finally:
        stop_dev(process)


@pytest.fixture(scope="session")
def admin(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.admin() as client:
        yield client


@dataclass
class TenantHandle:
    id: str
    key: str
    key_id: str
    url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)


def make_tenant(stack: RunningStack, admin: httpx.Client, prefix: str = "t") -> TenantHandle:
    tenant_id = f"{prefix}-{secrets.token_hex(4)}"
    response = admin.post("/admin/tenants", json={"id": tenant_id, "name": tenant_id})
    assert response.status_code == 201, response.text
    response = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "tests"})
    assert response.status_code == 201, response.text
    body = response.json()
    return TenantHandle(id=tenant_id, key=body["key"], key_id=body["key_id"], url=stack.url)


@pytest.fixture
def tenant(stack: RunningStack, admin: httpx.Client) -> TenantHandle:
    return make_tenant(stack, admin)


@pytest.fixture(scope="session")
def peft_adapters(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT LoRA adapters for the stack's base model, made with ``peft``."""
    root = tmp_path_factory.mktemp("peft")
    specs = {"alpha": (11, 8, None), "beta": (22, 16, ["q_proj", "v_proj", "down_proj"]), "gamma": (33, 4, None)}
    return {name: build_adapter(stack.model_path, root / name, seed=seed, rank=rank, targets=targets)
            for name, (seed, rank, targets) in specs.items()}


def upload(admin: httpx.Client, tenant_id: str, name: str, folder: Path, **form: str) -> httpx.Response:
    files = [("files", (f, (folder / f).read_bytes(), "application/octet-stream"))
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    return admin.post(f"/admin/tenants/{tenant_id}/adapters", data={"name": name, **form}, files=files)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
