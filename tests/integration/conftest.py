"""One real stack for the whole test session, started the way a user starts it: ``banyan dev --empty``
(Valkey with the search module, moto S3, vLLM on the CPU with the tiny demo model, the gateway), through the
launcher the load scripts use too (:mod:`gateway.dev.launcher`), stopped with SIGINT at the end."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from adapters.store import make_s3_client, s3_config
from gateway.dev.demo_model import build_adapter
from gateway.dev.launcher import DevProcess, launch_dev

CACHE_MAX_BYTES = 12 * 1024 * 1024
TRAINER_LEASE_S = 10
"""The trainers' lease in the session stack: short, so a job whose worker is killed is taken over within seconds
(test_trainer.py); long enough that a worker on this busy machine renews (every third) in time."""


@dataclass
class RunningStack(DevProcess):
    """The session's ``banyan dev`` process, with what the tests read from it."""

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=120)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.info["redis_url"])

    def engine_metric(self, name: str, **labels: str) -> float:
        """The sum of one metric's samples (matching ``labels``) on the engine's own /metrics."""
        return _metric_sum(self.engine_url, name, labels)

    def gateway_metric(self, name: str, **labels: str) -> float:
        """The sum of one metric's samples (matching ``labels``) on the gateway's /metrics."""
        return _metric_sum(self.url, name, labels)

    def s3_keys(self, prefix: str = "") -> list[str]:
        s3 = make_s3_client(s3_config(self.s3_settings()))
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.info["s3_bucket"], Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys


def _metric_sum(url: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # Small bounds, so that the adapter tests also exercise eviction (gateway unloads, disk cache bound).
    dev = launch_dev(tmp_path_factory.mktemp("stack"), admin_key="adm_test_" + secrets.token_hex(12), extra_env={
        "BANYAN_LORA_CACHE_MAX_BYTES": str(CACHE_MAX_BYTES), "BANYAN_ENGINE_RESIDENT_ADAPTERS": "24",
        "BANYAN_LOG_LEVEL": "info",  # the access log lines, checked by test_logs.py
        "BANYAN_TRAINER_LEASE_S": str(TRAINER_LEASE_S)})
    try:
        yield RunningStack(**vars(dev.wait_ready()))
    finally:
        dev.stop()


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
