"""The typed state the app factory builds once and routes receive through dependencies.

Each client is typed by the role the gateway uses it in: a small Protocol declared next to the class that
implements it (``Tenants`` by :class:`gateway.tenants.TenantStore`, ``Registry`` by
:class:`adapters.registry.AdapterRegistry`, ...), so the unit tests put their in-memory fakes in the same
fields. The engine pool stays the concrete :class:`gateway.engine.EnginePool`: its seam is its httpx transport.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from adapters.registry import Registry
from adapters.store import ObjectStore
from gateway.engine import EnginePool
from gateway.fine_tuning import Jobs
from gateway.fine_tuning.files import Files
from gateway.health import Drain, Readiness
from gateway.invalidation import Invalidator
from gateway.metrics import Metrics
from gateway.quotas import Headroom, Limiter
from gateway.settings import Settings
from gateway.tenants import Tenants
from gateway.tracing import Tracing
from gateway.usage import Usage
from retrieval.context import TokenCounter
from retrieval.service import Documents

if TYPE_CHECKING:
    from adapters.basemodel import BaseModelSpec
    from adapters.imports import ImportRunner


@dataclass(frozen=True)
class ServedBase:
    """One served base model: what adapters for it are checked against, the engines that serve it and its
    tokenizer."""

    id: str
    spec: BaseModelSpec | None
    """Its shape (from its ``config.json``); None: uploads for it are refused."""
    engines: EnginePool
    tokens: TokenCounter


class Pinger(Protocol):
    """The Redis connection as the app itself uses it (the stores hold their own reference to it): probed for
    readiness and closed at shutdown."""

    def ping(self) -> Awaitable[object]: ...
    async def aclose(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    redis: Pinger
    store: ObjectStore
    engines: EnginePool
    tenants: Tenants
    adapters: Registry
    metrics: Metrics
    quotas: Limiter
    usage: Usage
    base_spec: BaseModelSpec | None
    documents: Documents
    tokens: TokenCounter
    """Counts base-model tokens (the unit of the ``rag`` context budget and of a fine-tuning job's size)."""
    files: Files
    """A tenant's training files (``/v1/files``)."""
    jobs: Jobs
    """Fine-tuning jobs (``/v1/fine_tuning/jobs``)."""
    drain: Drain = field(default_factory=Drain)
    """Requests in flight and the shutdown drain (:mod:`gateway.health`)."""
    readiness: Readiness = field(default_factory=Readiness)
    """The cached readiness check of ``/readyz``."""
    imports: ImportRunner | None = None
    """Bulk adapter imports (``/admin/imports``); None in a state built without Redis (they answer 503)."""
    tracing: Tracing = field(default_factory=Tracing)
    """Spans of a request's stages (:mod:`gateway.tracing`; off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set)."""
    invalidation: Invalidator | None = None
    """The cache invalidation subscriber the lifespan runs (:mod:`gateway.invalidation`); None: none runs (the
    caches, if any, keep to their short TTL)."""
    headroom: Headroom = field(default_factory=Headroom)
    """The room each tenant's last admission left: whether a completion may start on the engine before its
    admission is decided (``engine_first``)."""
    bases: dict[str, ServedBase] = field(default_factory=dict)
    """Every served base model by id, the default first. Default: the one base of ``settings.base_model`` with
    ``base_spec``, ``engines`` and ``tokens`` (which are always the default base's)."""

    def __post_init__(self) -> None:
        if not self.bases:
            self.bases = {self.settings.base_model: ServedBase(id=self.settings.base_model, spec=self.base_spec,
                                                               engines=self.engines, tokens=self.tokens)}

    @property
    def default_base(self) -> str:
        """The id of the default base model (the first configured)."""
        return next(iter(self.bases))
