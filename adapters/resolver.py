"""Banyan's vLLM LoRA resolver plugin: internal adapter names -> files pulled from S3.

vLLM loads this module through the ``vllm.general_plugins`` entry point (see ``pyproject.toml``) in
each of its processes; :func:`register` adds :class:`S3LoRAResolver` to vLLM's resolver registry. With
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, a request whose ``model`` vLLM does not know is offered to
the resolver, which parses the internal name (``banyan.<tenant>.<adapter>.v<version>.<uid>``), makes
that immutable version available in the bounded disk cache (:mod:`adapters.cache`) and hands vLLM a
``LoRARequest`` pointing at it. Names that are not Banyan's are left to other resolvers.

The resolver talks to its own server over loopback (``BANYAN_ENGINE_SELF_URL``) to learn which names
are registered and busy, and to unload one before its files go. Its metrics are registered in the
process' default Prometheus registry, which vLLM serves on its own ``/metrics``.

This module and :mod:`adapters.vllm_patches` (a fix for vLLM's CPU LoRA kernels, applied from here) are the
only ones in Banyan that import vLLM, inside functions, so the rest stays importable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from adapters.cache import AdapterDiskCache, AdapterFetchError, EngineControlError
from adapters.layout import MANIFEST_FILE, Manifest
from adapters.naming import AdapterRef
from adapters.store import S3ObjectStore, S3Settings, s3_config
from adapters.vllm_patches import patch_cpu_lora_ops, sleep_in_shm_busy_wait

__all__ = ["ResolverSettings", "register"]

log = logging.getLogger("banyan.resolver")

_LORA_INFO = "vllm:lora_requests_info{"


class ResolverSettings(S3Settings):
    """The resolver's settings, read from the vLLM server's environment (``BANYAN_*``; the ``s3_*`` fields are
    the shared :class:`S3Settings` group)."""

    model_config = SettingsConfigDict(env_prefix="BANYAN_", extra="ignore")

    lora_cache_dir: Path = Path(".banyan/lora-cache")
    lora_cache_max_bytes: int = 2 * 1024**3
    lora_failure_ttl_s: float = 30.0
    engine_self_url: str = "http://127.0.0.1:8000"
    engine_api_key: SecretStr | None = None
    engine_base_model: str = ""
    """The base model id this engine serves (its ``--served-model-name``): a version bound to another base (its
    manifest's ``base_model``) is refused. Empty: not checked."""
    engine_shm_busy_sleep_s: float = Field(default=0.0, ge=0.0, le=0.01)
    """How long vLLM's message-queue readers sleep between checks while they expect a message. 0: vLLM's own
    spin on ``sched_yield()``. A CPU engine should sleep (``banyan dev``: 100 us): the spin takes a core from
    every other process on the machine."""


class HttpEngineControl:
    """The cache's view of the vLLM server it runs in, over loopback HTTP (its errors are
    :class:`EngineControlError`)."""

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=30.0,
                                         transport=transport)

    async def registered(self) -> set[str]:
        response = await self._call("GET", "/v1/models")
        try:
            return {m["id"] for m in response.json().get("data", [])}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EngineControlError("the engine's /v1/models answer is unreadable") from e

    async def busy(self) -> set[str]:
        """Adapters of running or waiting requests, from vLLM's ``vllm:lora_requests_info`` gauge (its
        newest sample: the gauge's value is the time it was set)."""
        return parse_busy_adapters((await self._call("GET", "/metrics")).text)

    async def unload(self, name: str) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name}, ok=(200, 404))

    async def _call(self, method: str, path: str, *, json: Any = None, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        try:
            response = await self._client.request(method, path, json=json)
        except httpx.HTTPError as e:
            raise EngineControlError(f"{method} {path} on the engine failed: {type(e).__name__}") from e
        if response.status_code not in ok:
            raise EngineControlError(f"{method} {path} on the engine answered HTTP {response.status_code}")
        return response


def parse_busy_adapters(metrics_text: str) -> set[str]:
    newest: tuple[float, set[str]] = (-1.0, set())
    for line in metrics_text.splitlines():
        if not line.startswith(_LORA_INFO):
            continue
        labels_part, _, value = line.rpartition("} ")
        try:
            stamp = float(value)
        except ValueError:
            continue
        if stamp <= newest[0]:
            continue
        names: set[str] = set()
        for key in ("running_lora_adapters", "waiting_lora_adapters"):
            marker = f'{key}="'
            start = labels_part.find(marker)
            if start >= 0:
                raw = labels_part[start + len(marker):labels_part.find('"', start + len(marker))]
                names.update(n for n in raw.split(",") if n)
        newest = (stamp, names)
    return newest[1]


class ResolverMetrics:
    """The resolver's Prometheus metrics (bounded labels: ``stage``, ``result``, ``reason``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.loads = Counter("banyan_resolver_adapter_loads_total",
                             "Adapter resolutions in the engine by stage (disk, fetch) and result.",
                             ["stage", "result"])
        self.load_seconds = Histogram("banyan_resolver_adapter_fetch_seconds",
                                      "Time to fetch an adapter version from object storage to local disk.",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.cache_bytes = Gauge("banyan_resolver_disk_cache_bytes", "Bytes of adapter files in the disk cache.")
        self.cache_peak_bytes = Gauge("banyan_resolver_disk_cache_peak_bytes",
                                      "The most bytes the disk cache has held (reserved included).")
        self.cache_max_bytes = Gauge("banyan_resolver_disk_cache_max_bytes", "The disk cache's bound in bytes.")
        self.resident = Gauge("banyan_resolver_resident_adapters", "Adapter versions ready on local disk.")
        self.evictions = Counter("banyan_resolver_evictions_total", "Adapter versions evicted from the disk cache.",
                                 ["reason"])

    def load(self, *, stage: str, result: str, seconds: float | None = None) -> None:
        self.loads.labels(stage, result).inc()
        if seconds is not None:
            self.load_seconds.observe(seconds)

    def usage(self, *, used_bytes: int, peak_bytes: int, resident: int) -> None:
        self.cache_bytes.set(used_bytes)
        self.cache_peak_bytes.set(peak_bytes)
        self.resident.set(resident)

    def evicted(self, reason: str) -> None:
        self.evictions.labels(reason).inc()


def made_for_another_base(folder: Path, served: str) -> str | None:
    """The base model the version in ``folder`` was validated against when it is not ``served`` (and both are
    known), else None. Blocking (a small file)."""
    if not served:
        return None
    try:
        manifest = Manifest.from_json((folder / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        return None  # the cache checked the manifest; a version without one predates the check
    return manifest.base_model if manifest.base_model not in (None, served) else None


def _make_resolver(cache: AdapterDiskCache, *, served: str = "") -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class S3LoRAResolver(LoRAResolver):
        """Resolves Banyan's internal adapter names from S3 through the disk cache."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            ref = AdapterRef.from_engine_name(lora_name)
            if ref is None:
                return None
            _share_vllm_logging()  # vLLM's handlers exist by the time requests arrive
            started = time.monotonic()
            try:
                path = await cache.ensure(ref)
            except AdapterFetchError as e:  # the only error ensure() raises; vLLM answers 404 for None
                log.warning("banyan resolver: %s%s", e, "" if e.remembered else " (transient, not remembered)")
                return None
            other = await asyncio.to_thread(made_for_another_base, path, served)
            if other is not None:  # the gateway routes by base: only a misrouted request (or a bug) gets here
                log.warning("banyan resolver: %s is bound to base model %s; this engine serves %s", lora_name,
                            other, served)
                return None
            log.info("banyan resolver: %s ready in %.3f s", lora_name, time.monotonic() - started)
            # vLLM assigns the integer id itself after resolution.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path),
                               base_model_name=base_model_name)

    return S3LoRAResolver()


def _share_vllm_logging() -> None:
    """Banyan's log lines in the engine go where vLLM's own go."""
    ours, theirs = logging.getLogger("banyan"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver with vLLM (once per process)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    patch_cpu_lora_ops()  # in every vLLM process, the workers included
    if "banyan-s3" in LoRAResolverRegistry.get_supported_resolvers():
        return
    settings = ResolverSettings()
    if settings.engine_shm_busy_sleep_s > 0:
        sleep_in_shm_busy_wait(settings.engine_shm_busy_sleep_s)
    metrics = ResolverMetrics()
    metrics.cache_max_bytes.set(settings.lora_cache_max_bytes)
    engine_key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
    cache = AdapterDiskCache(settings.lora_cache_dir, S3ObjectStore(s3_config(settings)),
                             max_bytes=settings.lora_cache_max_bytes,
                             engine=HttpEngineControl(settings.engine_self_url, api_key=engine_key),
                             failure_ttl_s=settings.lora_failure_ttl_s, metrics=metrics)
    LoRAResolverRegistry.register_resolver("banyan-s3", _make_resolver(cache, served=settings.engine_base_model))
