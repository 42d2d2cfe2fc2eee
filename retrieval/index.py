"""The retrieval corpus in Redis with the search module: one index for every tenant.

Layout (``<p>`` is the key prefix, ``banyan`` by default)::

    <p>:chunk:<tenant>:<document>:<n>  HASH  one chunk: tenant, collection, document_id, chunk, title,
                                             text, timestamp (epoch seconds), embedding (the vector's
                                             little-endian bytes in the index's vector type)
    <p>:doc:<tenant>:<document>        HASH  the document record: title, timestamp, collection, chunks,
                                             created, metadata (JSON)
    <p>:docs:<tenant>                  ZSET  document ids scored by creation time, for listing (and counting)
    <p>:stats:<tenant>                 HASH  chunks: the tenant's chunk count; chunks:<collection>: per collection
    <p>:df:<tenant>                    HASH  word -> number of the tenant's chunks that contain it

The search index covers ``<p>:chunk:`` hashes: ``embedding`` VECTOR (HNSW, cosine), ``title`` and
``text`` TEXT (BM25), ``tenant`` and ``collection`` TAG, ``timestamp`` NUMERIC.

Vector type: ``FLOAT16`` (the default) or ``FLOAT32`` (:data:`VECTOR_TYPES`), for the index and the stored
``embedding`` bytes alike (and the KNN query's blob). Vectors are most of what a chunk costs in memory (the hash
holds one copy, the HNSW index another); at half precision they take half as much and recall is unchanged for
unit-length MiniLM vectors (BENCHMARKS.md, "At 1M chunks"). A hash whose bytes do not fit the index's type is not
indexed at all (the search module counts an indexing failure and the chunk cannot be found by any query), so an
index created with the other type is refused at start (:meth:`ChunkIndex.ensure` raises :class:`IndexMismatch`)
rather than written to or read wrongly.

The statistics are kept in the same transactions as the chunks, because the search module cannot
give them cheaply; so a crash leaves them true (a transaction applies whole or not at all) and a deletion
gives back exactly what the document took. They bound what a tenant may hold (:class:`CorpusQuota`: its
documents are the size of ``docs``, its chunks the ``chunks`` count; :meth:`ChunkIndex.add_document`
checks them and writes in one optimistic transaction), and the queries need them to stay fast on large
tenants (:class:`QueryPlan`):

- a filtered KNN is run by brute force over the tenant's chunks when they are few (HNSW batches
  would have to walk much of the graph shared with every other tenant to find them), and by HNSW
  batches when they are many (brute force over 100k chunks takes ~25 ms here, batches ~0.3 ms);
- a BM25 query leaves out the words found in a large share of the tenant's chunks, and then the
  commonest of the others beyond a budget of chunks to score: such words weigh little in BM25 (a
  low IDF) and cost the most, since every chunk that holds them is scored (a word in all of 100k
  chunks made a query ~40 ms instead of ~3).

Isolation: every query this module sends is scoped by ``@tenant:{<tenant>}`` (in every alternative
of a union: see :func:`bm25_query`), built here from a validated tenant id with every
non-alphanumeric character escaped, and the caller's words only ever enter a query as escaped single
terms (runs of characters without any ASCII punctuation, space or control character; the one ASCII
symbol left, ``_``, is escaped too), so no input can change the query's structure or widen its scope. Keys hold
the tenant too, so a document id from another tenant simply does not exist.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import ResponseError, WatchError

from retrieval.errors import InvalidQuery, QuotaExceeded, RetrievalUnavailable, WriteRefused

# The search module's default English stop words, set explicitly so the index and the query
# builder agree: a text clause made only of stop words would match every chunk of the tenant.
STOPWORDS = frozenset((
    "a", "is", "the", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "it",
    "no", "not", "of", "on", "or", "such", "that", "their", "then", "there", "these", "they", "this", "to",
    "was", "will", "with",
))
MAX_QUERY_TERMS = 32
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DOCUMENT_RE = re.compile(r"^doc_[0-9a-f]{24}$")
# Words are split at every ASCII character that is not a letter, a digit or "_" (punctuation, spaces,
# control characters), as the search module's tokenizer does; other characters belong to words.
_SEPARATORS = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})
_ESCAPE_RE = re.compile(r"([^A-Za-z0-9\u0080-\U0010ffff])")
_RETURNED = ("document_id", "chunk", "title", "text", "timestamp", "collection", "embedding")

VectorType = Literal["FLOAT16", "FLOAT32"]
VECTOR_TYPES: dict[str, np.dtype[Any]] = {"FLOAT16": np.dtype("<f2"), "FLOAT32": np.dtype("<f4")}
"""The search module's vector types this index may use, and how their vectors are stored (little-endian)."""
DEFAULT_VECTOR_TYPE: VectorType = "FLOAT16"
assert set(get_args(VectorType)) == set(VECTOR_TYPES)


