"""Retrieval benchmark: ingestion rate, and query latency with 100k chunks in one tenant among 300k.

    .venv/bin/python -m loadtests.retrieval_bench            # 300k chunks, 100k in one tenant (~15 min)
    .venv/bin/python -m loadtests.retrieval_bench --quick    # 30k chunks, 10k in one tenant (~2 min)

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
   are also timed alone.
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
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from gateway.dev.processes import Children
from loadtests._stack import start_search_valkey
from loadtests._stats import percentile
from retrieval.chunking import chunk_document
from retrieval.documents import NewDocument
from retrieval.embedding import SentenceTransformerEmbedder
from retrieval.index import ChunkRecord, DocumentRecord, query_terms
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


async def fill(redis: Redis, service: DocumentService, text: Text, *, total: int, target: int,
               others: int, already: int, seed: int) -> float:
    """Add synthetic documents (4 chunks each) through ``ChunkIndex.add_document`` until the index holds
    ``total`` chunks, 8 at a time; the write rate in chunks/s."""
    rng = np.random.default_rng(seed)
    base = await _real_vectors(redis, service)
    plan = [(TARGET, target - already)] + [(f"bench-other-{i}", (total - target) // others) for i in range(others)]
    started = time.perf_counter()
    written = 0
    next_note = 20_000
    for tenant, count in plan:
        for start in range(0, count, 32):
            batch = []
            for first in range(start, min(start + 32, count), 4):
                n = min(4, count - first)
                noise = rng.standard_normal((n, base.shape[1])).astype(np.float32) * 0.035
                vectors = base[rng.integers(0, len(base), n)] + noise
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                record = DocumentRecord(id=new_document_id(), tenant=tenant, title="Synthetic filler",
                                        timestamp=1.6e9 + float(rng.integers(0, 10**8)), collection="default",
                                        chunks=n, created=time.time())
                chunks = [ChunkRecord(number=j, text=text.paragraph(text.rng.randint(6, 12)), vector=vectors[j])
                          for j in range(n)]
                batch.append(service.index.add_document(record, chunks))
                written += n
            await asyncio.gather(*batch)
            if written + already >= next_note:
                next_note += 20_000
                rate = written / (time.perf_counter() - started)
                print(f"  ... {written + already} chunks in the index ({rate:.0f} chunks/s)", flush=True)
    return written / (time.perf_counter() - started)


async def _real_vectors(redis: Redis, service: DocumentService) -> np.ndarray:
    pattern = f"{service.index.prefix}:chunk:{TARGET}:*"
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "embedding")
        blobs = await pipe.execute()
    return np.vstack([np.frombuffer(b, dtype=np.float32) for b in blobs if b])


async def queries(redis: Redis, service: DocumentService, documents: list[str], count: int,
                  seed: int) -> dict[str, list[float]]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        key = service.index.chunk_key(TARGET, rng.choice(documents), 0)
        texts.append(_decode(await redis.hget(key, "text")))
    timings: dict[str, list[float]] = {"embed": [], "search": [], "knn": [], "bm25": []}
    n, plan = service.config.candidates(4), service.config.plan
    for i, source in enumerate(texts):
        words = source.split()
        start = rng.randrange(max(1, len(words) - 12))
        picked = words[start:start + 12]
        rng.shuffle(picked)
        query = " ".join(picked[:rng.randint(5, 10)])
        t0 = time.perf_counter()
        vector = (await service.embed([query]))[0]
        t1 = time.perf_counter()
        await service.search(TARGET, query, vector, top_k=4)
        t2 = time.perf_counter()
        scope = await service.index.scope(TARGET, None, query_terms(query))
        t3 = time.perf_counter()
        await service.index.knn(TARGET, vector, k=n, collection=None, policy=plan.knn_policy(scope.chunks))
        t4 = time.perf_counter()
        await service.index.bm25(TARGET, plan.bm25_terms(query_terms(query), scope.frequencies, scope.chunks),
                                 k=n, collection=None)
        t5 = time.perf_counter()
        if i >= 5:  # warm-up
            timings["embed"].append(t1 - t0)
            timings["search"].append(t2 - t1)
            timings["knn"].append(t4 - t3)
            timings["bm25"].append(t5 - t4)
    return timings


async def run(args: argparse.Namespace, redis_url: str) -> dict[str, object]:
    redis = Redis.from_url(redis_url, socket_timeout=60)
    embedder = SentenceTransformerEmbedder()
    service = DocumentService(redis, embedder, config=RetrievalConfig(embedding_batch_size=args.batch))
    load_started = time.perf_counter()
    await service.start()
    print(f"embedding model loaded in {time.perf_counter() - load_started:.1f} s; index created")
    text = Text(args.seed)

    print(f"[1/3] ingestion: about {args.embed_chunks} chunks of synthetic documents through "
          f"DocumentService.add (MiniLM, batches of {args.batch})")
    rate, embed_rate, documents = await ingest(service, text, args.embed_chunks)
    real_chunks = sum([(await service.get(TARGET, d)).chunks for d in documents])
    print(f"  {real_chunks} chunks from {len(documents)} documents: {rate:.1f} chunks/s end to end; "
          f"embedding alone {embed_rate:.1f} chunks/s")

    print(f"[2/3] fill to {args.total} chunks ({args.target} in `{TARGET}`, the rest over {args.others} "
          "other tenants): synthetic text, real vectors plus noise")
    fill_rate = await fill(redis, service, text, total=args.total, target=args.target, others=args.others,
                           already=real_chunks, seed=args.seed)
    info = await redis.execute_command("FT.INFO", service.index.name)
    fields = dict(zip(info[0::2], info[1::2], strict=False)) if isinstance(info, list) else info
    num_docs = int(fields.get(b"num_docs", fields.get("num_docs")) or 0)
    used = (await redis.info("memory"))["used_memory_human"]
    print(f"  written at {fill_rate:.0f} chunks/s (indexed as written); index holds {num_docs} chunks; "
          f"Redis memory {used}")

    print(f"[3/3] {args.queries} queries, one at a time, top_k=4, in `{TARGET}` "
          f"({service.config.candidates(4)} candidates per list)")
    timings = await queries(redis, service, documents, args.queries, args.seed)
    print(_line("query embedding (MiniLM)", timings["embed"]))
    print(_line("search (KNN + BM25 + ranking)", timings["search"]))
    print(_line("  vector KNN alone (as planned)", timings["knn"]))
    print(_line("  BM25 alone (as planned)", timings["bm25"]))
    p99 = _pct(timings["search"], 99)
    print(f"goal search p99 <= 20 ms: {'met' if p99 <= 20 else 'NOT met'} ({p99:.2f} ms)")
    await redis.aclose()
    result: dict[str, object] = {
        "chunks_total": num_docs, "chunks_target_tenant": args.target, "ingest_chunks": real_chunks,
        "ingest_chunks_per_s": round(rate, 1), "embed_chunks_per_s": round(embed_rate, 1),
        "fill_chunks_per_s": round(fill_rate), "redis_memory": used, "queries": len(timings["search"]),
    }
    for name, values in timings.items():
        result[f"{name}_p50_ms"] = round(_pct(values, 50), 2)
        result[f"{name}_p99_ms"] = round(_pct(values, 99), 2)
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
    args = parser.parse_args()
    if args.quick:
        args.total, args.target, args.embed_chunks, args.queries = 30_000, 10_000, 400, 100
    if not 0 < args.embed_chunks < args.target < args.total:
        parser.error("need 0 < --embed-chunks < --target < --total")

    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="banyan-bench-") as tmp:
        children = Children(Path(tmp) / "logs")
        try:
            redis_url = start_search_valkey(children)
            result = asyncio.run(run(args, redis_url))
        finally:
            children.stop_all()
            print("Valkey stopped")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
