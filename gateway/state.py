"""The typed state the app factory builds once and routes receive through dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from adapters.registry import AdapterRegistry
from adapters.store import ObjectStore
from gateway.engine import EnginePool
from gateway.metrics import Metrics
from gateway.quotas import Quotas
from gateway.settings import Settings
from gateway.tenants import TenantStore
from gateway.usage import UsageStore
from retrieval.context import TokenCounter
from retrieval.service import DocumentService

if TYPE_CHECKING:
    from adapters.basemodel import BaseModelSpec


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: ObjectStore
    engines: EnginePool
    tenants: TenantStore
    adapters: AdapterRegistry
    metrics: Metrics
    quotas: Quotas
    usage: UsageStore
    base_spec: BaseModelSpec | None
    documents: DocumentService
    tokens: TokenCounter
    """Counts base-model tokens (the unit of the ``rag`` context budget)."""
