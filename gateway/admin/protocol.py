"""Wire models of the admin routes (no I/O)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from adapters.naming import ID_PATTERN

Limit = int | None


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(default="", max_length=200)
    rpm: Limit = Field(default=None, ge=1)
    tpm: Limit = Field(default=None, ge=1)
    max_concurrency: Limit = Field(default=None, ge=1)
    fallback_to_base: bool = False
    """Serve a request with the base model (header ``x-banyan-fallback: base``) when its adapter cannot load."""
    daily_token_budget: Limit = Field(default=None, ge=0)
    monthly_token_budget: Limit = Field(default=None, ge=0)
    """Tokens (prompt + completion) it may spend per calendar day / month in UTC; null: no budget."""


class TenantPatch(BaseModel):
    """Only the fields sent change; a limit sent as null means no limit, a name is never null."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=200)
    rpm: Limit = Field(default=None, ge=1)
    tpm: Limit = Field(default=None, ge=1)
    max_concurrency: Limit = Field(default=None, ge=1)
    fallback_to_base: bool = False
    daily_token_budget: Limit = Field(default=None, ge=0)
    monthly_token_budget: Limit = Field(default=None, ge=0)


class BudgetPeriodOut(BaseModel):
    limit: Limit
    used: int
    """Tokens spent in the current period (counted whether or not there is a budget)."""
    remaining: Limit
    resets_at: int
    """When the period ends (unix s, UTC midnight / the first of the next month)."""


class BudgetOut(BaseModel):
    daily: BudgetPeriodOut
    monthly: BudgetPeriodOut


class TenantOut(BaseModel):
    id: str
    object: str = "tenant"
    name: str
    created: int
    rpm: Limit = None
    tpm: Limit = None
    max_concurrency: Limit = None
    status: Literal["active", "deleting"] = "active"
    """``deleting`` while a delete has not finished (repeat the DELETE to finish it)."""
    fallback_to_base: bool = False
    daily_token_budget: Limit = None
    monthly_token_budget: Limit = None
    budget: BudgetOut | None = None
    """The budgets and what is left of them now."""


T = TypeVar("T")


class ListOut(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=200)


class KeyOut(BaseModel):
    key_id: str
    object: str = "api_key"
    name: str
    created: int
    prefix: str


class KeyCreated(KeyOut):
    key: str


class AdapterVersionOut(BaseModel):
    name: str
    object: str = "adapter.version"
    version: int
    active: bool
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created: int
    base_model: str
    """The base model the version was checked against and is served on."""


class CanaryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    percent: int = Field(ge=0, le=100)


class CanaryOut(BaseModel):
    version: int
    percent: int
    """Of the adapter's requests, the share served by ``version``; the rest go to the active version."""


class AdapterUploadOut(AdapterVersionOut):
    """The answer to an upload or an import: the version stored, the base model it was checked against, and the side
    files that came with it and were ignored."""

    ignored_files: list[str]


S3_URL_PATTERN = r"^s3://[A-Za-z0-9][A-Za-z0-9._-]{1,254}(/.*)?$"


class SourceCredentialsIn(BaseModel):
    """Credentials for the copy from `source` only: never stored, never logged."""

    model_config = ConfigDict(extra="forbid")
    access_key_id: str = Field(min_length=1, max_length=256)
    secret_access_key: SecretStr = Field(min_length=1, max_length=1024)
    session_token: SecretStr | None = Field(default=None, max_length=8192)
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://", max_length=1024)
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,64}$")


