"""Small hand-written fakes behind the gateway's seams: the engine pool (an ``httpx.MockTransport``), the
tenant store and the adapter registry. No services, no network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from adapters.registry import AdapterRecord, VersionMeta
from gateway.app import create_app
from gateway.engine import EnginePool
from gateway.metrics import Metrics
from gateway.quotas import Admission
from gateway.settings import Settings
from gateway.state import AppState
from retrieval.context import Context, build_context
from retrieval.documents import Passage

ADMIN_KEY = "adm_unit_test_key_0123456789"
TENANT_KEY = "bk_" + "t" * 43
OTHER_KEY = "bk_" + "o" * 43


class FakeTenants:
    def __init__(self) -> None:
        self.keys = {TENANT_KEY: "acme", OTHER_KEY: "globex"}

    async def authenticate(self, key: str) -> str | None:
        return self.keys.get(key)


@dataclass
class FakeRegistry:
    records: dict[tuple[str, str], AdapterRecord] = field(default_factory=dict)

    def add(self, tenant: str, name: str, version: int = 1, *, active: bool = True) -> None:
        meta = VersionMeta(version=version, uid="abcdef012345", sha256="0" * 64, rank=8, alpha=16.0,
                           target_modules=["q_proj"], size_bytes=10, created=1)
        old = self.records.get((tenant, name))
        versions = {**(old.versions if old else {}), version: meta}
        self.records[(tenant, name)] = AdapterRecord(tenant, name, version if active else None, versions)

    async def get(self, tenant: str, name: str) -> AdapterRecord | None:
        return self.records.get((tenant, name))

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None:
        record = self.records.get((tenant, name))
        return record.active_meta if record else None

    async def list_records(self, tenant: str) -> list[AdapterRecord]:
        return [r for (t, _), r in sorted(self.records.items()) if t == tenant]


class ChunkStream(httpx.AsyncByteStream):
    """An engine response body that arrives in the given pieces (SSE events split anywhere)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for chunk in self.chunks:
            yield chunk


class FakeQuotas:
    """Admits everything (the limits themselves are tested against a real Valkey in test_quotas.py); notes the
    tokens each admission reserved."""

    def __init__(self) -> None:
        self.reserved: list[int] = []

    async def admit(self, tenant: str, *, reserve_tokens: int = 0) -> Admission:
        self.reserved.append(reserve_tokens)
        return Admission(tenant=tenant)


class FakeUsage:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, int, int]] = []

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.records.append((tenant, model, prompt_tokens, completion_tokens))


class FakeRedis:
    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class FakeStore:
    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class CharTokens:
    """One token a character: budgets in tests read as lengths."""

    def count(self, text: str) -> int:
        return len(text)


@dataclass
class FakeDocuments:
    """The retrieval service's ``context_for``: canned passages per tenant, put in the real context format;
    records what was asked and the budget it was given."""

    passages: dict[str, list[Passage]] = field(default_factory=dict)
    queries: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)

    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None) -> Context:
        self.queries.append((tenant, query, top_k, collection))
        self.budgets.append(budget_tokens)
        return build_context(self.passages.get(tenant, [])[:top_k], budget_tokens=budget_tokens, tokens=CharTokens())

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def delete_tenant(self, tenant: str) -> int:
        return len(self.passages.pop(tenant, []))


Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Harness:
    client: TestClient
    registry: FakeRegistry
    engine_requests: list[httpx.Request]
    metrics: Metrics
    documents: FakeDocuments = field(default_factory=FakeDocuments)
    usage: FakeUsage = field(default_factory=FakeUsage)

    def tenant_headers(self, key: str = TENANT_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_harness() -> Callable[[Handler], Harness]:
    def build(handler: Handler) -> Harness:
        seen: list[httpx.Request] = []

        def recording(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        settings = Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), engine_urls=["http://engine"])
        registry = FakeRegistry()
        usage = FakeUsage()
        metrics = Metrics()
        documents = FakeDocuments()
        state = AppState(settings=settings, redis=FakeRedis(), store=FakeStore(),  # type: ignore[arg-type]
                         engines=EnginePool(["http://engine"], transport=httpx.MockTransport(recording)),
                         tenants=FakeTenants(), adapters=registry, metrics=metrics,  # type: ignore[arg-type]
                         base_spec=None, documents=documents,  # type: ignore[arg-type]
                         quotas=FakeQuotas(), usage=usage, tokens=CharTokens())  # type: ignore[arg-type]
        client = TestClient(create_app(settings, state=state), raise_server_exceptions=False)
        return Harness(client=client, registry=registry, engine_requests=seen, metrics=metrics, documents=documents,
                       usage=usage)

    return build
