"""The one typed configuration object of the gateway.

Built once (by the CLI or a test) and passed down explicitly; nothing else in the gateway reads the
environment. Every field maps to a ``BANYAN_<FIELD>`` environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.store import S3Settings


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

    engine_urls: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://127.0.0.1:8100"])
    """Comma-separated base URLs of the vLLM OpenAI servers (``http://host:port``)."""
    engine_api_key: SecretStr | None = None
    base_model: str = "banyan-demo"
    base_model_config: Path | None = None
    """The base model's Hugging Face ``config.json`` (or its folder): adapter uploads are checked
    against its module names and dimensions."""

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

    engine_connect_timeout_s: float = 5.0
    engine_read_timeout_s: float = 600.0
    engine_max_connections: int = Field(default=512, ge=1)
    log_level: str = "info"

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @model_validator(mode="after")
    def _fail_fast_outside_dev(self) -> Settings:
        if self.mode == "prod":
            key = self.admin_key.get_secret_value()
            if len(key) < 16:
                raise ValueError(
                    "BANYAN_ADMIN_KEY must be set to a secret of at least 16 characters "
                    "outside `banyan dev`"
                )
        if not self.engine_urls:
            raise ValueError("BANYAN_ENGINE_URLS needs at least one engine URL")
        return self

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"
