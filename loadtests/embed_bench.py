"""Embeddings: the torch embedder against the ONNX Runtime one, fp32 and bf16, side by side in one run (#13 item 3).

    nice -n 15 .venv/bin/python -m loadtests.embed_bench            # about 10 minutes on a busy machine
    nice -n 15 .venv/bin/python -m loadtests.embed_bench --quick    # fewer chunks and queries

Self-contained and bounded: it starts its own Valkey with the search module on a free loopback port (for
the labelled set's recall through ``DocumentService``, the production ranking), stops it by process id at
the end, and touches nothing else; the ONNX export goes to a temporary folder. Each variant is the class
the gateway builds (``SentenceTransformerEmbedder``; ``OnnxEmbedder`` in fp32 and in bf16, each with 1 and 2
threads; with ``--int8`` also a copy whose feed-forward matrix products are dynamically int8-quantised). It prints
a table, then a line ``RESULT {json}``:

- speed: full-size chunks (synthetic prose, cut by the chunker at the embedder's window, ~256 tokens each)
  in batches of ``--batch``, the variants taking turns round by round: chunks per second of wall time, and
  per CPU second of the process (robust to a busy machine for the one-thread variants); single queries (the
  reworded chunk queries below, one text per call) taking turns query by query: p50 and p99;
- agreement: cosine between each variant's and the torch embedder's vectors of a few hundred real texts
  (the paragraphs of this repository's Markdown files, the labelled set's documents and questions) and of
  the full chunks: min and mean;
- quality: the labelled set of ``loadtests/grounded_eval.py`` (``loadtests/data/grounded_qa.json``)
  ingested through ``DocumentService`` for each variant: the gold document among the top 4 (recall@4, what
  the grounded eval reports) and first (recall@1); and a harder known-item test without ranking: each
  reworded chunk query (words dropped and shuffled) against all the full chunks by cosine alone: recall@1.

The gate, for each variant: recall on both tests equal to torch's (or better) and minimum cosine >= 0.999.
A variant may be the default only if its gate holds. ``speedup`` is the default variant's (``--default``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from gateway.dev.processes import Children
from loadtests._stack import start_search_valkey
from loadtests._stats import percentile
from loadtests.grounded_eval import load_set
from loadtests.retrieval_bench import Text
from retrieval.chunking import chunk_document
from retrieval.documents import NewDocument
from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.onnx_embedding import OnnxEmbedder
from retrieval.service import DocumentService, RetrievalConfig

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "loadtests" / "data" / "grounded_qa.json"


def _markdown_paragraphs(limit: int) -> list[str]:
    """Prose of this repository: the paragraphs of its Markdown files (tables and code left out)."""
    paragraphs: list[str] = []
    for path in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("docs/**/*.md")):
        for block in path.read_text(errors="replace").split("\n\n"):
            block = block.strip()
            if len(block) >= 80 and not block.startswith(("|", "```", "    ", "#")):
                paragraphs.append(block)
    return paragraphs[:limit]


def _full_chunks(embedder: Embedder, count: int, seed: int) -> list[str]:
    text = Text(seed)
    chunks: list[str] = []
    while len(chunks) < count:
        for chunk in chunk_document(text.document(4), title=None, tokenizer=embedder):
            if embedder.count_tokens([chunk.embedded])[0] >= embedder.max_tokens - 32:  # full-size only
                chunks.append(chunk.embedded)
    return chunks[:count]


def _reworded(chunks: list[str], count: int, seed: int) -> list[tuple[int, str]]:
    """(source chunk, query): 12 to 20 words of the chunk, some dropped, shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        i = rng.randrange(len(chunks))
        words = chunks[i].split()
        start = rng.randrange(max(1, len(words) - 30))
        picked = [w for w in words[start:start + 30] if rng.random() > 0.4][:20]
        rng.shuffle(picked)
        out.append((i, " ".join(picked)))
    return out


def _int8_copy(onnx: OnnxEmbedder, folder: Path) -> OnnxEmbedder:
    """An embedder whose cache holds a dynamic int8 quantisation of ``onnx``'s model: only the feed-forward
    weight matrices (two thirds of the work), per channel; attention, embeddings and layer norms stay fp32.
    (Quantising every weight MatMul agreed less: cosine min 0.976; every MatMul and the embedding table,
    the ``quantize_dynamic`` default, about 0.9.)"""
    import onnx as onnx_format
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx.model_file.parent
    target = folder / source.name
    shutil.copytree(source, target)
    graph = onnx_format.load(str(source / "model.onnx")).graph
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    ffn = {n.name for n in matmuls if set(n.input) & weights and "/attention/" not in n.name}
    quantize_dynamic(str(source / "model.onnx"), str(target / "model.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], per_channel=True,
                     nodes_to_exclude=[n.name for n in matmuls if n.name not in ffn])
    return OnnxEmbedder(cache_dir=folder)


async def _labelled_recall(redis: Redis, embedder: Embedder, name: str) -> dict[str, float]:
    documents, questions = load_set(LABELLED)
    service = DocumentService(redis, embedder, config=RetrievalConfig(index_name=f"bench-{name}",
                                                                      key_prefix=f"bench-{name}"))
    await service.start()
    keys = {}
    for d in documents:
        record = await service.add("labelled", NewDocument(text=d.text, title=d.title, timestamp=d.timestamp))
        keys[record.id] = d.key
    at1 = at4 = 0
    for q in questions:
        found = [keys.get(p.document_id) for p in await service.retrieve("labelled", q.question, top_k=4)]
        at4 += q.gold in found
        at1 += bool(found) and found[0] == q.gold
    await service.aclose()
    return {"recall_at_4": at4 / len(questions), "recall_at_1": at1 / len(questions)}


def _rate(embed: Callable[[list[str]], np.ndarray], chunks: list[str], batch: int) -> tuple[float, float]:
    """Chunks per second of wall time and per CPU second of this process."""
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(chunks), batch):
        embed(chunks[i:i + batch])
    return len(chunks) / (time.perf_counter() - started), len(chunks) / (time.process_time() - cpu)


