"""Every Prometheus metric of the gateway, declared in one place.

Units are in the names, histogram buckets are explicit and labels are bounded: ``route`` is the
route template (never the raw path), ``status`` the HTTP status code, ``kind`` one of a fixed set.
No tenant or adapter labels: per-tenant usage is counted in Redis instead.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASSAGE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 20)
CACHE_RESULTS = ("hit", "miss", "evict", "invalidate")


class Metrics:
    """The gateway's metrics, on a registry of their own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's CPU seconds, memory and open files (`process_*`), and the garbage collector's collections
        # by generation (`python_gc_*`: BANYAN_GC_YOUNG_THRESHOLD's effect), as on any Python exporter.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("banyan_requests_total", "HTTP requests answered, by route template and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("banyan_request_duration_seconds",
                                         "End-to-end request latency (to the last byte).", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("banyan_time_to_first_token_seconds",
                                      "Time from request arrival to the first streamed token chunk.",
                                      ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.inflight = Gauge("banyan_inflight_requests", "Completion requests in flight.", registry=r)
        self.engine_errors = Counter("banyan_engine_errors_total",
                                     "Engine calls that failed, by kind (unavailable, status_4xx, status_5xx, "
                                     "stream_broken).", ["kind"], registry=r)
        self.tokens = Counter("banyan_tokens_total", "Tokens processed, by kind (prompt, completion).",
                              ["kind"], registry=r)
        self.adapter_placements = Counter("banyan_adapter_placements_total",
                                          "Where completion requests were routed: resident (a replica already "
                                          "held the adapter), home (its rendezvous home), spill (home "
                                          "saturated), base (no adapter).", ["placement"], registry=r)
        self.adapter_unloads = Counter("banyan_adapter_unloads_total",
                                       "Adapter unloads the gateway asked of replicas, by result.", ["result"],
                                       registry=r)
        self.resident_adapters = Gauge("banyan_resident_adapters",
                                       "Adapters the gateway believes resident, summed over replicas.", registry=r)
        self.client_disconnects = Counter("banyan_client_disconnects_total",
                                          "Completion requests whose client left before the answer ended (the "
                                          "engine call is then closed), by kind (json, stream).", ["kind"],
                                          registry=r)
        self.rate_limited = Counter("banyan_rate_limited_total",
                                    "Requests refused by a tenant limit, by reason (rpm, tpm, tpm_request, "
                                    "concurrency).",
                                    ["reason"], registry=r)
        self.budget_refusals = Counter("banyan_budget_refusals_total",
                                       "Requests refused because a tenant's token budget was spent, by period "
                                       "(daily, monthly).", ["period"], registry=r)
        self.engine_first = Counter("banyan_engine_first_total",
                                    "Completions started on the engine while their admission was decided "
                                    "(engine_first), by outcome (granted, refused: the engine call was cancelled).",
                                    ["outcome"], registry=r)
        self.model_resolutions = Counter("banyan_model_resolutions_total",
                                         "Completion requests by how their model resolved (base, adapter, "
                                         "not_found).", ["result"], registry=r)
        self.adapter_split_requests = Counter("banyan_adapter_split_requests_total",
                                              "Requests for adapters with a traffic split, by the version that got "
                                              "them (role: active, canary).", ["role"], registry=r)
        self.adapter_fallbacks = Counter("banyan_adapter_fallbacks_total",
                                         "Adapter requests served by the base model because the adapter could not "
                                         "be loaded (tenants with fallback_to_base), by reason (unresolved: the "
                                         "engine could not fetch it; refused: the engine would not load it).",
                                         ["reason"], registry=r)
        self.adapter_uploads = Counter("banyan_adapter_uploads_total", "Adapter uploads, by result.",
                                       ["result"], registry=r)
        self.key_cache = Counter("banyan_key_cache_total", "API key -> tenant cache of the hot path, by result "
                                 "(hit, miss, evict, invalidate).", ["result"], registry=r)
        self._key_cache_results = {result: self.key_cache.labels(result) for result in CACHE_RESULTS}
        self.adapter_cache = Counter("banyan_adapter_cache_total", "Adapter -> active version cache of model "
                                     "resolution, by result (hit, miss, evict, invalidate).", ["result"], registry=r)
        self._adapter_cache_results = {result: self.adapter_cache.labels(result) for result in CACHE_RESULTS}
        self.invalidation_events = Counter("banyan_invalidation_events_total",
                                           "The cache invalidation subscriber, by event: subscribed, lost (the "
                                           "subscription failed: caches on the short TTL), a message applied by "
                                           "kind (key, tenant, adapter, adapters), malformed.", ["event"],
                                           registry=r)
        self.invalidation_subscribed_gauge = Gauge("banyan_invalidation_subscribed",
                                                   "1 while the cache invalidation subscription is live.",
                                                   registry=r)
        self.retrieval_seconds = Histogram("banyan_retrieval_duration_seconds",
                                           "Retrieval time by stage: embed (the query), search (vector and BM25 "
                                           "queries), rank, ingest_embed and ingest_store (a document).", ["stage"],
                                           buckets=RETRIEVAL_BUCKETS, registry=r)
        self.retrieval_passage_counts = Histogram("banyan_retrieval_passages", "Passages returned per retrieval.",
                                                  buckets=PASSAGE_BUCKETS, registry=r)
        self.fine_tuning_jobs = Gauge("banyan_fine_tuning_jobs", "Fine-tuning jobs in each status (of every "
                                      "tenant; refreshed every 15 s from the job store).", ["status"], registry=r)
        self.ingested_chunks = Counter("banyan_ingested_chunks_total", "Document chunks embedded and stored.",
                                       registry=r)

    def key_cache_result(self, result: str) -> None:
        """The :class:`gateway.tenants.KeyCache`'s observer."""
        self._key_cache_results[result].inc()

    def adapter_cache_result(self, result: str) -> None:
        """The :class:`gateway.model_cache.ServingCache`'s observer."""
        self._adapter_cache_results[result].inc()

    # The invalidation subscriber's observer (``gateway.invalidation.InvalidationObserver``).

    def invalidation_event(self, event: str) -> None:
        self.invalidation_events.labels(event).inc()

    def invalidation_subscribed(self, subscribed: bool) -> None:
        self.invalidation_subscribed_gauge.set(1 if subscribed else 0)

    # The retrieval service's observer (``retrieval.service.Observer``): it reports, this records.

    def retrieval_stage(self, stage: str, seconds: float) -> None:
        self.retrieval_seconds.labels(stage).observe(seconds)

    def retrieval_passages(self, count: int) -> None:
        self.retrieval_passage_counts.observe(count)

    def chunks_ingested(self, count: int) -> None:
        self.ingested_chunks.inc(count)
