"""Wire models of the fine-tuning routes (``/v1/files``, ``/v1/fine_tuning/jobs``): OpenAI's shapes plus Banyan's
``banyan`` extension. No I/O here; the service checks the values and renders records into these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HyperparameterValue = int | float | str
"""A number or ``"auto"`` (the service checks which, and the range)."""


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    """OpenAI's field: a stored file here was validated on upload."""


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FromDocuments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: str | None = None


class BanyanOptions(BaseModel):
    """Banyan's extension of a job request (``extra_body={"banyan": {...}}`` with the OpenAI SDK)."""

    model_config = ConfigDict(extra="forbid")
    rank: int | None = None
    activate: str = "if_better"
    from_documents: FromDocuments | None = None


class JobCreate(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs``. ``method`` is accepted only as OpenAI's default (supervised)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str | None = None
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    """As sent: the service checks each value (a number in range or ``"auto"``) and names the bad one."""
    seed: int | None = None
    method: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    banyan: BanyanOptions = Field(default_factory=BanyanOptions)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobBanyan(BaseModel):
    adapter: str
    version: int | None = None
    activated: bool | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    created_at: int
    finished_at: int | None
    training_file: str | None
    validation_file: str | None
    hyperparameters: dict[str, HyperparameterValue]
    trained_tokens: int | None
    error: JobError | None
    fine_tuned_model: str | None
    organization_id: str
    """The tenant (OpenAI's organization)."""
    seed: int
    result_files: list[str] = Field(default_factory=list)
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    banyan: JobBanyan


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool
