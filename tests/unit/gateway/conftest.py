"""One set of hand-written in-memory fakes behind the Protocols of the gateway's state (``gateway.state``), shared
by the unit tests of the request path (``make_harness``: the app over HTTP) and of the admin service (``fakes``).

The engine pool is the real :class:`gateway.engine.EnginePool`; its seam is the httpx transport, here a
:class:`FakeEngine` (an ``httpx.MockTransport`` that records). Every other fake keeps its data in plain fields a
test can seed and read. No services, no network."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters.naming import AdapterRef
from adapters.registry import AdapterRecord, Fence, Serving, Split, UnknownVersion, VersionMeta
from adapters.store import ObjectMissing, StoreUnavailable
from adapters.training.jobs import FINISHED, STATUSES, Job, JobEvent, new_file_id
from gateway.app import create_app
from gateway.engine import EnginePool
from gateway.fine_tuning.files import FileRecord, FileRefused, TooManyFiles
from gateway.metrics import Metrics
from gateway.quotas import Admission, CountNeeded, RateLimitState, Spent
from gateway.settings import Settings
from gateway.state import AppState
from gateway.tenants import KEY_PREFIX, KeyInfo, Tenant
from gateway.usage import Counts, TenantUsage
from retrieval.context import Context, TokenCounter, build_context
from retrieval.documents import NewDocument, Passage, SourceDocument, validate
from retrieval.errors import DocumentNotFound
from retrieval.index import DocumentRecord, WriteGuard
from retrieval.service import RetrievalConfig, new_document_id
from tests.unit.retrieval.conftest import HashingEmbedder

ADMIN_KEY = "adm_unit_test_key_0123456789"
TENANT_KEY = "bk_" + "t" * 43
OTHER_KEY = "bk_" + "o" * 43

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
"""How the fake engine answers a request (a plain or an async function)."""


# -- the engine -------------------------------------------------------------------------------------


class ChunkStream(httpx.AsyncByteStream):
    """An engine response body that arrives in the given pieces (SSE events split anywhere)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _answer_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={})


_MARKER = "banyan.test.marker.v1.0000000000"