def encode_vector(vector: np.ndarray, vector_type: str) -> bytes:
    """The bytes of ``vector`` as the index of ``vector_type`` stores and queries them."""
    return np.asarray(vector, dtype=np.float32).astype(VECTOR_TYPES[vector_type], copy=False).tobytes()


def decode_vector(blob: bytes, vector_type: str, dimension: int) -> np.ndarray | None:
    """A stored vector as float32, or None when ``blob`` is not a vector of ``dimension`` in ``vector_type``."""
    dtype = VECTOR_TYPES[vector_type]
    if len(blob) != dimension * dtype.itemsize:
        return None
    return np.frombuffer(blob, dtype=dtype).astype(np.float32)


class IndexMismatch(RetrievalUnavailable):
    """The search index in Redis was created with another vector type or dimension than this gateway's settings
    (a start-up error: see :meth:`ChunkIndex.ensure`)."""


def escape(value: str) -> str:
    """Backslash-escape every ASCII character that is not a letter or digit (TAG values, terms)."""
    return _ESCAPE_RE.sub(r"\\\1", value)


def query_terms(text: str, *, limit: int = MAX_QUERY_TERMS) -> list[str]:
    """The distinct searchable words of ``text`` (lower case, no stop words), in order."""
    seen: dict[str, None] = {}
    for word in _words(text):
        if word not in STOPWORDS and word not in seen:
            seen[word] = None
            if len(seen) == limit:
                break
    return list(seen)


def passage_terms(text: str) -> frozenset[str]:
    """The distinct words of a passage (lower case, no stop words), for lexical comparisons."""
    return frozenset(_words(text)) - STOPWORDS


def _words(text: str) -> list[str]:
    return text.translate(_SEPARATORS).lower().split()


def is_document_id(value: str) -> bool:
    return bool(_DOCUMENT_RE.match(value))


def _check_tenant(tenant: str) -> str:
    if not _TENANT_RE.match(tenant):
        raise ValueError("invalid tenant id")  # the gateway validates tenants; this is a bug guard
    return tenant


def scope_filter(tenant: str, collection: str | None) -> str:
    """The filter in front of every query: the tenant, and the collection when one is asked for."""
    clause = f"@tenant:{{{escape(_check_tenant(tenant))}}}"
    if collection is not None:
        clause += f" @collection:{{{escape(collection)}}}"
    return clause


def bm25_query(tenant: str, terms: Sequence[str], collection: str | None) -> str:
    """``(<scope> t1) | (<scope> t2) | ...``: the scope is repeated inside every alternative.

    The plain form ``<scope> (t1|t2)`` is not used because the search module scores a union that sits
    under an intersection by the first term it finds in a chunk, not by all of them, so BM25 would
    depend on the order of the words. A union at the top sums its terms; every alternative is still
    an intersection with the tenant (and collection), so the result set is exactly as scoped."""
    scope = scope_filter(tenant, collection)
    return " | ".join(f"({scope} {escape(term)})" for term in terms)


@dataclass(frozen=True, slots=True)
class HnswConfig:
    m: int = 16
    ef_construction: int = 200
    ef_runtime: int = 64


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """How to query a scope (a tenant, or one collection of it) of a known size."""

    adhoc_max_chunks: int = 10_000
    """Up to this many chunks in scope, the KNN is brute force over them; above, HNSW batches."""
    common_term_share: float = 0.1
    common_term_min_chunks: int = 1_000
    """BM25 leaves out a word found in more than this share of the scope's chunks and in more than
    this many chunks (both: small tenants keep every word, where it costs nothing)."""
    max_postings: int = 8_000
    """Of the remaining words, BM25 keeps the rarest while the chunks holding them add up to at most
    this many: the cost of a BM25 query is the chunks it scores (about 0.4 us each here), and the
    rarest words are the ones that carry its weight. At 1M chunks (100k in the tenant) 8,000 against
    15,000 took the search p99 from 19.9 to 18.1 ms with the same known-item results (BENCHMARKS.md,
    "At 1M chunks")."""

    def knn_policy(self, scope_chunks: int | None) -> str | None:
        """``ADHOC_BF``, ``BATCHES``, or None (unknown size: the search module decides)."""
        if scope_chunks is None:
            return None
        return "ADHOC_BF" if scope_chunks <= self.adhoc_max_chunks else "BATCHES"

    def bm25_terms(self, terms: Sequence[str], frequencies: Mapping[str, int], scope_chunks: int | None) -> list[str]:
        """The query words worth a BM25 query, in their original order."""
        if scope_chunks is None:
            return list(terms)
        common = max(self.common_term_share * scope_chunks, self.common_term_min_chunks)
        # A word the scope lacks is kept: the index stems words and these counts do not, so it may
        # still match a variant (and if it matches nothing, it costs nothing).
        candidates = sorted((frequencies.get(t, 0), i) for i, t in enumerate(terms)
                            if frequencies.get(t, 0) <= common)
        kept, postings = [], 0
        for frequency, i in candidates:
            if postings + frequency > self.max_postings:
                break
            kept.append(i)
            postings += frequency
        return [terms[i] for i in sorted(kept)]


@dataclass(frozen=True, slots=True)
class Scope:
    """What is known about a query's scope before it runs: its size and its words' frequencies."""

    chunks: int | None
    frequencies: dict[str, int]


@dataclass(frozen=True, slots=True)
class CorpusSize:
    """What a tenant's documents hold."""

    documents: int
    chunks: int


