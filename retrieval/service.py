"""The retrieval service: ingest, list, get and delete a tenant's documents; retrieve passages.

Ingestion: validate -> chunk (off the event loop) -> embed ``title + chunk`` in batches (off the
event loop, one batch at a time so queries interleave) -> write the document and its chunks in one
Redis transaction. Grounding (:meth:`DocumentService.context_for`, the one call the gateway makes for
``rag``): retrieve, then build the numbered context within a token budget (:mod:`retrieval.context`).
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from redis.asyncio import Redis

from retrieval.chunking import ChunkingConfig, chunk_document
from retrieval.context import CharEstimate, Context, TokenCounter, build_context
from retrieval.documents import NewDocument, Passage, check_collection, validate
from retrieval.embedding import Embedder
from retrieval.errors import DocumentNotFound, InvalidQuery
from retrieval.index import (
    ChunkIndex,
    ChunkRecord,
    DocumentRecord,
    Hit,
    HnswConfig,
    QueryPlan,
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
    embedding_batch_size: int = 32
    min_candidates: int = 24
    """Each list (vector, BM25) fetches ``max(min_candidates, candidates_per_result * top_k)``."""
    candidates_per_result: int = 5
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    hnsw: HnswConfig = field(default_factory=HnswConfig)
    plan: QueryPlan = field(default_factory=QueryPlan)

    def candidates(self, top_k: int) -> int:
        return min(100, max(self.min_candidates, self.candidates_per_result * top_k))


class Documents(Protocol):
    """The retrieval service as the gateway uses it: the documents routes, grounding a request
    (:meth:`context_for`), deleting a tenant, and the app's lifespan (:class:`DocumentService`; the unit tests'
    in-memory fake)."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def add(self, tenant: str, document: NewDocument) -> DocumentRecord: ...
    async def list_documents(self, tenant: str, *, limit: int = 20,
                             after: str | None = None) -> tuple[list[DocumentRecord], bool]: ...
    async def get(self, tenant: str, document_id: str) -> DocumentRecord: ...
    async def delete(self, tenant: str, document_id: str) -> None: ...
    async def delete_tenant(self, tenant: str) -> int: ...
    async def retrieve(self, tenant: str, query: str, *, top_k: int = 4,
                       collection: str | None = None) -> list[Passage]: ...
    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None) -> Context: ...


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
                                dimension=embedder.dimension, hnsw=self.config.hnsw)
        self._observer: Observer = observer or _NoObserver()
        self._index_ready = False
        self._index_lock = asyncio.Lock()
        # One embedding batch runs at a time anyway (one model, two cores); waiting batches queue
        # here rather than each holding a thread of the loop's default pool.
        self._embedding_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="banyan-embed")

    async def start(self) -> None:
        """Load the embedding model (a warm-up batch, off the event loop) and create the search index
        if it is absent. An unreachable Redis is only logged: the index is created on first use."""
        await self._embed_batch(["warm-up"])
        try:
            await self.ensure_index()
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

    async def add(self, tenant: str, document: NewDocument) -> DocumentRecord:
        valid = validate(document, max_bytes=self.config.max_document_bytes, now=time.time())
        await self.ensure_index()
        pieces = await asyncio.to_thread(chunk_document, valid.text, title=valid.title, tokenizer=self.embedder,
                                         config=self.config.chunking)
        texts = [p.text for p in pieces]
        started = time.perf_counter()
        vectors = await self.embed([p.embedded for p in pieces])
        stored = time.perf_counter()
        self._observer.retrieval_stage("ingest_embed", stored - started)
        record = DocumentRecord(id=new_document_id(), tenant=tenant, title=valid.title, timestamp=valid.timestamp,
                                collection=valid.collection, chunks=len(texts), created=time.time(),
                                metadata=valid.metadata)
        chunks = [ChunkRecord(number=n, text=t, vector=v) for n, (t, v) in enumerate(zip(texts, vectors, strict=True))]
        await self.index.add_document(record, chunks)
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

    # -- retrieval ------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``, a batch at a time in the embedding thread."""
        size = self.config.embedding_batch_size
        batches = [await self._embed_batch(texts[i:i + size]) for i in range(0, len(texts), size)]
        return np.vstack(batches) if batches else np.zeros((0, self.embedder.dimension), dtype=np.float32)

    async def _embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._embedding_thread, self.embedder.embed, texts)

    async def aclose(self) -> None:
        self._embedding_thread.shutdown(wait=False, cancel_futures=True)

    async def context_for(self, tenant: str, query: str, *, budget_tokens: int, top_k: int = 4,
                          collection: str | None = None) -> Context:
        """The numbered context of the passages of the tenant's documents best for ``query`` that fit in
        ``budget_tokens`` (base-model tokens), and those passages. A query longer than retrieval reads is
        cut to its head."""
        passages = await self.retrieve(tenant, query[:MAX_QUERY_CHARS], top_k=top_k, collection=collection)
        if not passages:
            return Context(text="", passages=[])
        return await asyncio.to_thread(build_context, passages, budget_tokens=budget_tokens, tokens=self.tokens)

    async def retrieve(self, tenant: str, query: str, *, top_k: int = 4,
                       collection: str | None = None) -> list[Passage]:
        """The ``top_k`` best passages of the tenant's documents for ``query``, best first."""
        _check_query(query, top_k, collection)
        started = time.perf_counter()
        vector = (await self._embed_batch([query]))[0]
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
        passages = [_passage(cast(Hit, c.payload), c.score) for c in best]
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


def _passage(hit: Hit, score: float) -> Passage:
    return Passage(document_id=hit.document_id, chunk_id=f"{hit.document_id}:{hit.number}", title=hit.title,
                   text=hit.text, score=score, timestamp=hit.timestamp)
