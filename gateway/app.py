"""The app factory: ``create_app(settings)`` builds every client into one typed state object.

No import-time side effects: clients are made in the factory (or injected by tests behind their
seams) and closed by the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters.basemodel import BaseModelSpec
from adapters.imports import ImportRunner, ImportStore
from adapters.registry import AdapterRegistry
from adapters.store import ObjectStore, S3ObjectStore, s3_config
from adapters.training.jobs import JobStore
from gateway import errors, ops
from gateway.admin.api_router import router as admin_router
from gateway.admin.service import resume_imports_forever, sweep_abandoned_uploads
from gateway.documents.api_router import router as documents_router
from gateway.engine import EnginePool
from gateway.fine_tuning.api_router import router as fine_tuning_router
from gateway.fine_tuning.files import FileStore
from gateway.fine_tuning.service import refresh_job_gauge
from gateway.invalidation import Invalidator
from gateway.metrics import Metrics
from gateway.middleware import AuthMiddleware, RequestContextMiddleware
from gateway.model_cache import CachedRegistry, ServingCache
from gateway.openai_api.api_router import router as openai_router
from gateway.quotas import Headroom, Quotas
from gateway.redis_batch import ScriptBatcher
from gateway.settings import Settings
from gateway.state import AppState, ServedBase
from gateway.tenants import KeyCache, TenantStore
from gateway.tokens import base_model_tokens
from gateway.tracing import Tracing
from gateway.usage import UsageStore
from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.onnx_embedding import OnnxEmbedder
from retrieval.service import DocumentService, RetrievalConfig

log = logging.getLogger("banyan.app")


def retrieval_config(settings: Settings) -> RetrievalConfig:
    return RetrievalConfig(index_name=settings.retrieval_index, max_document_bytes=settings.max_document_bytes,
                           max_chunks_per_document=settings.max_chunks_per_document,
                           max_documents_per_tenant=settings.max_documents_per_tenant,
                           max_chunks_per_tenant=settings.max_chunks_per_tenant,
                           embedding_batch_size=settings.embedding_batch_size,
                           vector_type=settings.retrieval_vector_type)


def build_embedder(settings: Settings) -> Embedder:
    """The retrieval embedder ``BANYAN_EMBEDDER`` names (the model loads on its first batch, off the loop)."""
    if settings.embedder == "torch":
        return SentenceTransformerEmbedder()
    return OnnxEmbedder(cache_dir=settings.embedder_cache_dir or settings.data_dir / "embedder",
                        threads=settings.embedder_threads, precision=settings.embedder_precision)


def redis_client(settings: Settings) -> Redis:
    """The gateway's Redis client. Its pool is bounded and blocking: with every connection busy (a burst of requests
    each starting or settling), a command waits for one instead of failing (redis-py's default pool raises
    ``MaxConnectionsError`` past 100 connections: a 503 for the request)."""
    # A command that finds its connection closed by the server (a pooled connection from before a Redis restart)
    # is sent once more on a new connection; a timeout is not retried (the command may have run).
    pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=settings.redis_max_connections,
                                           timeout=settings.redis_pool_timeout_s, socket_timeout=5.0,
                                           socket_connect_timeout=5.0, health_check_interval=30,
                                           retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    base = pool.connection_class  # the URL's (TCP, TLS or Unix socket)
    pool.connection_class = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})
    return Redis.from_pool(pool)  # closing the client closes its pool


class _HiredisPacking:
    """Commands written by hiredis's packer (C) instead of redis-py's asyncio one (Python: about 2 us an argument,
    30-40 us of a completion's scripts); the same bytes (redis-py's synchronous client uses the same packer)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


def build_state(settings: Settings, *, redis: Redis | None = None, store: ObjectStore | None = None,
                engines: EnginePool | None = None, metrics: Metrics | None = None,
                embedder: Embedder | None = None) -> AppState:
    """``engines``, when given, serves the default base model (the others get pools of their own)."""
    metrics = metrics or Metrics()
    redis = redis if redis is not None else redis_client(settings)
    scripts = ScriptBatcher(redis)  # admission, release and usage scripts of the same moment: one pipeline
    bases = _served_bases(settings, metrics=metrics, default_engines=engines)
    default = next(iter(bases.values()))
    tokens = default.tokens
    store = store if store is not None else S3ObjectStore(s3_config(settings))
    key_cache = KeyCache(ttl_s=settings.key_cache_ttl_s, max_entries=settings.key_cache_max_entries,
                         fallback_ttl_s=settings.cache_fallback_ttl_s, observe=metrics.key_cache_result)
    serving_cache = ServingCache(ttl_s=settings.adapter_cache_ttl_s, max_entries=settings.adapter_cache_max_entries,
                                 fallback_ttl_s=settings.cache_fallback_ttl_s, observe=metrics.adapter_cache_result)
    return AppState(
        settings=settings,
        redis=redis,
        store=store,
        engines=default.engines,
        tenants=TenantStore(redis, key_cache=key_cache),
        adapters=CachedRegistry(AdapterRegistry(redis), serving_cache),
        metrics=metrics,
        quotas=Quotas(redis, metrics=metrics, lease_s=settings.concurrency_lease_s, batcher=scripts),
        usage=UsageStore(redis, hourly_retention_s=settings.usage_hourly_retention_s,
                         daily_retention_s=settings.usage_daily_retention_s,
                         max_users_per_bucket=settings.usage_max_users_per_bucket, batcher=scripts),
        base_spec=default.spec,
        documents=DocumentService(redis, embedder if embedder is not None else build_embedder(settings),
                                  config=retrieval_config(settings), observer=metrics, tokens=tokens),
        tokens=tokens,
        files=FileStore(redis, store),
        jobs=JobStore(redis),
        imports=ImportRunner(ImportStore(redis, retention_s=settings.import_retention_s),
                             concurrency=settings.import_concurrency, lease_s=settings.import_lease_s,
                             poll_s=settings.import_poll_s),
        tracing=Tracing.from_settings(settings),
        headroom=Headroom(window_s=settings.engine_first_window_s),
        bases=bases,
        invalidation=Invalidator(redis, [key_cache, serving_cache], observer=metrics)
        if settings.cache_invalidation else None,
    )


def _served_bases(settings: Settings, *, metrics: Metrics,
                  default_engines: EnginePool | None) -> dict[str, ServedBase]:
    """Each configured base model with its spec, its own engine pool and its tokenizer, the default first."""
    engine_key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
    bases: dict[str, ServedBase] = {}
    for i, base in enumerate(settings.bases):
        engines = default_engines if i == 0 and default_engines is not None else EnginePool(
            base.engine_urls, api_key=engine_key, connect_timeout=settings.engine_connect_timeout_s,
            read_timeout=settings.engine_read_timeout_s, max_connections=settings.engine_max_connections,
            max_resident=settings.engine_resident_adapters, metrics=metrics,
            http=settings.engine_http)
        bases[base.id] = ServedBase(id=base.id, spec=BaseModelSpec.from_path(base.config) if base.config else None,
                                    engines=engines, tokens=base_model_tokens(settings, base))
    return bases


async def _watch_engines_forever(state: AppState, *, every_s: float = 15.0) -> None:
    """Keep each replica's health and the adapters it holds up to date, also when nobody calls /readyz."""
    while True:
        try:
            await asyncio.gather(*(base.engines.check() for base in state.bases.values()))
        except Exception as e:  # the watcher must outlive any one failed round
            log.warning("checking the engines failed: %s", type(e).__name__)
        await asyncio.sleep(every_s)


async def _count_jobs_forever(state: AppState, *, every_s: float = 15.0) -> None:
    """Keep the gauge of fine-tuning jobs by status up to date (the workers move jobs; any gateway reports)."""
    while True:
        try:
            await refresh_job_gauge(state)
        except Exception as e:  # the counter must outlive a Redis outage
            log.warning("counting fine-tuning jobs failed: %s", type(e).__name__)
        await asyncio.sleep(every_s)


async def _sweep_uploads_forever(state: AppState) -> None:
    """Every few minutes, remove the files of uploads whose writer died before recording them."""
    while True:
        try:
            await sweep_abandoned_uploads(state, older_than_s=state.settings.upload_sweep_after_s)
        except Exception as e:  # the sweeper must outlive a Redis or S3 outage
            log.warning("sweeping abandoned uploads failed: %s", type(e).__name__)
        await asyncio.sleep(min(300.0, state.settings.upload_sweep_after_s))


def create_app(settings: Settings, *, state: AppState | None = None) -> FastAPI:
    app_state = state or build_state(settings)
    app_state.readiness.ttl_s = settings.readiness_cache_s

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await app_state.documents.start()  # loads the embedding model off the loop; creates the index
        sweeper = asyncio.create_task(_sweep_uploads_forever(app_state))
        watcher = asyncio.create_task(_watch_engines_forever(app_state))
        job_counter = asyncio.create_task(_count_jobs_forever(app_state))
        importer = asyncio.create_task(resume_imports_forever(app_state))  # unfinished bulk imports nobody runs
        invalidator = (asyncio.create_task(app_state.invalidation.run_forever())
                       if app_state.invalidation is not None else None)
        try:
            yield
        finally:
            sweeper.cancel()
            watcher.cancel()
            job_counter.cancel()
            importer.cancel()
            if invalidator is not None:
                invalidator.cancel()
            if app_state.imports is not None:
                await app_state.imports.aclose()  # their leases given back: another gateway resumes them at once
            for base in app_state.bases.values():
                await base.engines.aclose()
            await app_state.store.aclose()
            await app_state.documents.aclose()
            await app_state.redis.aclose()
            await asyncio.to_thread(app_state.tracing.shutdown)  # exports the spans still buffered

    app = FastAPI(title="Banyan", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.banyan = app_state
    errors.install_handlers(app)
    app.include_router(openai_router)
    app.include_router(documents_router)
    app.include_router(fine_tuning_router)
    app.include_router(admin_router)
    app.include_router(ops.router)
    app.add_middleware(AuthMiddleware, state=app_state, routes=app.router.routes)  # inside: a 401 is counted too
    app.add_middleware(RequestContextMiddleware, metrics=app_state.metrics,
                       max_body_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_adapter_bytes + 1024 * 1024,
                       max_file_bytes=settings.max_training_file_bytes + 64 * 1024,
                       body_timeout_s=settings.body_read_timeout_s, drain=app_state.drain,
                       tracing=app_state.tracing)
    return app