class WriteGuard(Protocol):
    """A condition a write is made under: the Redis hash ``key`` holds exactly these field values (``""``: the
    field is absent); checked in the transaction of the write."""

    @property
    def key(self) -> str: ...

    @property
    def equals(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class CorpusQuota:
    """The most one tenant's documents may hold (None: no bound)."""

    max_documents: int | None = None
    max_chunks: int | None = None

    def check(self, size: CorpusSize, *, adding_chunks: int) -> None:
        """Raise :class:`QuotaExceeded` unless one more document of ``adding_chunks`` chunks fits."""
        if self.max_documents is not None and size.documents + 1 > self.max_documents:
            raise QuotaExceeded(f"Your documents are at the limit of {self.max_documents} documents; delete some "
                                "to add more.")
        if self.max_chunks is not None and size.chunks + adding_chunks > self.max_chunks:
            raise QuotaExceeded(f"This document's {adding_chunks} chunks would take your documents past the limit "
                                f"of {self.max_chunks} chunks (they hold {size.chunks}); delete some to add more.")


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    number: int
    text: str
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    id: str
    tenant: str
    title: str | None
    timestamp: float
    collection: str
    chunks: int
    created: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Hit:
    """One chunk found by a query, with what ranking and rendering need."""

    key: str
    document_id: str
    number: int
    title: str | None
    text: str
    timestamp: float
    collection: str
    vector: np.ndarray


class ChunkIndex:
    """Chunks, document records and the search index, in one Redis."""

    def __init__(self, redis: Redis, *, name: str = "banyan-chunks", prefix: str = "banyan", dimension: int = 384,
                 hnsw: HnswConfig | None = None, vector_type: str = DEFAULT_VECTOR_TYPE) -> None:
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"vector type must be one of {sorted(VECTOR_TYPES)}, not {vector_type!r}")
        self._redis = redis
        self.name = name
        self.prefix = prefix
        self.dimension = dimension
        self.hnsw = hnsw or HnswConfig()
        self.vector_type = vector_type

    # -- keys -----------------------------------------------------------------------------------

    def chunk_key(self, tenant: str, document_id: str, number: int) -> str:
        return f"{self.prefix}:chunk:{_check_tenant(tenant)}:{document_id}:{number}"

    def _doc_key(self, tenant: str, document_id: str) -> str:
        return f"{self.prefix}:doc:{_check_tenant(tenant)}:{document_id}"

    def _list_key(self, tenant: str) -> str:
        return f"{self.prefix}:docs:{_check_tenant(tenant)}"

    def _stats_key(self, tenant: str) -> str:
        return f"{self.prefix}:stats:{_check_tenant(tenant)}"

    def _df_key(self, tenant: str) -> str:
        return f"{self.prefix}:df:{_check_tenant(tenant)}"

    # -- the index ------------------------------------------------------------------------------

    async def exists(self) -> bool:
        names = await self._redis.execute_command("FT._LIST")
        return self.name in {_text(n) for n in names}

    async def ensure(self) -> bool:
        """Create the search index if it is absent; True when this call created it. An index that exists is
        checked: one of another vector type or dimension raises :class:`IndexMismatch` (nothing is changed)."""
        if await self.exists():
            await self.check()
            return False
        try:
            await self._redis.execute_command("FT.CREATE", *self._schema())
        except ResponseError:
            if await self.exists():  # another gateway replica created it first
                await self.check()
                return False
            raise
        return True

    async def vector_field(self) -> tuple[str, int]:
        """The vector type and dimension of the ``embedding`` field of the index in Redis (``FT.INFO``)."""
        info = _as_map(await self._redis.execute_command("FT.INFO", self.name))
        for attribute in _get(info, "attributes") or []:
            fields = _as_map(attribute)
            if _text(_get(fields, "identifier")) == "embedding":
                return _text(_get(fields, "data_type")).upper(), int(_get(fields, "dim"))
        raise IndexMismatch(f"The search index {self.name!r} has no `embedding` vector field.")

    async def check(self) -> None:
        """Raise :class:`IndexMismatch` unless the index in Redis stores vectors as this index would write them.

        Refused rather than migrated: gateway replicas share the index, and one still running with the other
        setting would go on writing vectors the new index cannot hold (each such chunk silently unfindable);
        re-encoding every chunk also takes minutes at a million chunks, too long for a start-up. Whoever changes
        the setting recreates the index on purpose (``FT.DROPINDEX`` keeps the chunks; their vectors must then be
        re-encoded, or the documents added again)."""
        vector_type, dimension = await self.vector_field()
        if vector_type != self.vector_type:
            raise IndexMismatch(
                f"The search index {self.name!r} stores {vector_type} vectors, but BANYAN_RETRIEVAL_VECTOR_TYPE is "
                f"{self.vector_type}: set BANYAN_RETRIEVAL_VECTOR_TYPE={vector_type} to use this index, or recreate "
                "it (another BANYAN_RETRIEVAL_INDEX, or drop it and add the documents again).")
        if dimension != self.dimension:
            raise IndexMismatch(
                f"The search index {self.name!r} holds vectors of dimension {dimension}, but the embedder's are "
                f"{self.dimension}: use the index's embedder, or another BANYAN_RETRIEVAL_INDEX.")

    def _schema(self) -> list[str | int | float]:
        h = self.hnsw
        return [
            self.name, "ON", "HASH", "PREFIX", 1, f"{self.prefix}:chunk:",
            "STOPWORDS", len(STOPWORDS), *sorted(STOPWORDS),
            "SCHEMA",
            "tenant", "TAG", "CASESENSITIVE",
            "collection", "TAG", "CASESENSITIVE",
            "title", "TEXT", "WEIGHT", 2.0,
            "text", "TEXT",
            "timestamp", "NUMERIC", "SORTABLE",
            "embedding", "VECTOR", "HNSW", 12, "TYPE", self.vector_type, "DIM", self.dimension,
            "DISTANCE_METRIC", "COSINE", "M", h.m, "EF_CONSTRUCTION", h.ef_construction, "EF_RUNTIME", h.ef_runtime,
        ]

    # -- documents ------------------------------------------------------------------------------

    async def add_document(self, document: DocumentRecord, chunks: Sequence[ChunkRecord], *,
                           quota: CorpusQuota | None = None, guard: WriteGuard | None = None) -> None:
        """Write a document and its chunks in one transaction: searchable all at once or not at all.

        With a ``quota``, the tenant's counts are read and the document written in one optimistic transaction
        (both count keys watched: a concurrent addition or deletion makes it read again), so concurrent
        additions cannot together pass the quota; over it, :class:`QuotaExceeded` and nothing is written. With a
        ``guard``, its hash is watched too and must hold its values when the document is written, else
        :class:`WriteRefused` and nothing is written (a tenant whose deletion began while its document was being
        embedded gets no document after its documents were cleaned up)."""
        tenant = document.tenant
        frequencies = _chunk_frequencies(document.title, (c.text for c in chunks))
        rows = self._rows(document, chunks)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    watched = [self._list_key(tenant), self._stats_key(tenant)] if quota is not None else []
                    watched += [guard.key] if guard is not None else []
                    if watched:
                        await pipe.watch(*watched)
                    if guard is not None:
                        held = await pipe.hmget(guard.key, list(guard.equals))
                        if [_text(v) if v is not None else "" for v in held] != list(guard.equals.values()):
                            raise WriteRefused("The tenant is being deleted: the document was not added.")
                    if quota is not None:
                        quota.check(await self._size(pipe, tenant), adding_chunks=len(chunks))
                    if watched:
                        pipe.multi()
                    self._write(pipe, document, rows)
                    self._count(pipe, tenant, document.collection, len(chunks), frequencies)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def add_documents(self, documents: Sequence[tuple[DocumentRecord, Sequence[ChunkRecord]]]) -> None:
        """Write several documents and their chunks in one transaction, without quota or guard (bulk loads): the
        same keys and statistics as :meth:`add_document` for each, in one round trip; the statistics of the batch
        are summed per tenant first (one increment per word, not one per word and document)."""
        counts: dict[tuple[str, str], tuple[int, Counter[str]]] = {}
        async with self._redis.pipeline(transaction=True) as pipe:
            for document, chunks in documents:
                self._write(pipe, document, self._rows(document, chunks))
                chunk_count, frequencies = counts.get((document.tenant, document.collection), (0, Counter()))
                frequencies.update(_chunk_frequencies(document.title, (c.text for c in chunks)))
                counts[document.tenant, document.collection] = (chunk_count + len(chunks), frequencies)
            for tenant in {t for t, _ in counts}:
                total: Counter[str] = Counter()
                for (t, collection), (chunk_count, frequencies) in counts.items():
                    if t == tenant:
                        pipe.hincrby(self._stats_key(tenant), f"chunks:{collection}", chunk_count)
                        total.update(frequencies)
                pipe.hincrby(self._stats_key(tenant), "chunks",
                             sum(n for (t, _), (n, _f) in counts.items() if t == tenant))
                for term, count in total.items():
                    pipe.hincrby(self._df_key(tenant), term, count)
            await pipe.execute()

    def _rows(self, document: DocumentRecord, chunks: Sequence[ChunkRecord]) -> list[tuple[str, dict[Any, Any]]]:
        return [(self.chunk_key(document.tenant, document.id, chunk.number), {
            "tenant": document.tenant, "collection": document.collection, "document_id": document.id,
            "chunk": chunk.number, "title": document.title or "", "text": chunk.text,
            "timestamp": repr(document.timestamp), "embedding": encode_vector(chunk.vector, self.vector_type),
        }) for chunk in chunks]

    def _write(self, pipe: Any, document: DocumentRecord, rows: Sequence[tuple[str, dict[Any, Any]]]) -> None:
        for key, mapping in rows:
            pipe.hset(key, mapping=mapping)
        pipe.hset(self._doc_key(document.tenant, document.id), mapping=_encode_document(document))
        pipe.zadd(self._list_key(document.tenant), {document.id: document.created})

    async def size(self, tenant: str) -> CorpusSize:
        """How many documents and chunks the tenant holds."""
        return await self._size(self._redis, tenant)

    async def _size(self, client: Any, tenant: str) -> CorpusSize:
        documents = await client.zcard(self._list_key(tenant))
        chunks = await client.hget(self._stats_key(tenant), "chunks")
        # No count (documents from before the statistics existed): they are not held against the quota.
        return CorpusSize(documents=int(documents), chunks=max(0, int(chunks or 0)))

    def _count(self, pipe: Any, tenant: str, collection: str, chunks: int, frequencies: Counter[str]) -> None:
        pipe.hincrby(self._stats_key(tenant), "chunks", chunks)
        pipe.hincrby(self._stats_key(tenant), f"chunks:{collection}", chunks)
        for term, count in frequencies.items():
            pipe.hincrby(self._df_key(tenant), term, count)

    async def get_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        if not is_document_id(document_id):
            return None
        raw = await self._redis.hgetall(self._doc_key(tenant, document_id))
        return _decode_document(tenant, raw) if raw else None

    async def list_documents(self, tenant: str, *, limit: int, after: str | None) -> tuple[list[DocumentRecord], bool]:
        """A page of the tenant's documents, newest first; ``after`` is the last id of the previous page."""
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(self._list_key(tenant), after) if is_document_id(after) else None
            if not isinstance(rank, int):
                raise InvalidQuery("`after` is not the id of one of your documents.", param="after")
            start = rank + 1
        ids = [_text(i) for i in await self._redis.zrevrange(self._list_key(tenant), start, start + limit)]
        has_more = len(ids) > limit
        async with self._redis.pipeline(transaction=False) as pipe:
            for document_id in ids[:limit]:
                pipe.hgetall(self._doc_key(tenant, document_id))
            raws = await pipe.execute()
        return [_decode_document(tenant, raw) for raw in raws if raw], has_more

    async def export_documents(self, tenant: str, *, collection: str | None, limit: int | None,
                               batch: int = 500) -> list[tuple[DocumentRecord, list[str]]]:
        """The tenant's documents (only ``collection``'s when given) with their chunks' texts in order, in the
        order they were added, at most ``limit`` of them (None: all). Pipelined: a round trip per ``batch``
        records, and per ``batch`` chunks, never one per chunk."""
        ids = [_text(i) for i in await self._redis.zrange(self._list_key(tenant), 0, -1)]
        records: list[DocumentRecord] = []
        for start in range(0, len(ids), batch):
            if limit is not None and len(records) >= limit:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for document_id in ids[start:start + batch]:
                    pipe.hgetall(self._doc_key(tenant, document_id))
                raws = await pipe.execute()
            records.extend(r for r in (_decode_document(tenant, raw) for raw in raws if raw)
                           if collection is None or r.collection == collection)
        records = records[:limit] if limit is not None else records
        keys = [(i, self.chunk_key(tenant, r.id, n)) for i, r in enumerate(records) for n in range(r.chunks)]
        texts: list[list[str]] = [[] for _ in records]
        for start in range(0, len(keys), batch):
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, key in keys[start:start + batch]:
                    pipe.hget(key, "text")
                values = await pipe.execute()
            for (i, _), value in zip(keys[start:start + batch], values, strict=True):
                if value is not None:  # a chunk deleted meanwhile (its document with it)
                    texts[i].append(_text(value))
        return [(r, t) for r, t in zip(records, texts, strict=True) if t]

    async def delete_document(self, tenant: str, document_id: str) -> bool:
        """Remove a document, its chunks and their counts; False when it does not exist. The document
        record is watched, so two concurrent deletions cannot both subtract its counts."""
        if not is_document_id(document_id):
            return False
        doc_key = self._doc_key(tenant, document_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(doc_key)
                    raw = await pipe.hgetall(doc_key)
                    if not raw:
                        return False
                    document = _decode_document(tenant, raw)
                    keys = [self.chunk_key(tenant, document_id, n) for n in range(document.chunks)]
                    texts = await self._chunk_texts(keys)
                    pipe.multi()
                    pipe.delete(doc_key, *keys)
                    pipe.zrem(self._list_key(tenant), document_id)
                    frequencies = _chunk_frequencies(document.title, texts)
                    self._count(pipe, tenant, document.collection, -document.chunks,
                                Counter({t: -n for t, n in frequencies.items()}))
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def _chunk_texts(self, keys: Sequence[str]) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "text")
            return [_text(t) for t in await pipe.execute() if t is not None]

    async def delete_tenant(self, tenant: str) -> int:
        """Remove every document and chunk of a tenant; the number of keys removed."""
        removed = 0
        ids = [_text(i) for i in await self._redis.zrange(self._list_key(tenant), 0, -1)]
        for start in range(0, len(ids), 200):
            batch = ids[start:start + 200]
            async with self._redis.pipeline(transaction=False) as pipe:
                for document_id in batch:
                    pipe.hget(self._doc_key(tenant, document_id), "chunks")
                counts = await pipe.execute()
            keys = [self._doc_key(tenant, d) for d in batch]
            for document_id, count in zip(batch, counts, strict=True):
                keys.extend(self.chunk_key(tenant, document_id, n) for n in range(int(count or 0)))
            removed += int(await self._redis.delete(*keys))
        # A sweep for anything a concurrent ingestion wrote while we were deleting.
        for pattern in (f"{self.prefix}:chunk:{tenant}:*", f"{self.prefix}:doc:{tenant}:*"):
            removed += await self._delete_matching(pattern)
        removed += int(await self._redis.delete(self._list_key(tenant), self._stats_key(tenant),
                                                self._df_key(tenant)))
        return removed

    async def _delete_matching(self, pattern: str) -> int:
        removed = 0
        batch: list[Any] = []
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 500:
                removed += int(await self._redis.delete(*batch))
                batch = []
        if batch:
            removed += int(await self._redis.delete(*batch))
        return removed

    # -- queries --------------------------------------------------------------------------------

    async def scope(self, tenant: str, collection: str | None, terms: Sequence[str]) -> Scope:
        """The size of the scope and how many of its chunks hold each term (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._stats_key(tenant), "chunks" if collection is None else f"chunks:{collection}")
            pipe.hmget(self._df_key(tenant), list(terms) or ["-"])
            size, counts = await pipe.execute()
        frequencies = {t: int(c) for t, c in zip(terms, counts, strict=False) if c is not None}
        # Documents from before the statistics existed leave the size unknown: no plan, no pruning.
        return Scope(chunks=int(size) if size is not None else None, frequencies=frequencies)

    async def knn(self, tenant: str, vector: np.ndarray, *, k: int, collection: str | None,
                  policy: str | None = None) -> list[Hit]:
        """The ``k`` nearest chunks of the tenant (cosine), nearest first. ``policy`` is the search
        module's hybrid policy for the tenant filter (see :class:`QueryPlan`)."""
        blob = encode_vector(vector, self.vector_type)
        if policy == "ADHOC_BF":  # exact: no HNSW parameters
            knn, params = "KNN $k @embedding $vec HYBRID_POLICY ADHOC_BF", ["PARAMS", 4, "k", k, "vec", blob]
        else:
            knn = "KNN $k @embedding $vec EF_RUNTIME $ef" + (f" HYBRID_POLICY {policy}" if policy else "")
            params = ["PARAMS", 6, "k", k, "vec", blob, "ef", max(k, self.hnsw.ef_runtime)]
        query = f"({scope_filter(tenant, collection)})=>[{knn} AS knn_distance]"
        reply = await self._redis.execute_command(
            "FT.SEARCH", self.name, query, *params, "SORTBY", "knn_distance", "LIMIT", 0, k,
            "RETURN", len(_RETURNED), *_RETURNED, "DIALECT", 2)
        return [self._hit(key, fields) for key, fields in parse_search_reply(reply)]

    async def bm25(self, tenant: str, terms: Sequence[str], *, k: int, collection: str | None) -> list[Hit]:
        """The ``k`` best chunks of the tenant for any of ``terms`` by BM25, best first."""
        if not terms:
            return []
        reply = await self._redis.execute_command(
            "FT.SEARCH", self.name, bm25_query(tenant, terms, collection), "SCORER", "BM25STD", "LIMIT", 0, k,
            "RETURN", len(_RETURNED), *_RETURNED, "DIALECT", 2)
        return [self._hit(key, fields) for key, fields in parse_search_reply(reply)]

    def _hit(self, key: str, fields: Mapping[str, bytes]) -> Hit:
        vector = decode_vector(fields.get("embedding", b""), self.vector_type, self.dimension)
        if vector is None:
            vector = np.zeros(self.dimension, dtype=np.float32)
        title = _text(fields.get("title", b""))
        return Hit(key=key, document_id=_text(fields.get("document_id", b"")), number=int(fields.get("chunk", 0)),
                   title=title or None, text=_text(fields.get("text", b"")),
                   timestamp=float(fields.get("timestamp", 0.0)), collection=_text(fields.get("collection", b"")),
                   vector=vector)