@dataclass
class FakeEngine:
    """The engine replicas' side of a real :class:`EnginePool`: every request is recorded and answered by
    ``handler``."""

    handler: Handler = _answer_ok
    requests: list[httpx.Request] = field(default_factory=list)
    _marker_sent: asyncio.Event | None = field(default=None, init=False, repr=False)

    def pool(self) -> EnginePool:
        return EnginePool(["http://engine"], transport=httpx.MockTransport(self._answer))

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        if self._marker_sent is not None and request.content and json.loads(request.content).get("model") == _MARKER:
            self._marker_sent.set()
            return httpx.Response(200, json={})
        self.requests.append(request)
        response = self.handler(request)
        return response if isinstance(response, httpx.Response) else await response

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies of the requests to ``path``, in order."""
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    async def warmed(self, pool: EnginePool) -> list[str]:
        """The models warm-up requests were sent for. ``pool.warm`` sends in a background task: this warms a
        marker and waits until it arrives. Tasks start in the order they were made and run the same code up to
        the transport, which answers without waiting, so every warm-up begun before the marker was sent first."""
        self._marker_sent = asyncio.Event()
        pool.warm(_MARKER)
        await asyncio.wait_for(self._marker_sent.wait(), timeout=5.0)
        self._marker_sent = None
        return [body["model"] for body in self.bodies("/v1/completions")]


# -- tenants ----------------------------------------------------------------------------------------


@dataclass
class FakeTenants:
    """:class:`gateway.tenants.Tenants` in memory. A delete is a tombstone (``deleting``: its keys stop working,
    nothing new is added for it) until ``finish_delete``; a fence holds while its tenant is live and the same
    incarnation (``uid``)."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: dict[str, tuple[str, KeyInfo]] = field(default_factory=dict)
    """secret -> (tenant id, key)."""
    calls: list[str] = field(default_factory=list)
    """The methods called, in order (what the service read and wrote)."""
    _key_ids: int = field(default=0, init=False, repr=False)

    def add(self, tenant_id: str, *, name: str | None = None, key: str | None = None, rpm: int | None = None,
            tpm: int | None = None, max_concurrency: int | None = None, fallback_to_base: bool = False) -> Tenant:
        """Seed a live tenant (with ``key`` as one of its API keys)."""
        tenant = Tenant(id=tenant_id, name=name or tenant_id, created=1, rpm=rpm, tpm=tpm,
                        max_concurrency=max_concurrency, uid=secrets.token_hex(8), fallback_to_base=fallback_to_base)
        self.tenants[tenant_id] = tenant
        if key is not None:
            self._new_key(tenant_id, name="seeded", secret=key)
        return tenant

    def is_live(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` exists and no delete of it has begun (what a tenant's live guard checks)."""
        tenant = self.tenants.get(tenant_id)
        return tenant is not None and not tenant.deleting

    def _new_key(self, tenant_id: str, *, name: str, secret: str) -> KeyInfo:
        info = KeyInfo(key_id=f"key_{self._key_ids}", name=name, created=int(time.time()), prefix=secret[:7])
        self._key_ids += 1
        self.keys[secret] = (tenant_id, info)
        return info

    def holds(self, fence: Fence) -> bool:
        """Whether a fence made by :meth:`fence` still holds (what the registry checks as it commits)."""
        tenant = self.tenants.get(fence.key)
        return tenant is not None and not tenant.deleting and fence.equals == {"uid": tenant.uid}

    async def authenticate(self, key: str) -> str | None:
        self.calls.append("authenticate")
        owner = self.keys.get(key)
        return owner[0] if owner is not None and self.is_live(owner[0]) else None

    async def create(self, tenant_id: str, *, name: str, limits: dict[str, int | None],
                     fallback_to_base: bool = False) -> Tenant | None:
        self.calls.append("create")
        if tenant_id in self.tenants:
            return None
        tenant = Tenant(id=tenant_id, name=name, created=int(time.time()), uid=secrets.token_hex(8),
                        rpm=limits.get("rpm"), tpm=limits.get("tpm"), max_concurrency=limits.get("max_concurrency"),
                        fallback_to_base=fallback_to_base, daily_token_budget=limits.get("daily_token_budget"),
                        monthly_token_budget=limits.get("monthly_token_budget"))
        self.tenants[tenant_id] = tenant
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        self.calls.append("get")
        return self.tenants.get(tenant_id)

    async def list_tenants(self, *, limit: int, after: str | None = None) -> tuple[list[Tenant], bool]:
        self.calls.append("list_tenants")
        ids = [t for t in sorted(self.tenants) if after is None or t > after]
        return [self.tenants[t] for t in ids[:limit]], len(ids) > limit

    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant | None:
        self.calls.append("update")
        if not self.is_live(tenant_id):
            return None
        self.tenants[tenant_id] = dataclasses.replace(self.tenants[tenant_id], **changes)
        return self.tenants[tenant_id]

    async def begin_delete(self, tenant_id: str) -> Tenant | None:
        self.calls.append("begin_delete")
        if tenant_id not in self.tenants:
            return None
        self.tenants[tenant_id] = dataclasses.replace(self.tenants[tenant_id], deleting=True)
        self.keys = {secret: owner for secret, owner in self.keys.items() if owner[0] != tenant_id}
        return self.tenants[tenant_id]

    async def finish_delete(self, tenant_id: str) -> None:
        self.calls.append("finish_delete")
        self.tenants.pop(tenant_id, None)

    def fence(self, tenant: Tenant) -> Fence:
        return Fence(key=tenant.id, equals={"uid": tenant.uid})

    async def create_key(self, tenant_id: str, *, name: str) -> tuple[KeyInfo, str] | None:
        self.calls.append("create_key")
        if not self.is_live(tenant_id):
            return None
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        return self._new_key(tenant_id, name=name, secret=secret), secret

    async def list_keys(self, tenant_id: str) -> list[KeyInfo]:
        self.calls.append("list_keys")
        return [info for owner, info in self.keys.values() if owner == tenant_id]

    async def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        self.calls.append("revoke_key")
        for secret, (owner, info) in self.keys.items():
            if owner == tenant_id and info.key_id == key_id:
                del self.keys[secret]
                return True
        return False


# -- adapters ---------------------------------------------------------------------------------------


def version_meta(version: int) -> VersionMeta:
    """The metadata the fake registry gives version ``version`` of any adapter (upload uid ``uid00000000N``)."""
    return VersionMeta(version=version, uid=f"uid{version:09d}", sha256="0" * 64, rank=8, alpha=16.0,
                       target_modules=["q_proj"], size_bytes=10, created=1)


def _always(fence: Fence) -> bool:
    return True


@dataclass
class FakeRegistry:
    """:class:`adapters.registry.Registry` in memory. Version numbers come from a counter per adapter that
    survives deleting the adapter (not its tenant); deleting an adapter marks the uploads of its versions pending
    (for the sweep) until the caller clears them; a commit under a fence lands only while ``fences`` says it
    holds."""

    fences: Callable[[Fence], bool] = _always
    records: dict[tuple[str, str], AdapterRecord] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: dict[AdapterRef, float] = field(default_factory=dict)
    """Uploads whose files may be stored without a recorded version, and since when."""
    gets: int = 0
    after_get: list[Callable[[], None]] = field(default_factory=list)
    """What happens right after the next :meth:`get` (a concurrent writer)."""

    def add(self, tenant: str, name: str, versions: Sequence[int] = (1,), *, active: int | None = 1,
            canary: Split | None = None) -> None:
        """Seed an adapter with these versions (:func:`version_meta`), replacing what it had."""
        self.records[(tenant, name)] = AdapterRecord(tenant, name, active, {v: version_meta(v) for v in versions},
                                                     canary=canary)
        self.counters[(tenant, name)] = max(self.counters.get((tenant, name), 0), *versions)

    async def active_meta(self, tenant: str, name: str) -> VersionMeta | None:
        record = self.records.get((tenant, name))
        return record.active_meta if record else None

    async def serving(self, tenant: str, name: str) -> Serving | None:
        record = self.records.get((tenant, name))
        active = record.active_meta if record else None
        if record is None or active is None:
            return None
        split = record.canary
        if split is None or split.version not in record.versions:
            return Serving(active=active)
        return Serving(active=active, canary=record.versions[split.version], percent=split.percent)

    async def get(self, tenant: str, name: str) -> AdapterRecord | None:
        self.gets += 1
        record = self.records.get((tenant, name))
        while self.after_get:
            self.after_get.pop(0)()
        return record

    async def list_records(self, tenant: str) -> list[AdapterRecord]:
        return [r for (t, _), r in sorted(self.records.items()) if t == tenant]

    async def allocate_version(self, tenant: str, name: str) -> int:
        self.counters[(tenant, name)] = self.counters.get((tenant, name), 0) + 1
        return self.counters[(tenant, name)]

    async def record_version(self, tenant: str, name: str, meta: VersionMeta, *, activate: bool,
                             fence: Fence | None = None) -> bool:
        if fence is not None and not self.fences(fence):
            return False
        old = self.records.get((tenant, name))
        active = meta.version if activate else old.active if old else None
        canary = None if activate or old is None else old.canary  # activating ends a split
        self.records[(tenant, name)] = AdapterRecord(tenant, name, active,
                                                     {**(old.versions if old else {}), meta.version: meta}, canary)
        return True

    async def activate(self, tenant: str, name: str, version: int, *, canary: Split | None = None) -> AdapterRecord:
        record = self.records.get((tenant, name))
        for wanted in (version, *([canary.version] if canary else [])):
            if record is None or wanted not in record.versions:
                raise UnknownVersion(wanted)
        assert record is not None
        self.records[(tenant, name)] = dataclasses.replace(record, active=version, canary=canary)
        return self.records[(tenant, name)]

    async def delete(self, tenant: str, name: str) -> list[VersionMeta]:
        record = self.records.pop((tenant, name), None)
        removed = [record.versions[v] for v in sorted(record.versions)] if record else []
        for meta in removed:
            self.pending[AdapterRef(tenant, name, meta.version, meta.uid)] = 0.0
        return removed

    async def delete_tenant(self, tenant: str) -> list[str]:
        names = [n for (t, n) in sorted(self.records) if t == tenant]
        self.records = {k: r for k, r in self.records.items() if k[0] != tenant}
        self.counters = {k: n for k, n in self.counters.items() if k[0] != tenant}
        return names

    async def mark_pending(self, ref: AdapterRef) -> None:
        self.pending[ref] = time.time()

    async def clear_pending(self, ref: AdapterRef) -> None:
        self.pending.pop(ref, None)

    async def abandoned(self, *, older_than_s: float) -> list[AdapterRef]:
        return [ref for ref, since in self.pending.items() if since <= time.time() - older_than_s]

    async def is_recorded(self, ref: AdapterRef) -> bool:
        record = self.records.get((ref.tenant, ref.name))
        meta = record.versions.get(ref.version) if record else None
        return meta is not None and meta.uid == ref.uid


@dataclass
class FakeStore:
    """:class:`adapters.store.ObjectStore` in memory (key -> bytes). The next ``failures`` deletes fail as if
    object storage were down."""

    objects: dict[str, bytes] = field(default_factory=dict)
    failures: int = 0

    async def put_file(self, key: str, path: Path) -> None:
        self.objects[key] = await asyncio.to_thread(path.read_bytes)

    async def get_file(self, key: str, dest: Path) -> None:
        if key not in self.objects:
            raise ObjectMissing(key)
        await asyncio.to_thread(dest.write_bytes, self.objects[key])

    async def list_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    async def delete_prefix(self, prefix: str) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("object storage is down (fake)")
        doomed = [k for k in self.objects if k.startswith(prefix)]
        for key in doomed:
            del self.objects[key]
        return len(doomed)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# -- usage, limits, documents -----------------------------------------------------------------------


@dataclass
class FakeUsage:
    """:class:`gateway.usage.Usage` in memory: the recorded requests, summed when read."""

    records: list[tuple[str, str, int, int]] = field(default_factory=list)
    """(tenant, model, prompt tokens, completion tokens) per request, in order."""
    users: list[str | None] = field(default_factory=list)
    """The ``user`` of each of those requests."""
    unreachable_for: int = 0
    """How many more calls to :meth:`record` fail as if Redis were down."""
    tries: list[str | None] = field(default_factory=list)
    """The ``record_id`` of every call, failed ones included."""

    async def record(self, tenant: str, *, model: str, prompt_tokens: int, completion_tokens: int,
                     user: str | None = None, record_id: str | None = None) -> None:
        self.tries.append(record_id)
        if self.unreachable_for > 0:
            self.unreachable_for -= 1
            raise RedisConnectionError("Redis is down")
        self.records.append((tenant, model, prompt_tokens, completion_tokens))
        self.users.append(user)

    async def get(self, tenant: str) -> TenantUsage:
        total = Counts()
        models: dict[str, Counts] = {}
        for owner, model, prompt, completion in self.records:
            if owner == tenant:
                for counts in (total, models.setdefault(model, Counts())):
                    counts.requests += 1
                    counts.prompt_tokens += prompt
                    counts.completion_tokens += completion
        return TenantUsage(total=total, models=dict(sorted(models.items())))

    async def delete(self, tenant: str) -> None:
        self.records = [r for r in self.records if r[0] != tenant]


@dataclass
class FakeAdmission(Admission):
    """An admission that holds nothing and notes what the request path did with it."""

    released: bool = False
    kept: bool = False

    def keep_reservation(self) -> None:
        self.kept = True
        super().keep_reservation()

    async def release(self) -> None:
        self.released = True
        await super().release()


@dataclass
class FakeQuotas:
    """:class:`gateway.quotas.Limiter` that admits everything (the limits themselves are tested against a real
    Valkey in test_quotas.py); notes the tokens each admission asked to reserve, and the admissions."""

    reserved: list[int | None] = field(default_factory=list)
    admissions: list[FakeAdmission] = field(default_factory=list)
    limits: RateLimitState = field(default_factory=RateLimitState)
    """What every admission says of the limits (its ``x-ratelimit-*`` headers)."""
    forgotten: list[str] = field(default_factory=list)
    budgeted: list[bool] = field(default_factory=list)
    """Whether each admission was subject to the token budgets."""
    uncounted: set[str] = field(default_factory=set)
    """Tenants whose requests :meth:`needs_count` says may come uncounted (the real one: seen without a tpm)."""
    timed: set[str] = field(default_factory=set)
    """Tenants with a tpm: an uncounted admission of theirs raises :class:`CountNeeded` (noted as None)."""

    def needs_count(self, tenant: str) -> bool:
        return tenant not in self.uncounted

    async def admit(self, tenant: str, *, reserve_tokens: int | None = 0, budgeted: bool = True) -> Admission:
        if reserve_tokens is None and tenant in self.timed:
            self.reserved.append(None)
            raise CountNeeded(tenant)
        self.reserved.append(reserve_tokens)
        self.budgeted.append(budgeted)
        self.admissions.append(FakeAdmission(tenant=tenant, reserved=reserve_tokens or 0, limits=self.limits))
        return self.admissions[-1]

    async def spent(self, tenants: list[str]) -> dict[str, Spent]:
        """What the admissions of each tenant spent (all in one day and month)."""
        return {t: Spent(daily=(n := sum(a.spent for a in self.admissions if a.tenant == t)), monthly=n,
                         daily_resets_at=86_400, monthly_resets_at=2_678_400) for t in tenants}

    async def forget(self, tenant: str) -> None:
        self.forgotten.append(tenant)


class CharTokens:
    """One token a character: budgets in tests read as lengths."""

    def count(self, text: str) -> int:
        return len(text)


@dataclass
class FakeDocuments:
    """:class:`retrieval.service.Documents` in memory. What retrieval finds for a tenant is ``passages[tenant]`` in
    order, whatever the query and collection (a test sets them, and each added document is one passage); the
    context is built the real way, one token a character. Notes what was retrieved and the budget grounding got."""

    documents: dict[str, dict[str, DocumentRecord]] = field(default_factory=dict)
    passages: dict[str, list[Passage]] = field(default_factory=dict)
    queries: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    guards: list[WriteGuard] = field(default_factory=list)
    """The write guards documents were added under."""
    embedder: HashingEmbedder = field(default_factory=lambda: HashingEmbedder(dimension=384))
    embedded: list[tuple[str, int, bool]] = field(default_factory=list)
    """(tenant, texts, in the query lane) per call to :meth:`embed`."""

    async def start(self) -> None:
        return None

    async def embed(self, texts: Sequence[str], *, tenant: str = "", query: bool = False) -> np.ndarray:
        self.embedded.append((tenant, len(texts), query))
        return self.embedder.embed(texts)

    async def aclose(self) -> None:
        return None

    async def add(self, tenant: str, document: NewDocument, *, guard: WriteGuard | None = None) -> DocumentRecord:
        if guard is not None:
            self.guards.append(guard)
        now = time.time()
        valid = validate(document, max_bytes=RetrievalConfig().max_document_bytes, now=now)
        record = DocumentRecord(id=new_document_id(), tenant=tenant, title=valid.title, timestamp=valid.timestamp,
                                collection=valid.collection, chunks=1, created=now, metadata=valid.metadata)
        self.documents.setdefault(tenant, {})[record.id] = record
        self.passages.setdefault(tenant, []).append(Passage(
            document_id=record.id, chunk_id=f"{record.id}:0", title=valid.title, text=valid.text, score=1.0,
            timestamp=valid.timestamp))
        return record

    async def list_documents(self, tenant: str, *, limit: int = 20,
                             after: str | None = None) -> tuple[list[DocumentRecord], bool]:
        newest = sorted(self.documents.get(tenant, {}).values(), key=lambda r: (r.created, r.id), reverse=True)
        start = next((i + 1 for i, r in enumerate(newest) if r.id == after), 0) if after else 0
        return newest[start:start + limit], len(newest) > start + limit

    async def get(self, tenant: str, document_id: str) -> DocumentRecord:
        record = self.documents.get(tenant, {}).get(document_id)
        if record is None:
            raise DocumentNotFound(f"Document `{document_id}` does not exist.", param="id")
        return record

    async def delete(self, tenant: str, document_id: str) -> None:
        await self.get(tenant, document_id)
        del self.documents[tenant][document_id]
        self.passages[tenant] = [p for p in self.passages.get(tenant, []) if p.document_id != document_id]

    async def delete_tenant(self, tenant: str) -> int:
        return len(self.documents.pop(tenant, {})) + len(self.passages.pop(tenant, []))

    async def export(self, tenant: str, *, collection: str | None = None) -> list[SourceDocument]:
        texts = {p.document_id: p.text for p in self.passages.get(tenant, [])}
        oldest = sorted(self.documents.get(tenant, {}).values(), key=lambda r: (r.timestamp, r.created))
        return [SourceDocument(id=r.id, title=r.title, text=texts[r.id], timestamp=r.timestamp, collection=r.collection)
                for r in oldest if r.id in texts and collection in (None, r.collection)]

    async def retrieve(self, tenant: str, query: str, *, top_k: int = 4,
                       collection: str | None = None) -> list[Passage]:
        self.queries.append((tenant, query, top_k, collection))
        return self.passages.get(tenant, [])[:top_k]

    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None, tokens: TokenCounter | None = None) -> Context:
        self.budgets.append(budget_tokens)
        passages = await self.retrieve(tenant, query, top_k=top_k, collection=collection)
        return build_context(passages, budget_tokens=budget_tokens, tokens=tokens or CharTokens())


# -- fine-tuning ------------------------------------------------------------------------------------


def _always_live(tenant: str) -> bool:
    return True


@dataclass
class FakeFiles:
    """:class:`gateway.fine_tuning.files.Files` in memory: ``stored[tenant][file id]`` = (record, bytes). A file is
    refused (:class:`FileRefused`) while ``live`` says its tenant is not live; notes the guards files were added
    under."""

    live: Callable[[str], bool] = _always_live
    stored: dict[str, dict[str, tuple[FileRecord, bytes]]] = field(default_factory=dict)
    guards: list[Fence] = field(default_factory=list)
    _clock: int = field(default=1_000, init=False, repr=False)

    async def add(self, tenant: str, *, filename: str, purpose: str, data: bytes, max_files: int,
                  guard: Fence) -> FileRecord:
        self.guards.append(guard)
        if not self.live(tenant):
            raise FileRefused
        files = self.stored.setdefault(tenant, {})
        if len(files) >= max_files:
            raise TooManyFiles
        self._clock += 1  # strictly increasing: "newest first" is well defined
        record = FileRecord(id=new_file_id(), bytes=len(data), created_at=self._clock, filename=filename,
                            purpose=purpose)
        files[record.id] = (record, data)
        return record

    async def get(self, tenant: str, file_id: str) -> FileRecord | None:
        found = self.stored.get(tenant, {}).get(file_id)
        return found[0] if found else None

    async def list_files(self, tenant: str) -> list[FileRecord]:
        return sorted((r for r, _ in self.stored.get(tenant, {}).values()), key=lambda r: r.created_at, reverse=True)

    async def content(self, tenant: str, file_id: str) -> bytes | None:
        found = self.stored.get(tenant, {}).get(file_id)
        return found[1] if found else None

    async def delete(self, tenant: str, file_id: str) -> bool:
        return self.stored.get(tenant, {}).pop(file_id, None) is not None

    async def delete_tenant(self, tenant: str) -> int:
        return len(self.stored.pop(tenant, {}))


@dataclass
class FakeJobs:
    """:class:`gateway.fine_tuning.Jobs` in memory: ``jobs`` in creation order, ``event_log[job id]`` oldest first (a
    test adds them, and moves jobs with :meth:`finish`). ``unreachable_for``: the next calls to
    :meth:`counts_by_status` fail as if Redis were down; ``counted`` is set once one has answered."""

    jobs: list[Job] = field(default_factory=list)
    event_log: dict[str, list[JobEvent]] = field(default_factory=dict)
    unreachable_for: int = 0
    counted: asyncio.Event = field(default_factory=asyncio.Event)

    def _find(self, tenant: str, job_id: str) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id and j.tenant == tenant), None)

    def finish(self, job_id: str, *, status: str, result: dict[str, Any] | None = None) -> None:
        job = next(j for j in self.jobs if j.id == job_id)
        job.status, job.result, job.finished_at = status, result, 2_000

    def add_event(self, job_id: str, message: str, *, type: str = "message",
                  data: dict[str, Any] | None = None) -> JobEvent:
        event = JobEvent(id=f"ftevent-{len(self.event_log.get(job_id, [])) + 1}", created_at=1, level="info",
                         message=message, type=type, data=data)
        self.event_log.setdefault(job_id, []).append(event)
        return event

    async def create(self, job: Job, *, max_active: int) -> bool:
        if sum(1 for j in self.jobs if j.tenant == job.tenant and j.status not in FINISHED) >= max_active:
            return False
        self.jobs.append(dataclasses.replace(job, status="queued"))
        return True

    async def get(self, tenant: str, job_id: str) -> Job | None:
        return self._find(tenant, job_id)

    async def list_jobs(self, tenant: str, *, limit: int, after: str | None) -> tuple[list[Job], bool]:
        newest = [j for j in reversed(self.jobs) if j.tenant == tenant]
        start = 0
        if after is not None:
            ids = [j.id for j in newest]
            if after not in ids:
                raise ValueError("`after` is not the id of one of your fine-tuning jobs")
            start = ids.index(after) + 1
        return newest[start:start + limit], len(newest) > start + limit

    async def cancel(self, tenant: str, job_id: str) -> Job | None:
        job = self._find(tenant, job_id)
        if job is not None and job.status not in FINISHED:
            job.status, job.finished_at = "cancelled", 2_000
        return job

    async def events(self, tenant: str, job_id: str, *, limit: int,
                          after: str | None) -> tuple[list[JobEvent], bool] | None:
        if self._find(tenant, job_id) is None:
            return None
        newest = list(reversed(self.event_log.get(job_id, [])))
        ids = [e.id for e in newest]
        start = ids.index(after) + 1 if after in ids else 0
        return newest[start:start + limit], len(newest) > start + limit

    async def delete_tenant(self, tenant: str) -> int:
        doomed = [j for j in self.jobs if j.tenant == tenant]
        self.jobs = [j for j in self.jobs if j.tenant != tenant]
        return len(doomed)

    async def counts_by_status(self) -> dict[str, int]:
        if self.unreachable_for > 0:
            self.unreachable_for -= 1
            raise RedisConnectionError("Redis is down")
        self.counted.set()
        return {s: sum(1 for j in self.jobs if j.status == s) for s in STATUSES}


class FakeRedis:
    """:class:`gateway.state.Pinger`: the app's own use of its Redis connection."""

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


# -- the state and the harnesses --------------------------------------------------------------------


@dataclass
class Fakes:
    """The fakes of one app state, and that state (``base_spec`` None: uploads are refused before validation)."""

    settings: Settings
    engine: FakeEngine = field(default_factory=FakeEngine)
    metrics: Metrics = field(default_factory=Metrics)
    tenants: FakeTenants = field(default_factory=FakeTenants)
    store: FakeStore = field(default_factory=FakeStore)
    usage: FakeUsage = field(default_factory=FakeUsage)
    quotas: FakeQuotas = field(default_factory=FakeQuotas)
    documents: FakeDocuments = field(default_factory=FakeDocuments)
    jobs: FakeJobs = field(default_factory=FakeJobs)
    adapters: FakeRegistry = field(init=False)
    files: FakeFiles = field(init=False)
    state: AppState = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = FakeRegistry(fences=self.tenants.holds)
        self.files = FakeFiles(live=self.tenants.is_live)
        self.state = AppState(settings=self.settings, redis=FakeRedis(), store=self.store, engines=self.engine.pool(),
                              tenants=self.tenants, adapters=self.adapters, metrics=self.metrics, quotas=self.quotas,
                              usage=self.usage, base_spec=None, documents=self.documents, tokens=CharTokens(),
                              files=self.files, jobs=self.jobs)


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    """In-memory state for calling services directly; tenant ``acme`` exists (named Acme, 60 rpm)."""
    made = Fakes(settings=Settings(mode="dev"))
    made.tenants.add("acme", name="Acme", rpm=60)
    yield made
    await made.state.engines.aclose()


@dataclass
class Harness:
    client: TestClient
    state: AppState
    registry: FakeRegistry
    engine_requests: list[httpx.Request]
    metrics: Metrics
    documents: FakeDocuments
    usage: FakeUsage
    quotas: FakeQuotas
    tenants: FakeTenants
    files: FakeFiles
    jobs: FakeJobs

    def tenant_headers(self, key: str = TENANT_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_harness() -> Callable[[Handler], Harness]:
    """The app over HTTP on in-memory state whose engine answers with the handler; tenants ``acme``
    (``TENANT_KEY``) and ``globex`` (``OTHER_KEY``)."""

    def build(handler: Handler) -> Harness:
        settings = Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), engine_urls=["http://engine"])
        made = Fakes(settings=settings, engine=FakeEngine(handler))
        made.tenants.add("acme", key=TENANT_KEY)
        made.tenants.add("globex", key=OTHER_KEY)
        client = TestClient(create_app(settings, state=made.state), raise_server_exceptions=False)
        return Harness(client=client, state=made.state, registry=made.adapters, engine_requests=made.engine.requests,
                       metrics=made.metrics, documents=made.documents, usage=made.usage, quotas=made.quotas,
                       tenants=made.tenants, files=made.files, jobs=made.jobs)

    return build
