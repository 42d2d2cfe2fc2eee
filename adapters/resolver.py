"""Banyan's vLLM LoRA resolver plugin: internal adapter names -> files pulled from S3.

vLLM loads this module through the ``vllm.general_plugins`` entry point (see ``pyproject.toml``) in
each of its processes; :func:`register` adds :class:`S3LoRAResolver` to vLLM's resolver registry. With
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, a request whose ``model`` vLLM does not know is offered to
the resolver, which parses the internal name (``banyan.<tenant>.<adapter>.v<version>.<uid>``),
downloads that immutable version into a local disk cache (once, single-flight per name) and hands
vLLM a ``LoRARequest`` pointing at it. Names that are not Banyan's are left to other resolvers.

This is the only module in Banyan that imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.naming import AdapterRef
from adapters.store import ObjectMissing, ObjectStore, S3Config, S3ObjectStore

log = logging.getLogger("banyan.resolver")

MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ResolverSettings(BaseSettings):
    """The resolver's settings, read from the vLLM server's environment (``BANYAN_*``)."""

    model_config = SettingsConfigDict(env_prefix="BANYAN_", extra="ignore")

    s3_endpoint_url: str | None = None
    s3_bucket: str = "banyan"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    lora_cache_dir: Path = Path(".banyan/lora-cache")

    def s3(self) -> S3Config:
        return S3Config(
            bucket=self.s3_bucket,
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id.get_secret_value() if self.s3_access_key_id else None,
            secret_access_key=(self.s3_secret_access_key.get_secret_value()
                               if self.s3_secret_access_key else None),
        )


class AdapterFetchError(Exception):
    """The adapter's files could not be fetched or do not match its name."""


class AdapterDiskCache:
    """Immutable adapter versions on local disk, fetched once per name (single flight)."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self._store = store
        self._inflight: dict[str, asyncio.Future[Path]] = {}

    def path_for(self, ref: AdapterRef) -> Path:
        return self.root / ref.tenant / ref.name / f"v{ref.version}-{ref.uid}"

    async def ensure(self, ref: AdapterRef) -> Path:
        target = self.path_for(ref)
        if (target / MANIFEST).exists():
            return target
        pending = self._inflight.get(ref.engine_name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[ref.engine_name] = future
        try:
            await self._download(ref, target)
            future.set_result(target)
            return target
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[ref.engine_name]

    async def _download(self, ref: AdapterRef, target: Path) -> None:
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            try:
                await self._store.get_file(ref.s3_prefix + MANIFEST, staging / MANIFEST)
                manifest = json.loads((staging / MANIFEST).read_text())
                if manifest.get("uid") != ref.uid:
                    raise AdapterFetchError(f"{ref.engine_name}: stored files belong to another upload")
                for name in ADAPTER_FILES:
                    await self._store.get_file(ref.s3_prefix + name, staging / name)
            except ObjectMissing as e:
                raise AdapterFetchError(f"{ref.engine_name}: not in object storage") from e
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _make_resolver_class() -> type:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class S3LoRAResolver(LoRAResolver):
        """Resolves Banyan's internal adapter names from S3 through the disk cache."""

        def __init__(self, cache: AdapterDiskCache) -> None:
            self._cache = cache

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            ref = AdapterRef.from_engine_name(lora_name)
            if ref is None:
                return None
            try:
                path = await self._cache.ensure(ref)
            except AdapterFetchError as e:
                log.warning("banyan resolver: %s", e)
                return None
            # vLLM assigns the integer id itself after resolution.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path),
                               base_model_name=base_model_name)

    return S3LoRAResolver


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver with vLLM."""
    from vllm.lora.resolver import LoRAResolverRegistry

    if "banyan-s3" in LoRAResolverRegistry.get_supported_resolvers():
        return
    settings = ResolverSettings()
    store = S3ObjectStore(settings.s3())
    cache = AdapterDiskCache(settings.lora_cache_dir, store)
    LoRAResolverRegistry.register_resolver("banyan-s3", _make_resolver_class()(cache))
