"""The one typed configuration object of the gateway.

Built once (by the CLI or a test) and passed down explicitly; nothing else in the gateway reads the
environment. Every field maps to a ``BANYAN_<FIELD>`` environment variable.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.store import S3Settings


class BaseModelEntry(BaseModel):
    """One served base model (an entry of ``BANYAN_BASE_MODELS``): its id (the engines' served model name, what
    clients send as ``model``), its Hugging Face folder (``config.json``, which adapter uploads are checked against,
    and ``tokenizer.json``, which ``rag`` budgets count in), and the engines that serve it (a pool of its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\s]+$")
    config: Path | None = None
    """The model's ``config.json`` or its folder; without it, uploads for this base are refused."""
    tokenizer: Path | None = None
    """Its ``tokenizer.json``; default: the one beside ``config``."""
    engine_urls: list[str] = Field(min_length=1)

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        return split_urls(value)


def split_urls(value: object) -> object:
    """A comma-separated string of URLs as a list (anything else as it is, for pydantic to check)."""
    if isinstance(value, str):
        return [u.strip() for u in value.split(",") if u.strip()]
    return value


def read_base_models_file(path: Path) -> list[Any]:
    """The list of bases in a ``BANYAN_BASE_MODELS_FILE``: JSON, or YAML for ``.yaml``/``.yml`` (either a list, or
    ``{"base_models": [...]}``)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict) and "base_models" in data:
        data = data["base_models"]
    if not isinstance(data, list):
        raise ValueError(f"{path.name} must hold a list of base models (or {{\"base_models\": [...]}})")
    return data


class Settings(S3Settings):
    """The gateway's settings; the ``s3_*`` fields (``BANYAN_S3_*``) come from :class:`adapters.store.S3Settings`,
    the group the engine's resolver reads too."""

    model_config = SettingsConfigDict(env_prefix="BANYAN_", extra="ignore")

    mode: Literal["dev", "prod"] = "prod"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".banyan")
    dev_model: str = "smollm2"
    """The model ``banyan dev`` serves (its ``--model``): ``smollm2`` or ``tiny`` (``gateway/dev/models.py``)."""

    admin_key: SecretStr = SecretStr("")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = Field(default=512, ge=8)
    """Connections to Redis one gateway opens at most; a command that finds them all busy waits for one (up to
    ``redis_pool_timeout_s``, then 503) rather than failing at once."""
    redis_pool_timeout_s: float = Field(default=5.0, gt=0)

    engine_urls: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://127.0.0.1:8100"])
    """Comma-separated base URLs of the vLLM OpenAI servers (``http://host:port``)."""
    engine_api_key: SecretStr | None = None
    base_model: str = "banyan-demo"
    base_model_config: Path | None = None
    """The base model's Hugging Face ``config.json`` (or its folder): adapter uploads are checked
    against its module names and dimensions."""

    base_models: list[BaseModelEntry] | None = None
    """Several base models, each with its own engine pool (JSON: ``[{"id", "config", "engine_urls", "tokenizer"?}]``);
    the first is the default. Without it (and without ``base_models_file``), the one base of ``base_model``,
    ``base_model_config``, ``base_model_tokenizer`` and ``engine_urls`` is served."""
    base_models_file: Path | None = None
    """The same list in a small JSON or YAML file."""

    max_lora_rank: int = Field(default=16, ge=1, le=512)
    max_loras: int = Field(default=8, ge=1)
    max_cpu_loras: int = Field(default=32, ge=1)
    engine_resident_adapters: int = Field(default=64, ge=1)
    """Adapters the gateway lets one replica hold before it unloads the least recently used idle ones."""
    lora_cache_max_bytes: int = Field(default=2 * 1024**3, ge=1024 * 1024)
    """The engine-side adapter disk cache bound (passed to the engine `banyan dev` starts)."""
    prefetch_on_activate: bool = True
    """Warm an adapter version on its home replica as soon as it becomes active."""
    upload_sweep_after_s: float = Field(default=900.0, gt=0)
    """Files of an upload not recorded this long after it began are removed (the writer died)."""
    max_adapter_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_import_items: int = Field(default=10_000, ge=1)
    """Most items one bulk import (`POST /admin/imports`) may carry (400 above it)."""
    import_concurrency: int = Field(default=4, ge=1, le=64)
    """Adapters one gateway imports at once, across all bulk imports it runs."""
    import_lease_s: float = Field(default=30.0, ge=1.0)
    """A bulk import's runner renews its lease every third of this; another gateway resumes the import once the
    lease lapses (its runner died)."""
    import_poll_s: float = Field(default=15.0, gt=0)
    """How often a gateway looks for unfinished bulk imports nobody runs."""
    import_retention_s: int = Field(default=7 * 24 * 3600, ge=60)
    """How long a finished bulk import's record and per-item results stay readable."""
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_prompts_per_request: int = Field(default=16, ge=1)
    """Most prompts one `/v1/completions` request may carry (400 `param: prompt` above it)."""
    max_n: int = Field(default=16, ge=1)
    """Largest `n` (and `best_of`) of a completion request (400 above it)."""
    max_tokens_per_request: int | None = Field(default=None, ge=1)
    """Largest `max_tokens` (`max_completion_tokens`) per choice; none: the model's window. Below the window, it
    is also the limit of a chat request that sets none."""
    concurrency_lease_s: float = Field(default=60.0, ge=1.0)
    """How long a request's concurrency lease lives unless its replica renews it (every third of it): the slots
    of a replica that died mid-request come back after this long."""
    usage_hourly_retention_s: int = Field(default=31 * 86400, ge=3600)
    """How long hourly usage buckets stay readable after their hour ends (``GET .../usage?bucket_width=1h``)."""
    usage_daily_retention_s: int = Field(default=400 * 86400, ge=86400)
    """How long daily usage buckets stay readable after their day ends (``bucket_width=1d``)."""
    usage_max_users_per_bucket: int = Field(default=100, ge=0, le=10_000)
    """Distinct request ``user`` values a tenant's usage bucket names; further users' requests count with
    ``user: null``."""
    max_user_chars: int = Field(default=256, ge=1, le=4096)
    """Longest ``user`` field of a request (400 `param: user` above it)."""
    admin_usage_max_rows: int = Field(default=1000, ge=1)
    """Most tenant buckets one page of ``GET /admin/usage`` holds (``has_more``/``next_page`` beyond)."""

    otel_exporter_otlp_endpoint: str | None = Field(default=None, validation_alias="otel_exporter_otlp_endpoint")
    """OpenTelemetry's standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (no ``BANYAN_`` prefix; OTLP over HTTP, spans go to
    ``<endpoint>/v1/traces``): when set, each request's stages are traced and exported. Unset (the default), no
    tracing SDK is set up at all."""
    otel_service_name: str = Field(default="banyan-gateway", validation_alias="otel_service_name", min_length=1)
    """OpenTelemetry's standard ``OTEL_SERVICE_NAME``: the ``service.name`` of the exported spans."""

    max_document_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest document text (UTF-8 bytes) `POST /v1/documents` accepts (413 above it)."""
    max_chunks_per_document: int = Field(default=1024, ge=1)
    """Most chunks one document may make (413 above it, before it is embedded; about 700 KB of prose)."""
    max_documents_per_tenant: int = Field(default=10_000, ge=1)
    """Most documents one tenant may hold (429 `quota_exceeded` above it)."""
    max_chunks_per_tenant: int = Field(default=100_000, ge=1)
    """Most chunks one tenant's documents may hold together (429 `quota_exceeded` above it)."""
    max_model_len: int = Field(default=4096, ge=256)
    """The engines' context window in tokens (their ``--max-model-len``): prompt, context and output share it."""
    base_model_tokenizer: Path | None = None
    """The base model's ``tokenizer.json``, for budgeting ``rag`` context in its tokens. Default: the one beside
    ``base_model_config``; without either, tokens are estimated from characters."""
    rag_max_context_tokens: int = Field(default=1024, ge=64)
    """Upper bound of the retrieved context put in front of the model with ``rag``, in base-model tokens. Below
    it, the context gets what the window leaves after the prompt and the request's ``max_tokens``."""
    rag_output_reserve_tokens: int = Field(default=256, ge=1)
    """Tokens kept free for the answer when a ``rag`` request does not set ``max_tokens``."""
    embedding_batch_size: int = Field(default=32, ge=1, le=1024)
    """Chunks embedded per batch (each batch runs in a worker thread)."""
    retrieval_index: str = Field(default="banyan-chunks", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Name of the Redis search index over the chunks of every tenant (created at start-up if absent)."""
    retrieval_vector_type: Literal["FLOAT16", "FLOAT32"] = "FLOAT16"
    """How the index stores chunk vectors (half the memory at FLOAT16, same recall). An existing index of the other
    type is refused at start-up, naming this setting."""
    embedding_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=256)
    """The id of the retrieval embedder as ``POST /v1/embeddings`` names it (its ``model``, and the model its usage
    is recorded against)."""
    embedder: Literal["onnx", "torch"] = "onnx"
    """How the embedding model runs: ``onnx`` (ONNX Runtime, exported once from the packaged model into
    ``embedder_cache_dir``; same vectors, queries several times faster) or ``torch`` (sentence-transformers)."""
    embedder_threads: int = Field(default=1, ge=1, le=64)
    """CPU threads of the ``onnx`` embedder (the engine needs the other cores)."""
    embedder_precision: Literal["bf16", "fp32"] = "bf16"
    """What the ``onnx`` embedder's large batches (ingestion) run at: ``bf16`` (the same weights in torch with bf16
    matrix products, about 1.7x the chunks per CPU second, cosine to fp32 above 0.9999; queries stay fp32; fp32 on
    a CPU without native bf16) or ``fp32`` (ONNX Runtime for everything)."""
    embedder_cache_dir: Path | None = None
    """Where the ``onnx`` embedder keeps its exported model. Default: ``<data_dir>/embedder``."""
    max_embedding_inputs: int = Field(default=256, ge=1, le=2048)
    """Most texts one ``POST /v1/embeddings`` request may carry (400 `param: input` above it)."""
    max_embedding_input_chars: int = Field(default=8192, ge=1)
    """Longest text (characters) ``POST /v1/embeddings`` tokenizes; a text within it may still be over the
    embedder's window in tokens (also 400)."""

    max_training_file_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    """Largest training file `POST /v1/files` accepts (413 above it)."""
    max_files_per_tenant: int = Field(default=100, ge=1)
    """Most files one tenant may hold (429 `quota_exceeded` above it; a `from_documents` job's file counts too)."""
    max_training_tokens_per_job: int = Field(default=1_000_000, ge=1)
    """Most base-model tokens one fine-tuning job may train on: its examples' tokens times its epochs (400 above)."""
    max_active_fine_tuning_jobs: int = Field(default=2, ge=1)
    """Fine-tuning jobs one tenant may have queued or running at once (429 above it)."""

    engine_connect_timeout_s: float = 5.0
    engine_read_timeout_s: float = 600.0
    engine_max_connections: int = Field(default=512, ge=1)
    engine_http: Literal["aiohttp", "httpx"] = "aiohttp"
    """The connection pool the gateway reaches its replicas through: ``aiohttp`` (constant-time pooling, C parser)
    or ``httpx``'s own (walks every pooled connection per request: several times the CPU at high concurrency)."""
    body_read_timeout_s: float = Field(default=60.0, gt=0)
    """A request body must have arrived this long after the request began (408 otherwise: a slow-loris body)."""
    max_concurrent_connections: int = Field(default=2048, ge=1)
    """Connections and requests the server handles at once (uvicorn's ``limit_concurrency``; 503 above it)."""
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    """An idle keep-alive connection is closed after this long."""
    gc_young_threshold: int = Field(default=50_000, ge=0)
    """The cyclic garbage collector's youngest-generation threshold once the gateway has started (Python's own is
    700; 0 keeps Python's). At 700, the objects of the requests in flight trigger a young collection every few
    requests and promote those still alive into the older generations, whose collections then walk them again: about
    140 us of CPU a request at 64 in flight (BENCHMARKS.md). Request objects are freed by reference counting, not by
    the collector, so a higher threshold mostly skips work; a cycle waits longer to be collected."""
    key_cache_ttl_s: float = Field(default=30.0, ge=0, le=3600)
    """How long a gateway replica trusts a key it checked in Redis while its invalidation subscriber is connected
    (0: check every request). A key revoked through one replica stops there at once and on the others when the
    invalidation message arrives (:mod:`gateway.invalidation`)."""
    key_cache_max_entries: int = Field(default=10_000, ge=0)
    """Keys the cache holds at most (about 300 bytes each), least recently used evicted first."""
    adapter_cache_ttl_s: float = Field(default=30.0, ge=0, le=3600)
    """How long a gateway replica trusts an adapter's active version and split it read in Redis while its
    invalidation subscriber is connected (0: read on every request)."""
    adapter_cache_max_entries: int = Field(default=10_000, ge=0)
    """Adapters the active-version cache holds at most (about 1.4 KB each, 2.3 KB with a split), least recently used
    evicted first."""
    cache_invalidation: bool = True
    """Subscribe to the invalidation channel. Off: the key and adapter caches trust an entry for
    ``cache_fallback_ttl_s`` only."""
    cache_fallback_ttl_s: float = Field(default=1.0, ge=0)
    """How long the key and adapter caches trust an entry while the invalidation subscriber is not connected (a
    Redis outage, or ``cache_invalidation`` off): the bound on a change reaching this replica when messages are
    lost."""
    engine_first: bool = True
    """Start a completion on the engine while its admission is being decided, when this replica's last admission
    of the tenant (at most ``engine_first_window_s`` ago) left ample room: no concurrency cap, at least two requests
    and twice this request's tokens left in its windows. A refusal then cancels the engine call (the engine drops
    the request). Takes the admission's Redis round trip off the time to first token; a tenant refused once waits
    for its admissions again until one is granted with room, so refused requests never reach the engine in
    numbers (at most one per grant). Requests with ``rag`` always wait for their admission."""
    engine_first_window_s: float = Field(default=5.0, ge=0)
    """How long the room a tenant's last admission left counts for :attr:`engine_first`."""
    shutdown_drain_s: float = Field(default=10.0, ge=0)
    """On SIGTERM the gateway answers /readyz 503 at once and lets requests finish for up to this long; streams
    still open then end with an error event and ``[DONE]``."""
    readiness_cache_s: float = Field(default=2.0, ge=0)
    """How long /readyz reuses its last check of the dependencies."""
    log_level: str = "info"

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        return split_urls(value)

    @model_validator(mode="after")
    def _fail_fast_outside_dev(self) -> Settings:
        if self.mode == "prod":
            key = self.admin_key.get_secret_value()
            if len(key) < 16:
                raise ValueError(
                    "BANYAN_ADMIN_KEY must be set to a secret of at least 16 characters "
                    "outside `banyan dev`"
                )
            for name, secret in (("BANYAN_ADMIN_KEY", key), ("BANYAN_ENGINE_API_KEY", self.engine_api_key
                                                            and self.engine_api_key.get_secret_value())):
                weakness = secret_weakness(secret) if secret else None
                if weakness:
                    raise ValueError(f"{name} {weakness}; generate one, e.g. `openssl rand -hex 24`")
        if not self.engine_urls:
            raise ValueError("BANYAN_ENGINE_URLS needs at least one engine URL")
        self._load_bases()
        return self

    def _load_bases(self) -> None:
        """Read ``base_models_file``, check the bases (unique ids, an engine each), and make ``base_model`` the
        default base's id (the code that speaks of "the" base model means the default one)."""
        if self.base_models_file is not None:
            if self.base_models is not None:
                raise ValueError("set BANYAN_BASE_MODELS or BANYAN_BASE_MODELS_FILE, not both")
            try:
                raw = read_base_models_file(self.base_models_file)
                self.base_models = [BaseModelEntry.model_validate(entry) for entry in raw]
            except (OSError, ValueError, ValidationError) as e:
                raise ValueError(f"BANYAN_BASE_MODELS_FILE {self.base_models_file}: {e}") from e
        if self.base_models is None:
            return
        if not self.base_models:
            raise ValueError("BANYAN_BASE_MODELS needs at least one base model")
        ids = [b.id for b in self.base_models]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"BANYAN_BASE_MODELS names a base model more than once: {', '.join(repeated)}")
        if "base_model" in self.model_fields_set and self.base_model != ids[0]:
            raise ValueError(f"BANYAN_BASE_MODEL ({self.base_model}) is not the first (default) entry of "
                             f"BANYAN_BASE_MODELS ({ids[0]}); leave it unset")
        self.base_model = ids[0]

    @property
    def bases(self) -> list[BaseModelEntry]:
        """The served base models, the default first: ``base_models``, or the one base of the single-base fields."""
        if self.base_models:
            return list(self.base_models)
        return [BaseModelEntry(id=self.base_model, config=self.base_model_config, tokenizer=self.base_model_tokenizer,
                               engine_urls=self.engine_urls)]

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


