"""Wire models of the admin routes (no I/O)."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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


class TenantPatch(BaseModel):
    """Only the fields sent change; a limit sent as null means no limit, a name is never null."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=200)
    rpm: Limit = Field(default=None, ge=1)
    tpm: Limit = Field(default=None, ge=1)
    max_concurrency: Limit = Field(default=None, ge=1)
    fallback_to_base: bool = False


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


class CanaryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    percent: int = Field(ge=0, le=100)


class CanaryOut(BaseModel):
    version: int
    percent: int
    """Of the adapter's requests, the share served by ``version``; the rest go to the active version."""


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