def parse_search_reply(reply: Any) -> list[tuple[str, dict[str, bytes]]]:
    """``FT.SEARCH`` results as (key, fields), for both reply shapes redis-py may hand back: the RESP2
    list ``[total, key, [field, value, ...], ...]`` and the map with ``results`` (RESP3, and what recent
    redis-py versions turn RESP2 replies into)."""
    if isinstance(reply, Mapping):
        results = _get(reply, "results") or []
        out = []
        for item in results:
            attributes = _get(item, "extra_attributes") or {}
            out.append((_text(_get(item, "id")), {_text(k): _raw(v) for k, v in attributes.items()}))
        return out
    items = list(reply)[1:]
    out = []
    for key, values in zip(items[0::2], items[1::2], strict=False):
        flat = list(values or [])
        out.append((_text(key), {_text(f): _raw(v) for f, v in zip(flat[0::2], flat[1::2], strict=False)}))
    return out


def _as_map(value: Any) -> Mapping[Any, Any]:
    """A reply that is a map (RESP3, recent redis-py) or a flat ``[name, value, ...]`` list (RESP2) as a map."""
    if isinstance(value, Mapping):
        return value
    items = list(value or [])
    return dict(zip(items[0::2], items[1::2], strict=False))


def _get(mapping: Mapping[Any, Any], name: str) -> Any:
    return mapping.get(name, mapping.get(name.encode()))


def _raw(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunk_frequencies(title: str | None, texts: Iterable[str]) -> Counter[str]:
    """How many of these chunks (each with the title) hold each word."""
    counts: Counter[str] = Counter()
    heading = passage_terms(title) if title else frozenset()
    for text in texts:
        counts.update(passage_terms(text) | heading)
    return counts


def _encode_document(document: DocumentRecord) -> dict[Any, str | int | float]:
    return {"id": document.id, "title": document.title or "", "timestamp": repr(document.timestamp),
            "collection": document.collection, "chunks": document.chunks, "created": repr(document.created),
            "metadata": json.dumps(document.metadata)}


def _decode_document(tenant: str, raw: Mapping[Any, Any]) -> DocumentRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return DocumentRecord(id=fields["id"], tenant=tenant, title=fields.get("title") or None,
                          timestamp=float(fields["timestamp"]), collection=fields["collection"],
                          chunks=int(fields["chunks"]), created=float(fields["created"]),
                          metadata=json.loads(fields.get("metadata") or "{}"))