async def run(args: argparse.Namespace, redis_url: str, cache: Path) -> dict[str, object]:
    torch_embedder = SentenceTransformerEmbedder()
    onnx1 = OnnxEmbedder(cache_dir=cache / "onnx", threads=1)
    started = time.perf_counter()
    onnx1.embed(["warm-up"])  # exports into the empty cache
    export_s = time.perf_counter() - started
    print(f"ONNX export and load: {export_s:.1f} s")
    variants: dict[str, Embedder] = {
        "torch": torch_embedder, "onnx": onnx1,
        "onnx-2threads": OnnxEmbedder(cache_dir=cache / "onnx", threads=2),
        "bf16": OnnxEmbedder(cache_dir=cache / "onnx", threads=1, precision="bf16"),
        "bf16-2threads": OnnxEmbedder(cache_dir=cache / "onnx", threads=2, precision="bf16"),
    }
    if args.int8:
        variants["onnx-int8"] = _int8_copy(onnx1, cache / "int8")
    for embedder in variants.values():
        embedder.embed(["warm-up", "a second warm-up text"])

    chunks = _full_chunks(torch_embedder, args.chunks, args.seed)
    tokens = torch_embedder.count_tokens(chunks)
    queries = _reworded(chunks, args.queries, args.seed)
    documents, questions = load_set(LABELLED)
    real = _markdown_paragraphs(400) + [d.text for d in documents] + [q.question for q in questions]
    print(f"{len(chunks)} full chunks (mean {np.mean(tokens):.0f} tokens), {len(queries)} queries, "
          f"{len(real)} real texts, labelled set: {len(documents)} documents, {len(questions)} questions")

    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    load_start = os.getloadavg()[0]
    for _ in range(args.rounds):  # the variants take turns, so that a busy moment hits them alike
        for name, embedder in variants.items():
            rates[name].append(_rate(embedder.embed, chunks, args.batch))
    latency: dict[str, list[float]] = {name: [] for name in variants}
    for _, query in queries:
        for name, embedder in variants.items():
            started = time.perf_counter()
            embedder.embed([query])
            latency[name].append((time.perf_counter() - started) * 1000)

    reference_real = torch_embedder.embed(real)
    reference_chunks = np.concatenate([torch_embedder.embed(chunks[i:i + 32]) for i in range(0, len(chunks), 32)])
    rows: dict[str, dict[str, float]] = {}
    for name, embedder in variants.items():
        vectors_real = embedder.embed(real)
        vectors_chunks = np.concatenate([embedder.embed(chunks[i:i + 32]) for i in range(0, len(chunks), 32)])
        cosines = np.concatenate([(vectors_real * reference_real).sum(1), (vectors_chunks * reference_chunks).sum(1)])
        query_vectors = embedder.embed([q for _, q in queries])
        best = (query_vectors @ vectors_chunks.T).argmax(axis=1)
        known = float(np.mean([b == i for b, (i, _) in zip(best, queries, strict=True)]))
        redis = Redis.from_url(redis_url, socket_timeout=60)
        labelled = await _labelled_recall(redis, embedder, name)
        await redis.aclose()
        rows[name] = {
            "chunks_per_s": float(np.mean([wall for wall, _ in rates[name]])),
            "chunks_per_cpu_s": float(np.mean([cpu for _, cpu in rates[name]])),
            "query_p50_ms": percentile(latency[name], 50), "query_p99_ms": percentile(latency[name], 99),
            "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
            "recall_at_4": labelled["recall_at_4"], "recall_at_1": labelled["recall_at_1"],
            "known_item_recall_at_1": known,
        }

    base = rows["torch"]
    print()
    print(f"{'embedder':15} {'chunks/s':>9} {'x torch':>8} {'/cpu-s':>7} {'query p50':>10} {'p99':>8} "
          f"{'cos min':>9} {'cos mean':>9} {'recall@4':>9} {'recall@1':>9} {'known@1':>8} gate")
    gates = {}
    for name, r in rows.items():
        gates[name] = (r["cosine_min"] >= 0.999 and r["recall_at_4"] >= base["recall_at_4"]
                       and r["recall_at_1"] >= base["recall_at_1"]
                       and r["known_item_recall_at_1"] >= base["known_item_recall_at_1"])
        print(f"{name:15} {r['chunks_per_s']:9.1f} {r['chunks_per_s'] / base['chunks_per_s']:7.2f}x "
              f"{r['chunks_per_cpu_s']:7.1f} {r['query_p50_ms']:8.2f}ms {r['query_p99_ms']:6.2f}ms "
              f"{r['cosine_min']:9.6f} {r['cosine_mean']:9.6f} {r['recall_at_4']:9.1%} {r['recall_at_1']:9.1%} "
              f"{r['known_item_recall_at_1']:8.1%} {'holds' if gates[name] else 'FAILS'}")
    default = rows[args.default]
    speedup = default["chunks_per_s"] / base["chunks_per_s"]
    print(f"gate ({args.default}: cosine min >= 0.999, recall unchanged): "
          f"{'holds' if gates[args.default] else 'FAILS'}; speed-up {speedup:.2f}x (goal >= 3x)")
    result: dict[str, object] = {
        "chunks": len(chunks), "chunk_tokens_mean": round(float(np.mean(tokens)), 1), "batch": args.batch,
        "queries": len(queries), "real_texts": len(real), "labelled_questions": len(questions),
        "export_s": round(export_s, 1), "default": args.default, "speedup": round(speedup, 2),
        "gate_holds": gates[args.default], "gates": gates,
        "load_average_start": round(load_start, 1), "load_average_end": round(os.getloadavg()[0], 1),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, cpu only",
    }
    for name, r in rows.items():
        for key, value in r.items():
            result[f"{name}_{key}"] = round(value, 6 if key.startswith("cosine") else 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=256, help="full-size chunks per speed round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--int8", action="store_true",
                        help="also an ONNX model with dynamically int8-quantised feed-forward weights")
    parser.add_argument("--default", default="bf16", choices=["onnx", "bf16"],
                        help="the variant the gateway uses by default (its gate and speed-up are the summary)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="64 chunks, 1 round, 50 queries")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.rounds, args.queries = 64, 1, 50

    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="banyan-embed-bench-") as tmp:
        children = Children(Path(tmp) / "logs")
        try:
            redis_url = start_search_valkey(children)
            result = asyncio.run(run(args, redis_url, Path(tmp)))
        finally:
            children.stop_all()
            print("Valkey stopped")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