PLACEHOLDER_WORDS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "placeholder", "example",
                     "your-key", "yourkey", "secret-here", "password", "xxxxxxxx")
"""Fragments of placeholder secrets (the deploy files once shipped ``change-me-to-a-long-random-secret``)."""
MIN_DISTINCT_CHARACTERS = 8
MIN_ENTROPY_BITS = 40.0
"""A secret's length times the Shannon entropy of its characters: 16 random hex digits give about 50, 16 random
base64 characters about 59."""


def secret_weakness(secret: str) -> str | None:
    """Why ``secret`` is not a production secret (a known placeholder, too few distinct characters, a repeated
    pattern, a run like ``abcd``/``1234``, too little entropy), or None."""
    lowered = secret.lower()
    if any(word in lowered for word in PLACEHOLDER_WORDS):
        return "is a placeholder, not a secret"
    counts = Counter(secret)
    if len(counts) < MIN_DISTINCT_CHARACTERS:
        return f"has fewer than {MIN_DISTINCT_CHARACTERS} distinct characters"
    period = next((p for p in range(1, len(secret) // 2 + 1) if secret == (secret[:p] * len(secret))[:len(secret)]),
                  None)
    if period is not None:
        return "repeats a short pattern"
    if 2 * sum(abs(ord(a) - ord(b)) <= 1 for a, b in itertools.pairwise(secret)) > len(secret) - 1:
        return "is mostly a run of neighbouring characters"
    bits = -sum(n * math.log2(n / len(secret)) for n in counts.values())
    if bits < MIN_ENTROPY_BITS:
        return f"is too predictable ({bits:.0f} bits of entropy, {MIN_ENTROPY_BITS:.0f} needed)"
    return None