class AdapterSourceIn(BaseModel):
    """`POST /admin/tenants/{id}/adapters` with a JSON body: import the adapter folder at `source`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=ID_PATTERN)
    source: str = Field(pattern=S3_URL_PATTERN, max_length=1024)
    activate: bool = True
    base_model: str | None = Field(default=None, max_length=256)
    credentials: SourceCredentialsIn | None = None


class AdapterUploadForm(BaseModel):
    """The plain fields of the multipart upload (its files are read apart)."""

    name: str
    activate: bool = True
    base_model: str | None = Field(default=None, max_length=256)


class ImportItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=ID_PATTERN)
    name: str = Field(pattern=ID_PATTERN)
    source: str = Field(pattern=S3_URL_PATTERN, max_length=1024)
    activate: bool = True
    base_model: str | None = Field(default=None, max_length=256)


class ImportIn(BaseModel):
    """`POST /admin/imports`: many adapters from S3 at once (their number is bounded by the settings)."""

    model_config = ConfigDict(extra="forbid")
    items: list[ImportItemIn] = Field(min_length=1)
    credentials: SourceCredentialsIn | None = None


class ImportCounts(BaseModel):
    total: int
    succeeded: int
    failed: int
    pending: int


class ImportItemOut(BaseModel):
    index: int
    tenant: str
    name: str
    source: str
    status: Literal["pending", "running", "succeeded", "failed"]
    version: int | None = None
    active: bool | None = None
    error: dict[str, Any] | None = None
    """The OpenAI error object of a failed item."""


class ImportOut(BaseModel):
    id: str
    object: str = "adapter.import"
    status: Literal["in_progress", "completed", "interrupted"]
    created: int
    finished: int | None
    credentials: Literal["gateway", "request"]
    """Whose credentials read the sources; `request`: kept only in memory by the gateway that received the import."""
    counts: ImportCounts
    data: list[ImportItemOut] = Field(default_factory=list)
    """One page of items, by index (`after`, `limit`; `status=failed` for the failed ones only)."""
    has_more: bool = False


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], raw: bytes | dict[str, Any]) -> M:
    """A body parsed into ``model``; invalid input is the same 400 a route's own body would give."""
    try:
        return model.model_validate_json(raw) if isinstance(raw, bytes) else model.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False,
                                              include_input=False)) from e


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class AdapterOut(BaseModel):
    name: str
    object: str = "adapter"
    active_version: int | None
    canary: CanaryOut | None = None
    versions: list[AdapterVersionOut]


class ActivateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    canary: CanaryIn | None = None
    """A traffic split to hold from now on; without it, any split ends."""


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class UsageCounts(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageOut(BaseModel):
    object: str = "tenant.usage"
    tenant: str
    total: UsageCounts
    models: dict[str, UsageCounts]
    """Per model the tenant called: each adapter by name, and the base model by its id."""


class UsageQuery(BaseModel):
    """``GET /admin/tenants/{id}/usage`` and ``GET /admin/usage``: without ``bucket_width``, the tenant's totals as
    before (the other fields then refused); with it, buckets aligned to UTC hours or days from the one holding
    ``start_time`` up to the one holding ``end_time`` (exclusive; default now), ``limit`` buckets a page."""

    model_config = ConfigDict(extra="forbid")
    bucket_width: Literal["1h", "1d"] | None = None
    start_time: int | None = Field(default=None, ge=0, le=2**40)
    end_time: int | None = Field(default=None, ge=1, le=2**40)
    limit: int | None = Field(default=None, ge=1)
    """Buckets per page: 1h default 24, at most 168; 1d default 7, at most 31 (as OpenAI's usage API)."""
    page: str | None = Field(default=None, max_length=100)
    """The ``next_page`` of the previous page."""


class UsageResultOut(BaseModel):
    model: str
    user: str | None
    """The request's ``user``; null for requests without one, or beyond the bucket's cap of named users."""
    requests: int
    prompt_tokens: int
    completion_tokens: int


class TenantUsageResultOut(UsageResultOut):
    tenant: str


class UsageBucketOut(BaseModel, Generic[T]):
    object: str = "bucket"
    start_time: int
    end_time: int
    results: list[T]


class UsagePage(BaseModel, Generic[T]):
    object: str = "page"
    data: list[UsageBucketOut[T]]
    has_more: bool
    next_page: str | None
    """Pass as ``page`` (same other parameters) for the next page."""


class TenantListOut(ListOut[TenantOut]):
    """A page of tenants by id (``limit``, ``after``)."""

    has_more: bool
    first_id: str | None
    last_id: str | None
