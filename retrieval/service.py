"""The retrieval service: ingest, list, get and delete a tenant's documents; retrieve passages.

Ingestion: validate -> chunk (off the event loop) -> check the document's chunks and the tenant's
quotas (:class:`retrieval.index.CorpusQuota`) -> embed ``title + chunk`` in batches -> write the document and
its chunks in one Redis transaction that checks the quotas again. Embedding runs on one thread shared by every
tenant, fed by :class:`EmbeddingQueue`: queries first, tenants in turns.

Grounding (:meth:`DocumentService.context_for`, the one call the gateway makes for ``rag``): retrieve, then
build the numbered context within a token budget (:mod:`retrieval.context`).
Retrieval: embed the query -> read the scope's size and word counts -> vector
KNN and BM25 in parallel, both scoped to the tenant inside the query and planned for the scope's
size (:class:`retrieval.index.QueryPlan`) -> rank (:mod:`retrieval.ranking`) -> passages. Every
call takes the tenant from the caller (the gateway's authenticated key), never from the request body.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from redis.asyncio import Redis

from retrieval.chunking import ChunkingConfig, chunk_document
from retrieval.context import CharEstimate, Context, TokenCounter, build_context
from retrieval.documents import NewDocument, Passage, SourceDocument, check_collection, join_chunks, validate
from retrieval.embedding import Embedder
from retrieval.errors import DocumentNotFound, DocumentTooLarge, InvalidQuery, RetrievalUnavailable
from retrieval.index import (
    DEFAULT_VECTOR_TYPE,
    ChunkIndex,
    ChunkRecord,
    CorpusQuota,
    DocumentRecord,
    Hit,
    HnswConfig,
    IndexMismatch,
    QueryPlan,
    VectorType,
    WriteGuard,
    passage_terms,
    query_terms,
)
from retrieval.ranking import Ranked, RankingConfig, rank

log = logging.getLogger("banyan.retrieval")

MAX_TOP_K = 20
MAX_QUERY_CHARS = 8192


class Observer(Protocol):
    """Where the service reports what it did (the gateway's metrics)."""

    def retrieval_stage(self, stage: str, seconds: float) -> None:
        """``stage`` is one of embed, search, rank, ingest_embed, ingest_store."""
        ...

    def retrieval_passages(self, count: int) -> None: ...

    def chunks_ingested(self, count: int) -> None: ...


class _NoObserver:
    def retrieval_stage(self, stage: str, seconds: float) -> None:
        return None

    def retrieval_passages(self, count: int) -> None:
        return None

    def chunks_ingested(self, count: int) -> None:
        return None


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    index_name: str = "banyan-chunks"
    key_prefix: str = "banyan"
    max_document_bytes: int = 1024 * 1024
    max_chunks_per_document: int = 1024
    """A document that makes more chunks is refused (413) before it is embedded."""
    max_documents_per_tenant: int | None = 10_000
    max_chunks_per_tenant: int | None = 100_000
    embedding_batch_size: int = 32
    min_candidates: int = 24
    """Each list (vector, BM25) fetches ``max(min_candidates, candidates_per_result * top_k)``."""
    candidates_per_result: int = 5
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    hnsw: HnswConfig = field(default_factory=HnswConfig)
    plan: QueryPlan = field(default_factory=QueryPlan)
    vector_type: VectorType = DEFAULT_VECTOR_TYPE

    def candidates(self, top_k: int) -> int:
        return min(100, max(self.min_candidates, self.candidates_per_result * top_k))

    @property
    def quota(self) -> CorpusQuota:
        return CorpusQuota(max_documents=self.max_documents_per_tenant, max_chunks=self.max_chunks_per_tenant)


class Documents(Protocol):
    """The retrieval service as the gateway uses it: the documents routes, grounding a request
    (:meth:`context_for`), deleting a tenant, and the app's lifespan (:class:`DocumentService`; the unit tests'
    in-memory fake)."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def add(self, tenant: str, document: NewDocument, *, guard: WriteGuard | None = None) -> DocumentRecord: ...
    async def list_documents(self, tenant: str, *, limit: int = 20,
                             after: str | None = None) -> tuple[list[DocumentRecord], bool]: ...
    async def get(self, tenant: str, document_id: str) -> DocumentRecord: ...
    async def delete(self, tenant: str, document_id: str) -> None: ...
    async def delete_tenant(self, tenant: str) -> int: ...
    async def export(self, tenant: str, *, collection: str | None = None) -> list[SourceDocument]: ...
    async def retrieve(self, tenant: str, query: str, *, top_k: int = 4,
                       collection: str | None = None) -> list[Passage]: ...
    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None, tokens: TokenCounter | None = None) -> Context: ...

    @property
    def embedder(self) -> Embedder:
        """The one embedding model (``POST /v1/embeddings`` counts tokens with it)."""
        ...

    async def embed(self, texts: Sequence[str], *, tenant: str = "", query: bool = False) -> np.ndarray: ...


@dataclass(eq=False, slots=True)
class _Job:
    """The texts of one caller, embedded in slices; ``future`` gets the rows of all of them, in order."""

    texts: Sequence[str]
    future: asyncio.Future[np.ndarray]
    taken: int = 0
    """Texts handed to the thread so far."""
    rows: list[np.ndarray] = field(default_factory=list)

    def deliver(self, rows: np.ndarray) -> None:
        if self.future.done():  # the caller went away
            return
        self.rows.append(rows)
        if sum(len(r) for r in self.rows) == len(self.texts):
            self.future.set_result(np.vstack(self.rows))


class _Lane:
    """Per-tenant FIFO queues of jobs, served in turns (round robin)."""

    def __init__(self) -> None:
        self._tenants: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._served: list[str] = []

    def push(self, tenant: str, job: _Job) -> None:
        self._tenants.setdefault(tenant, deque()).append(job)

    def take(self, room: int) -> list[tuple[_Job, int, int]]:
        """Slices ``(job, start, end)`` of up to ``room`` texts in all, each tenant in turn giving a slice of its
        oldest job. The tenants the previous batch served go behind every other, those that came since too."""
        for tenant in self._served:
            if tenant in self._tenants:
                self._tenants.move_to_end(tenant)
        self._served = []
        slices: list[tuple[_Job, int, int]] = []
        while room > 0 and self._tenants:
            for tenant in list(self._tenants):
                job = self._head(tenant)
                if job is None or room == 0:
                    continue
                start = job.taken
                job.taken = end = min(len(job.texts), start + room)
                slices.append((job, start, end))
                room -= end - start
                self._served.append(tenant)
        return slices

    def _head(self, tenant: str) -> _Job | None:
        """The tenant's oldest job with texts left to hand out; a tenant without one leaves the turn."""
        jobs = self._tenants[tenant]
        while jobs and (jobs[0].future.done() or jobs[0].taken == len(jobs[0].texts)):
            jobs.popleft()  # cancelled by its caller, or all handed out
        if not jobs:
            del self._tenants[tenant]
            return None
        return jobs[0]

    def waiting(self) -> int:
        return sum(len(j.texts) - j.taken for jobs in self._tenants.values() for j in jobs if not j.future.done())

    def fail(self, error: BaseException) -> None:
        for jobs in self._tenants.values():
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
        self._tenants.clear()


class EmbeddingQueue:
    """The one embedding thread, shared by every tenant and fed in turns.

    Work waits in two lanes, each a round robin of per-tenant FIFO queues: queries (a retrieval or a ``rag``
    request waits on one embedding) and ingestion (a document's chunks). The thread takes its next batch from
    the query lane while that holds work, else from the ingestion lane; in a lane, tenants take turns, a slice
    each, up to ``batch_size`` texts a batch. So one tenant's large ingestion (or many documents at once) costs
    another tenant's query at most the batch running when it arrives, and another tenant's document a turn
    per batch. A caller that goes away (cancelled) leaves the queue: its remaining texts are not embedded.
    """

    def __init__(self, embedder: Embedder, *, batch_size: int) -> None:
        self._embedder = embedder
        self._batch_size = batch_size
        self._queries, self._ingestion = _Lane(), _Lane()
        # One batch runs at a time anyway (one model, two cores); the others wait in the lanes rather than each
        # holding a thread of the loop's default pool. Made on first use, again after aclose.
        self._thread: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: list[_Job] = []

    def waiting(self) -> int:
        """Texts queued and not yet handed to the thread."""
        return self._queries.waiting() + self._ingestion.waiting()

    async def embed(self, tenant: str, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        """``(len(texts), dimension)`` rows of ``texts``, embedded when ``tenant``'s turn comes (``query``: in the
        query lane)."""
        if not texts:
            return np.zeros((0, self._embedder.dimension), dtype=np.float32)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new event loop (the tests start an app more than once)
            self._loop, self._wake, self._worker = loop, asyncio.Event(), None
        job = _Job(texts=texts, future=loop.create_future())
        (self._queries if query else self._ingestion).push(tenant, job)
        if self._worker is None or self._worker.done():
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="banyan-embed")
            self._worker = loop.create_task(self._run(self._thread), name="banyan-embedding-queue")
        assert self._wake is not None
        self._wake.set()
        return await job.future

    async def _run(self, thread: ThreadPoolExecutor) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            slices = self._queries.take(self._batch_size) or self._ingestion.take(self._batch_size)
            if not slices:
                wake.clear()
                await wake.wait()
                continue
            texts = [t for job, start, end in slices for t in job.texts[start:end]]
            self._running = [job for job, _, _ in slices]
            try:
                rows = await asyncio.get_running_loop().run_in_executor(thread, self._embedder.embed, texts)
            except Exception as e:  # the model failed: every caller in the batch gets the error
                for job in self._running:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self._running = []
            offset = 0
            for job, start, end in slices:
                job.deliver(rows[offset:offset + end - start])
                offset += end - start

    async def aclose(self) -> None:
        """Stop: every caller still waiting gets :class:`RetrievalUnavailable` (the next call starts anew)."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        error = RetrievalUnavailable("The embedding model is shutting down.")
        for job in self._running:
            if not job.future.done():
                job.future.set_exception(error)
        self._queries.fail(error)
        self._ingestion.fail(error)
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None


def new_document_id() -> str:
    return "doc_" + secrets.token_hex(12)


class DocumentService:
    def __init__(self, redis: Redis, embedder: Embedder, *, config: RetrievalConfig | None = None,
                 observer: Observer | None = None, tokens: TokenCounter | None = None) -> None:
        self.config = config or RetrievalConfig()
        self.tokens: TokenCounter = tokens or CharEstimate()
        """Counts tokens of the base model: the unit of the context budget."""
        self.embedder = embedder
        self.index = ChunkIndex(redis, name=self.config.index_name, prefix=self.config.key_prefix,
                                dimension=embedder.dimension, hnsw=self.config.hnsw,
                                vector_type=self.config.vector_type)
        self._observer: Observer = observer or _NoObserver()
        self._index_ready = False
        self._index_lock = asyncio.Lock()
        self.embedding = EmbeddingQueue(embedder, batch_size=self.config.embedding_batch_size)

    async def start(self) -> None:
        """Load the embedding model (a warm-up batch, off the event loop) and create the search index
        if it is absent. An unreachable Redis is only logged: the index is created on first use."""
        await self.embedding.embed("", ["warm-up"], query=True)
        try:
            await self.ensure_index()
        except IndexMismatch:  # a setting that does not fit the index: refuse to start (its message says which)
            raise
        except Exception as e:  # start-up must not fail on a Redis blip; the next call retries
            log.warning("could not create the search index at start-up: %s", type(e).__name__)

    async def ensure_index(self) -> None:
        if self._index_ready:
            return
        async with self._index_lock:
            if not self._index_ready:
                if await self.index.ensure():
                    log.info("created the search index %s", self.index.name)
                self._index_ready = True

    # -- documents ------------------------------------------------------------------------------

    async def add(self, tenant: str, document: NewDocument, *, guard: WriteGuard | None = None) -> DocumentRecord:
        """Ingest a document. Refused before it is embedded when it makes more chunks than a document may
        (:class:`DocumentTooLarge`) or would take the tenant past its quota (:class:`QuotaExceeded`); the quota is
        checked again, atomically, when the document is written, and so is ``guard`` (the tenant still live)."""
        valid = validate(document, max_bytes=self.config.max_document_bytes, now=time.time())
        await self.ensure_index()
        pieces = await asyncio.to_thread(chunk_document, valid.text, title=valid.title, tokenizer=self.embedder,
                                         config=self.config.chunking)
        cap = self.config.max_chunks_per_document
        if len(pieces) > cap:
            raise DocumentTooLarge(f"`text` makes {len(pieces)} chunks; the limit is {cap} chunks a document: split "
                                   "it into smaller documents.", param="text")
        quota = self.config.quota
        quota.check(await self.index.size(tenant), adding_chunks=len(pieces))
        texts = [p.text for p in pieces]
        started = time.perf_counter()
        vectors = await self.embed([p.embedded for p in pieces], tenant=tenant)
        stored = time.perf_counter()
        self._observer.retrieval_stage("ingest_embed", stored - started)
        record = DocumentRecord(id=new_document_id(), tenant=tenant, title=valid.title, timestamp=valid.timestamp,
                                collection=valid.collection, chunks=len(texts), created=time.time(),
                                metadata=valid.metadata)
        chunks = [ChunkRecord(number=n, text=t, vector=v) for n, (t, v) in enumerate(zip(texts, vectors, strict=True))]
        await self.index.add_document(record, chunks, quota=quota, guard=guard)
        self._observer.retrieval_stage("ingest_store", time.perf_counter() - stored)
        self._observer.chunks_ingested(len(chunks))
        return record

    async def list_documents(self, tenant: str, *, limit: int = 20,
                             after: str | None = None) -> tuple[list[DocumentRecord], bool]:
        """A page of the tenant's documents, newest first, and whether there are more."""
        return await self.index.list_documents(tenant, limit=limit, after=after)

    async def get(self, tenant: str, document_id: str) -> DocumentRecord:
        record = await self.index.get_document(tenant, document_id)
        if record is None:
            raise DocumentNotFound(f"Document `{document_id}` does not exist.", param="id")
        return record

    async def delete(self, tenant: str, document_id: str) -> None:
        if not await self.index.delete_document(tenant, document_id):
            raise DocumentNotFound(f"Document `{document_id}` does not exist.", param="id")

    async def delete_tenant(self, tenant: str) -> int:
        """Remove all of a tenant's documents and chunks; the number of Redis keys removed."""
        return await self.index.delete_tenant(tenant)

    async def export(self, tenant: str, *, collection: str | None = None) -> list[SourceDocument]:
        """Every document of the tenant (of one ``collection`` when given) read back whole, oldest first (by
        the document's timestamp), at most the per-tenant document cap: what a training set is made from
        (``from_documents`` fine-tuning). Reads only the stored hashes, never the search index."""
        check_collection(collection)
        exported = await self.index.export_documents(tenant, collection=collection,
                                                     limit=self.config.max_documents_per_tenant)
        documents = [SourceDocument(id=record.id, title=record.title, text=join_chunks(texts),
                                    timestamp=record.timestamp, collection=record.collection)
                     for record, texts in sorted(exported, key=lambda e: (e[0].timestamp, e[0].created))]
        return [d for d in documents if d.text]

    # -- retrieval ------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], *, tenant: str = "", query: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` (a document's chunks, or with ``query`` a query), in batches in the embedding
        thread, when ``tenant``'s turn comes (:class:`EmbeddingQueue`)."""
        return await self.embedding.embed(tenant, texts, query=query)

    async def aclose(self) -> None:
        await self.embedding.aclose()

    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None, tokens: TokenCounter | None = None) -> Context:
        """The numbered context of the passages of the tenant's documents best for ``query`` that fit in
        ``budget_tokens`` (base-model tokens, counted with ``tokens``, default the service's own), and those
        passages. A query longer than retrieval reads is cut to its head."""
        passages = await self.retrieve(tenant, query[:MAX_QUERY_CHARS], top_k=top_k, collection=collection)
        if not passages:
            return Context(text="", passages=[])
        return await asyncio.to_thread(build_context, passages, budget_tokens=budget_tokens,
                                       tokens=tokens or self.tokens)

    async def retrieve(self, tenant: str, query: str, *, top_k: int = 4,
                       collection: str | None = None) -> list[Passage]:
        """The ``top_k`` best passages of the tenant's documents for ``query``, best first."""
        _check_query(query, top_k, collection)
        started = time.perf_counter()
        vector = (await self.embed([query], tenant=tenant, query=True))[0]
        self._observer.retrieval_stage("embed", time.perf_counter() - started)
        return await self.search(tenant, query, vector, top_k=top_k, collection=collection)

    async def search(self, tenant: str, query: str, vector: np.ndarray, *, top_k: int = 4,
                     collection: str | None = None) -> list[Passage]:
        """:meth:`retrieve` with the query already embedded (the benchmark times the two apart)."""
        _check_query(query, top_k, collection)
        await self.ensure_index()
        started = time.perf_counter()
        n, plan, terms = self.config.candidates(top_k), self.config.plan, query_terms(query)
        scope = await self.index.scope(tenant, collection, terms)
        knn: list[Hit] = []
        bm25: list[Hit] = []
        if scope.chunks != 0:
            knn, bm25 = await asyncio.gather(
                self.index.knn(tenant, vector, k=n, collection=collection, policy=plan.knn_policy(scope.chunks)),
                self.index.bm25(tenant, plan.bm25_terms(terms, scope.frequencies, scope.chunks), k=n,
                                collection=collection))
        searched = time.perf_counter()
        self._observer.retrieval_stage("search", searched - started)
        lists = {"vector": [_ranked(h) for h in knn], "bm25": [_ranked(h) for h in bm25]}
        best = rank(lists, vector, self.config.ranking, top_k=top_k)
        passages = [_passage(cast(Hit, c.payload), c.score, superseded=c.superseded) for c in best]
        self._observer.retrieval_stage("rank", time.perf_counter() - searched)
        self._observer.retrieval_passages(len(passages))
        return passages


def _check_query(query: str, top_k: int, collection: str | None) -> None:
    if not isinstance(query, str) or not query.strip():
        raise InvalidQuery("`query` must be a non-empty string.", param="query")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidQuery(f"`query` is longer than {MAX_QUERY_CHARS} characters.", param="query")
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidQuery(f"`top_k` must be between 1 and {MAX_TOP_K}.", param="top_k")
    check_collection(collection)


def _ranked(hit: Hit) -> Ranked:
    return Ranked(key=hit.key, timestamp=hit.timestamp, vector=hit.vector,
                  terms=lambda: passage_terms(f"{hit.title or ''} {hit.text}"), payload=hit)


def _passage(hit: Hit, score: float, *, superseded: bool = False) -> Passage:
    return Passage(document_id=hit.document_id, chunk_id=f"{hit.document_id}:{hit.number}", title=hit.title,
                   text=hit.text, score=score, timestamp=hit.timestamp, superseded=superseded)
