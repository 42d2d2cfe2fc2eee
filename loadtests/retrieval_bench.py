"""Retrieval benchmark: ingestion rate, query latency and Redis memory per chunk with 100k chunks in one tenant
among 300k (or 1M), and FLOAT16 against FLOAT32 vectors side by side.

    .venv/bin/python -m loadtests.retrieval_bench            # 300k chunks, 100k in one tenant (~15 min)
    .venv/bin/python -m loadtests.retrieval_bench --total 1000000 --target 100000   # the 1M run
    .venv/bin/python -m loadtests.retrieval_bench --quick    # 30k chunks, 10k in one tenant (~2 min)
    .venv/bin/python -m loadtests.retrieval_bench --compare-types --total 100000 --target 50000
    .venv/bin/python -m loadtests.retrieval_bench --total 1000000 --target 100000 --postings 11000 --postings 15000

Self-contained and bounded: it starts its own Valkey with the search module on a free loopback port
(no gateway or engine is needed), stops it (by process id) at the end, and touches nothing else. It
prints its figures, then a line ``RESULT {json}``. What it measures, with the code the
gateway runs (``retrieval.service.DocumentService``, the production index schema):

1. Ingestion, for real: synthetic documents through ``DocumentService.add`` (chunking, all-MiniLM-L6-v2
   embeddings in batches, one Redis transaction per document) -> chunks/s end to end, and the
   embedding alone on the same chunks (ingestion is embedding-bound).
2. Fill: the rest of the 300k chunks is added with ``ChunkIndex.add_document`` (the same transaction
   and statistics as a real document) without embedding, because embedding them all at this
   machine's rate would take hours. Their text is synthetic (the same Zipf vocabulary as the
   real documents) and their vectors are the real embeddings of step 1 with Gaussian noise added
   (cosine about 0.8 to the original, renormalised), so the index holds clustered, realistic-looking
   vectors rather than uniform random ones (which are the easy case for nothing and the worst case
   for HNSW alike). The target tenant gets ``--target`` chunks, the others share the rest.
3. Queries, one at a time: query text is taken from the target tenant's real chunks and reworded
   (words dropped and shuffled); the query embedding is timed apart from the search. "search" is
   ``DocumentService.search``: the scope lookup, then the vector KNN and the BM25 query (both
   tenant-scoped and planned for the scope's size, in parallel), then ranking; the two Redis queries
   are also timed alone. Each query comes from a known document: how often that document is among the
   results (the search's top 4, the KNN's candidates) is counted too.
4. Memory: Redis ``used_memory`` after the fill less before the first write, per chunk, and where it goes:
   the HNSW index (its vectors, ``dimension x`` the type's size each, and the graph: the rest of
   ``vector_index_sz_mb``), the text/tag/numeric indexes (``FT.INFO`` sizes), the chunk hashes (``MEMORY USAGE``
   of sampled keys, with the vector bytes they hold), the document records and the per-tenant statistics.

``--compare-types``: two Valkeys, one index ``FLOAT32`` and one ``FLOAT16``, written the same chunks with the same
vectors (the real ingestion goes to the FLOAT32 one and is copied exactly); both get the same queries, the
labelled set of the retrieval tests (``tests/integration/retrieval_corpus.py``: recall@4 of the relevant
document) and the known-item queries; memory per chunk of both at the same size.

``--postings N`` (repeatable): the same queries on the same index also under a BM25 word budget of ``N`` chunks
(``retrieval.index.QueryPlan.max_postings``, default 8,000) before the default one: search p50 / p99, BM25 p99 and
the known-item rates per budget (``<type>_postings_<N>_*`` in ``RESULT``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from gateway.dev.processes import Children
from loadtests._stack import start_search_valkey
from loadtests._stats import percentile
from retrieval.chunking import chunk_document
from retrieval.documents import NewDocument
from retrieval.embedding import SentenceTransformerEmbedder
from retrieval.index import DEFAULT_VECTOR_TYPE, VECTOR_TYPES, ChunkRecord, DocumentRecord, decode_vector, query_terms
from retrieval.service import DocumentService, RetrievalConfig, new_document_id

TARGET = "bench-target"


class Text:
    """Synthetic prose: sentences of words drawn from a Zipf-distributed vocabulary."""

    def __init__(self, seed: int, vocabulary: int = 20000) -> None:
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words: set[str] = set()
        while len(words) < vocabulary:
            words.add("".join(self.rng.choice(letters) for _ in range(self.rng.randint(3, 10))))
        self.words = sorted(words)
        weights = 1.0 / np.arange(1, vocabulary + 1) ** 1.07
        self.cumulative = np.cumsum(weights / weights.sum())
        self.np_rng = np.random.default_rng(seed)

    def sentence(self) -> str:
        n = self.rng.randint(8, 22)
        picks = np.searchsorted(self.cumulative, self.np_rng.random(n))
        return " ".join(self.words[min(i, len(self.words) - 1)] for i in picks).capitalize() + "."

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def filler_paragraph(self, sentences: int) -> str:
        """Like :meth:`paragraph` (same word distribution and sentence lengths), with the words of all its
        sentences drawn at once: the fill makes a million of them."""
        lengths = [self.rng.randint(8, 22) for _ in range(sentences)]
        picks = np.minimum(np.searchsorted(self.cumulative, self.np_rng.random(sum(lengths))), len(self.words) - 1)
        words = [self.words[i] for i in picks.tolist()]
        out, at = [], 0
        for n in lengths:
            out.append(" ".join(words[at:at + n]).capitalize() + ".")
            at += n
        return " ".join(out)

    def document(self, paragraphs: int) -> str:
        return "\n\n".join(self.paragraph(self.rng.randint(4, 9)) for _ in range(paragraphs))


def _decode(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _pct(values: list[float], p: float) -> float:
    return percentile(values, p) * 1000.0


def _line(name: str, values: list[float]) -> str:
    return (f"  {name:<34} p50 {_pct(values, 50):7.2f} ms   p99 {_pct(values, 99):7.2f} ms   "
            f"mean {np.mean(values) * 1000:7.2f} ms   (n={len(values)})")


def _chunks(service: DocumentService, body: str) -> list[str]:
    chunks = chunk_document(body, title=None, tokenizer=service.embedder, config=service.config.chunking)
    return [c.text for c in chunks]


async def ingest(service: DocumentService, text: Text, chunks_wanted: int) -> tuple[float, float, list[str]]:
    """Real ingestion into the target tenant: (chunks/s end to end, chunks/s embedding only, document ids)."""
    documents = []
    planned = 0
    while planned < chunks_wanted:
        body = text.document(text.rng.randint(2, 6))
        documents.append(body)
        planned += len(_chunks(service, body))
    started = time.perf_counter()
    chunks = 0
    ids = []
    for i, body in enumerate(documents):
        record = await service.add(TARGET, NewDocument(text=body, title=f"Synthetic report {i}",
                                                       timestamp=f"20{20 + i % 5}-0{1 + i % 9}-1{i % 10}T08:00:00Z"))
        chunks += record.chunks
        ids.append(record.id)
    end_to_end = chunks / (time.perf_counter() - started)
    sample = [c for body in documents[:40] for c in _chunks(service, body)][:256]
    started = time.perf_counter()
    await service.embed(sample)
    embed_only = len(sample) / (time.perf_counter() - started)
    return end_to_end, embed_only, ids


async def fill(services: list[DocumentService], base: np.ndarray, text: Text, *, total: int, target: int,
               others: int, already: int, seed: int, per_trip: int, writers: int) -> float:
    """Add synthetic documents (4 chunks each) with ``ChunkIndex.add_documents`` (what ``add_document`` stores,
    ``per_trip`` documents a transaction) until the index holds ``total`` chunks; ``writers`` transactions in
    flight at once; every batch goes to each of ``services`` (the same documents and vectors). The write rate in
    chunks/s."""
    rng = np.random.default_rng(seed)
    plan = [(TARGET, target - already)] + [(f"bench-other-{i}", (total - target) // others) for i in range(others)]
    started = time.perf_counter()
    written = 0
    next_note = 50_000
    pending: set[asyncio.Future[object]] = set()
    for tenant, count in plan:
        for start in range(0, count, 4 * per_trip):
            batch = []
            for first in range(start, min(start + 4 * per_trip, count), 4):
                n = min(4, count - first)
                noise = rng.standard_normal((n, base.shape[1])).astype(np.float32) * 0.035
                vectors = base[rng.integers(0, len(base), n)] + noise
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                record = DocumentRecord(id=new_document_id(), tenant=tenant, title="Synthetic filler",
                                        timestamp=1.6e9 + float(rng.integers(0, 10**8)), collection="default",
                                        chunks=n, created=time.time())
                chunks = [ChunkRecord(number=j, text=text.filler_paragraph(text.rng.randint(6, 12)), vector=vectors[j])
                          for j in range(n)]
                batch.append((record, chunks))
                written += n
            if len(pending) >= writers:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.ensure_future(asyncio.gather(*(s.index.add_documents(batch) for s in services))))
            if written + already >= next_note:
                next_note += 50_000
                rate = written / (time.perf_counter() - started)
                print(f"  ... {written + already} chunks written ({rate:.0f} chunks/s, load average "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
    for task in pending:
        await task
    return written / (time.perf_counter() - started)


async def _real_vectors(redis: Redis, service: DocumentService) -> np.ndarray:
    pattern = f"{service.index.prefix}:chunk:{TARGET}:*"
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "embedding")
        blobs = await pipe.execute()
    index = service.index
    vectors = [decode_vector(b, index.vector_type, index.dimension) for b in blobs if b]
    return np.vstack([v for v in vectors if v is not None])


async def copy_documents(source: DocumentService, target: DocumentService, tenant: str, ids: list[str]) -> None:
    """The documents ``ids`` of ``source`` written to ``target`` as they are (records, texts, vectors)."""
    redis = source.index._redis
    for document_id in ids:
        record = await source.index.get_document(tenant, document_id)
        assert record is not None
        keys = [source.index.chunk_key(tenant, document_id, n) for n in range(record.chunks)]
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["text", "embedding"])
            rows = await pipe.execute()
        chunks = []
        for n, (text, blob) in enumerate(rows):
            vector = decode_vector(blob, source.index.vector_type, source.index.dimension)
            assert vector is not None
            chunks.append(ChunkRecord(number=n, text=_decode(text), vector=vector))
        await target.index.add_documents([(record, chunks)])


async def memory(redis: Redis, service: DocumentService, *, baseline: int, tenants: list[str],
                 samples: int = 400) -> dict[str, float]:
    """Redis memory after the fill: the total per chunk, and where it goes (bytes per chunk)."""
    index = service.index
    info = await redis.execute_command("FT.INFO", index.name)
    fields = {_decode(k): v for k, v in (info.items() if isinstance(info, dict)
                                          else zip(info[0::2], info[1::2], strict=False))}
    chunks = int(fields["num_docs"])
    used = int((await redis.info("memory"))["used_memory"])

    def mb(name: str) -> float:
        return float(fields.get(name) or 0.0) * 2**20

    vectors = chunks * index.dimension * VECTOR_TYPES[index.vector_type].itemsize
    text_index = sum(mb(n) for n in ("inverted_sz_mb", "offset_vectors_sz_mb", "doc_table_size_mb",
                                      "key_table_size_mb", "tag_overhead_sz_mb", "text_overhead_sz_mb",
                                      "sortable_values_size_mb"))
    keys: list[bytes] = []
    async for key in redis.scan_iter(match=f"{index.prefix}:chunk:*", count=1000):
        keys.append(key)
        if len(keys) >= samples:
            break
    doc_keys: list[bytes] = []
    async for key in redis.scan_iter(match=f"{index.prefix}:doc:*", count=1000):
        doc_keys.append(key)
        if len(doc_keys) >= samples:
            break
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys + doc_keys:
            pipe.memory_usage(key, samples=0)
        for key in keys:
            pipe.hstrlen(key, "text")
        usage = await pipe.execute()
    chunk_hash = float(np.mean(usage[:len(keys)]))
    doc_hash = float(np.mean(usage[len(keys):len(keys) + len(doc_keys)]))
    text_bytes = float(np.mean(usage[len(keys) + len(doc_keys):]))
    documents, statistics = 0, 0
    for tenant in tenants:
        documents += int(await redis.zcard(f"{index.prefix}:docs:{tenant}"))
        for key in (f"{index.prefix}:stats:{tenant}", f"{index.prefix}:df:{tenant}"):
            statistics += int(await redis.memory_usage(key, samples=0) or 0)
    lists = sum([int(await redis.memory_usage(f"{index.prefix}:docs:{t}", samples=0) or 0) for t in tenants])
    per = 1.0 / max(1, chunks)
    return {
        "chunks": chunks, "used_memory_bytes": used, "used_memory_delta_bytes": used - baseline,
        "per_chunk_bytes": round((used - baseline) * per),
        "hnsw_bytes_per_chunk": round(mb("vector_index_sz_mb") * per),
        "hnsw_vectors_bytes_per_chunk": round(vectors * per),
        "hnsw_graph_bytes_per_chunk": round((mb("vector_index_sz_mb") - vectors) * per),
        "text_tag_numeric_index_bytes_per_chunk": round(text_index * per),
        "inverted_index_bytes_per_chunk": round(mb("inverted_sz_mb") * per),
        "chunk_hash_bytes": round(chunk_hash),
        "chunk_hash_vector_bytes": index.dimension * VECTOR_TYPES[index.vector_type].itemsize,
        "chunk_hash_text_bytes": round(text_bytes),
        "document_records_bytes_per_chunk": round((doc_hash * documents + lists) * per),
        "statistics_bytes_per_chunk": round(statistics * per),
        "statistics_bytes": statistics,
    }


def _memory_lines(label: str, m: dict[str, float]) -> str:
    return "\n".join([
        f"  {label}: {m['chunks']:.0f} chunks, used_memory {m['used_memory_bytes'] / 2**30:.2f} GiB, "
        f"{m['per_chunk_bytes']:.0f} bytes per chunk (delta since before the first write)",
        f"    HNSW index {m['hnsw_bytes_per_chunk']:.0f} B/chunk: vectors {m['hnsw_vectors_bytes_per_chunk']:.0f}, "
        f"graph and overhead {m['hnsw_graph_bytes_per_chunk']:.0f}",
        f"    chunk hash {m['chunk_hash_bytes']:.0f} B (MEMORY USAGE, sampled): vector "
        f"{m['chunk_hash_vector_bytes']:.0f}, text {m['chunk_hash_text_bytes']:.0f}, other fields and overhead "
        f"{m['chunk_hash_bytes'] - m['chunk_hash_vector_bytes'] - m['chunk_hash_text_bytes']:.0f}",
        f"    text/tag/numeric indexes {m['text_tag_numeric_index_bytes_per_chunk']:.0f} B/chunk (inverted "
        f"{m['inverted_index_bytes_per_chunk']:.0f}); document records {m['document_records_bytes_per_chunk']:.0f}"
        f" B/chunk; per-tenant statistics {m['statistics_bytes_per_chunk']:.0f} B/chunk "
        f"({m['statistics_bytes'] / 2**20:.1f} MiB)",
    ])


async def queries(redis: Redis, service: DocumentService, documents: list[str], count: int,
                  seed: int) -> tuple[dict[str, list[float]], dict[str, float], list[list[str]]]:
    """Timings, known-item hit rates (the query's source document among the search's results, and among the
    KNN's candidates), and the KNN's candidate keys per query."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        document_id = rng.choice(documents)
        texts.append((document_id, _decode(await redis.hget(service.index.chunk_key(TARGET, document_id, 0), "text"))))
    timings: dict[str, list[float]] = {"embed": [], "search": [], "knn": [], "bm25": []}
    found = {"search": 0, "knn": 0}
    knn_keys: list[list[str]] = []
    n, plan = service.config.candidates(4), service.config.plan
    for i, (document_id, source) in enumerate(texts):
        words = source.split()
        start = rng.randrange(max(1, len(words) - 12))
        picked = words[start:start + 12]
        rng.shuffle(picked)
        query = " ".join(picked[:rng.randint(5, 10)])
        t0 = time.perf_counter()
        vector = (await service.embed([query]))[0]
        t1 = time.perf_counter()
        passages = await service.search(TARGET, query, vector, top_k=4)
        t2 = time.perf_counter()
        scope = await service.index.scope(TARGET, None, query_terms(query))
        t3 = time.perf_counter()
        knn = await service.index.knn(TARGET, vector, k=n, collection=None, policy=plan.knn_policy(scope.chunks))
        t4 = time.perf_counter()
        await service.index.bm25(TARGET, plan.bm25_terms(query_terms(query), scope.frequencies, scope.chunks),
                                 k=n, collection=None)
        t5 = time.perf_counter()
        found["search"] += document_id in {p.document_id for p in passages}
        found["knn"] += document_id in {h.document_id for h in knn}
        knn_keys.append([h.key for h in knn])
        if i >= 5:  # warm-up
            timings["embed"].append(t1 - t0)
            timings["search"].append(t2 - t1)
            timings["knn"].append(t4 - t3)
            timings["bm25"].append(t5 - t4)
    hits = {"known_item_search_hit_at_4": found["search"] / len(texts),
            "known_item_knn_hit_at_candidates": found["knn"] / len(texts)}
    return timings, hits, knn_keys


async def labelled_recall(service: DocumentService) -> float:
    """Recall@4 on the labelled set of the retrieval tests, in a tenant of its own."""
    from tests.integration.retrieval_corpus import labelled_set

    tenant = "bench-labelled"
    docs, labelled_queries = labelled_set()
    keys = {}
    for doc in docs:
        record = await service.add(tenant, NewDocument(text=doc.text, title=doc.title, timestamp=doc.timestamp))
        keys[record.id] = doc.key
    found = 0
    for query in labelled_queries:
        passages = await service.retrieve(tenant, query.text, top_k=4)
        found += query.relevant in {keys[p.document_id] for p in passages}
    return found / len(labelled_queries)


def _service(redis: Redis, embedder: SentenceTransformerEmbedder, batch: int, vector_type: str) -> DocumentService:
    return DocumentService(redis, embedder, config=RetrievalConfig(embedding_batch_size=batch,
                                                                   vector_type=vector_type))  # type: ignore[arg-type]


async def run(args: argparse.Namespace, redis_urls: list[str]) -> dict[str, object]:
    types = ["FLOAT32", "FLOAT16"] if args.compare_types else [args.vector_type]
    clients = [Redis.from_url(url, socket_timeout=120) for url in redis_urls]
    embedder = SentenceTransformerEmbedder()
    services = [_service(r, embedder, args.batch, t) for r, t in zip(clients, types, strict=True)]
    baselines = [int((await r.info("memory"))["used_memory"]) for r in clients]
    load_started = time.perf_counter()
    for service in services:
        await service.start()
    print(f"embedding model loaded in {time.perf_counter() - load_started:.1f} s; index created "
          f"({', '.join(types)})")
    text = Text(args.seed)
    main, redis = services[0], clients[0]

    print(f"[1/4] ingestion: about {args.embed_chunks} chunks of synthetic documents through "
          f"DocumentService.add (MiniLM, batches of {args.batch})" + (" into FLOAT32, copied to FLOAT16"
                                                                        if args.compare_types else ""))
    rate, embed_rate, documents = await ingest(main, text, args.embed_chunks)
    real_chunks = sum([(await main.get(TARGET, d)).chunks for d in documents])
    for other in services[1:]:
        await copy_documents(main, other, TARGET, documents)
    print(f"  {real_chunks} chunks from {len(documents)} documents: {rate:.1f} chunks/s end to end; "
          f"embedding alone {embed_rate:.1f} chunks/s")

    print(f"[2/4] fill to {args.total} chunks ({args.target} in `{TARGET}`, the rest over {args.others} "
          f"other tenants): synthetic text, real vectors plus noise; {args.per_trip} documents a transaction, "
          f"{args.writers} in flight")
    base = await _real_vectors(redis, main)
    fill_rate = await fill(services, base, text, total=args.total, target=args.target, others=args.others,
                           already=real_chunks, seed=args.seed, per_trip=args.per_trip, writers=args.writers)
    print(f"  written at {fill_rate:.0f} chunks/s (indexed as written)")

    print("[3/4] Redis memory")
    tenants = [TARGET] + [f"bench-other-{i}" for i in range(args.others)]
    memories = {}
    for vector_type, service, client, baseline in zip(types, services, clients, baselines, strict=True):
        memories[vector_type] = await memory(client, service, baseline=baseline, tenants=tenants)
        print(_memory_lines(vector_type, memories[vector_type]))

    print(f"[4/4] {args.queries} queries, one at a time, top_k=4, in `{TARGET}` "
          f"({main.config.candidates(4)} candidates per list)")
    result: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "chunks_total": memories[types[0]]["chunks"], "chunks_target_tenant": args.target,
        "ingest_chunks": real_chunks, "ingest_chunks_per_s": round(rate, 1), "embed_chunks_per_s": round(embed_rate, 1),
        "fill_chunks_per_s": round(fill_rate), "vector_types": types,
    }
    knn_keys: dict[str, list[list[str]]] = {}
    for vector_type, service, client in zip(types, services, clients, strict=True):
        default_plan = service.config.plan
        for budget in args.postings:  # the same index and queries under other BM25 word budgets, first
            service.config = replace(service.config, plan=replace(default_plan, max_postings=budget))
            timings, hits, _ = await queries(client, service, documents, args.queries, args.seed)
            print(_line(f"search, BM25 word budget {budget} chunks [{vector_type}]", timings["search"]))
            print(_line(f"  BM25 alone, budget {budget}", timings["bm25"]))
            print(f"  known item: in the top 4 {hits['known_item_search_hit_at_4']:.3f}, among the KNN candidates "
                  f"{hits['known_item_knn_hit_at_candidates']:.3f} (budget {budget})")
            tag = f"{vector_type.lower()}_postings_{budget}_"
            result.update({f"{tag}search_p50_ms": round(_pct(timings["search"], 50), 2),
                           f"{tag}search_p99_ms": round(_pct(timings["search"], 99), 2),
                           f"{tag}bm25_p99_ms": round(_pct(timings["bm25"], 99), 2),
                           **{f"{tag}{k}": round(v, 4) for k, v in hits.items()}})
        service.config = replace(service.config, plan=default_plan)
        timings, hits, knn_keys[vector_type] = await queries(client, service, documents, args.queries, args.seed)
        label = f" [{vector_type}]" if len(types) > 1 else ""
        print(_line("query embedding (MiniLM)" + label, timings["embed"]))
        print(_line("search (KNN + BM25 + ranking)" + label, timings["search"]))
        print(_line("  vector KNN alone (as planned)" + label, timings["knn"]))
        print(_line("  BM25 alone (as planned)" + label, timings["bm25"]))
        print(f"  known item: source document in the top 4 {hits['known_item_search_hit_at_4']:.3f}, among the "
              f"KNN candidates {hits['known_item_knn_hit_at_candidates']:.3f}{label}")
        prefix = f"{vector_type.lower()}_" if len(types) > 1 else ""
        p99 = _pct(timings["search"], 99)
        print(f"goal search p99 <= 20 ms{label}: {'met' if p99 <= 20 else 'NOT met'} ({p99:.2f} ms)")
        for name, values in timings.items():
            result[f"{prefix}{name}_p50_ms"] = round(_pct(values, 50), 2)
            result[f"{prefix}{name}_p99_ms"] = round(_pct(values, 99), 2)
        result.update({f"{prefix}{k}": round(v, 4) for k, v in hits.items()})
        result[f"{prefix}memory"] = memories[vector_type]
    if args.compare_types:
        a, b = knn_keys["FLOAT32"], knn_keys["FLOAT16"]
        overlap = float(np.mean([len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(a, b, strict=True)]))
        same_first = float(np.mean([bool(x) and bool(y) and x[0] == y[0] for x, y in zip(a, b, strict=True)]))
        print(f"  KNN candidates, FLOAT16 against FLOAT32: {overlap:.3f} of them the same, the nearest the same in "
              f"{same_first:.3f} of the queries")
        result.update({"knn_candidates_overlap": round(overlap, 4), "knn_same_nearest": round(same_first, 4)})
        for vector_type, service in zip(types, services, strict=True):
            recall = await labelled_recall(service)
            print(f"  labelled set (retrieval tests), recall@4 [{vector_type}]: {recall:.3f}")
            result[f"{vector_type.lower()}_labelled_recall_at_4"] = round(recall, 4)
        saved = 1 - memories["FLOAT16"]["per_chunk_bytes"] / memories["FLOAT32"]["per_chunk_bytes"]
        print(f"  memory per chunk: FLOAT32 {memories['FLOAT32']['per_chunk_bytes']:.0f} B, FLOAT16 "
              f"{memories['FLOAT16']['per_chunk_bytes']:.0f} B ({saved:.1%} less)")
    for client in clients:
        await client.aclose()
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=300_000, help="chunks in the index in all")
    parser.add_argument("--target", type=int, default=100_000, help="chunks of the queried tenant")
    parser.add_argument("--others", type=int, default=20, help="other tenants sharing the rest")
    parser.add_argument("--embed-chunks", type=int, default=1500, help="chunks really embedded (step 1)")
    parser.add_argument("--batch", type=int, default=32, help="embedding batch size")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="30k chunks, 10k in the target tenant, 100 queries")
    parser.add_argument("--vector-type", choices=sorted(VECTOR_TYPES), default=DEFAULT_VECTOR_TYPE)
    parser.add_argument("--compare-types", action="store_true",
                        help="two Valkeys, FLOAT32 and FLOAT16, the same chunks and queries (recall and memory)")
    parser.add_argument("--postings", type=int, action="append", default=[], metavar="CHUNKS",
                        help="also query under this BM25 word budget (QueryPlan.max_postings; repeatable), on the same "
                             "index, before the default")
    parser.add_argument("--per-trip", type=int, default=16, help="fill: documents (4 chunks each) per transaction")
    parser.add_argument("--writers", type=int, default=2, help="fill: transactions in flight at once")
    args = parser.parse_args()
    if args.quick:
        args.total, args.target, args.embed_chunks, args.queries = 30_000, 10_000, 400, 100
    if not 0 < args.embed_chunks < args.target < args.total:
        parser.error("need 0 < --embed-chunks < --target < --total")

    load_start = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
          f"load average {load_start:.1f}")
    with tempfile.TemporaryDirectory(prefix="banyan-bench-") as tmp:
        children = Children(Path(tmp) / "logs")
        try:
            urls = [start_search_valkey(children) for _ in range(2 if args.compare_types else 1)]
            result = asyncio.run(run(args, urls))
        finally:
            children.stop_all()
            print("Valkey stopped")
    result["load_average_start"] = round(load_start, 2)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
