"""Fine-tuning operations, one function per route: a tenant's training files and its fine-tuning jobs.

Each takes the app state, the caller's tenant and what its route parsed, raises the gateway's errors and returns
the wire model the route sends. Whatever belongs to another tenant answers exactly like a missing one (404).

A file is validated whole on upload with the trainer's own parser (:func:`adapters.training.lora.parse_chat_jsonl`):
a bad line is refused with its number and nothing is stored. A job is checked completely before it is queued:
its files are read back from the store and parsed again (the job counts exactly what it trains on), a
``from_documents`` job's examples are made from the tenant's documents now and stored as an ordinary file of the
tenant (so the job records what it was trained on), its training tokens are counted against the per-job limit, and
the job is stored and queued in one step under the per-tenant limit of unfinished jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from adapters.naming import is_valid_id
from adapters.training.jobs import (
    ACTIVATE_CHOICES,
    Job,
    JobEvent,
    fence_to_dict,
    new_job_id,
    resolve_hyperparameters,
)
from adapters.training.lora import ChatMessages, parse_chat_jsonl
from gateway.errors import AuthError, InvalidRequest, ModelNotFound, NotFound, PayloadTooLarge, RateLimited
from gateway.fine_tuning.files import FileRecord, FileRefused, TooManyFiles
from gateway.fine_tuning.from_documents import examples_from_documents
from gateway.fine_tuning.protocol import (
    EventList,
    EventOut,
    FileDeleted,
    FileList,
    FileOut,
    JobBanyan,
    JobCreate,
    JobError,
    JobList,
    JobOut,
)
from gateway.state import AppState
from gateway.tenants import Tenant, live_guard
from retrieval.context import TokenCounter

log = logging.getLogger("banyan.fine_tuning")

PURPOSE = "fine-tune"
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a message adds beyond its content (the chat template's role and turn markers), in the training count."""
HYPERPARAMETER_RANGES: Mapping[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-4, 100.0),
}
"""Each hyperparameter's kind and inclusive range (besides ``"auto"``)."""
MAX_SEED = 2**31 - 1


# -- files -------------------------------------------------------------------------------------------


async def upload_file(state: AppState, tenant: str, *, purpose: str, filename: str, file: BinaryIO) -> FileOut:
    """Validate every line, then store the file (nothing is stored when any line is bad)."""
    if purpose != PURPOSE:
        raise InvalidRequest(f"Only purpose `{PURPOSE}` is supported.", param="purpose")
    limit = state.settings.max_training_file_bytes
    data = await asyncio.to_thread(_read_capped, file, limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"A training file may hold at most {limit} bytes.", param="file")
    name = Path(filename).name or "file.jsonl"
    await _parse(data, source=name, param="file")
    record = await _store_file(state, tenant, filename=name, data=data)
    return _file_out(record)


async def list_files(state: AppState, tenant: str) -> FileList:
    return FileList(data=[_file_out(r) for r in await state.files.list_files(tenant)])


async def get_file(state: AppState, tenant: str, file_id: str) -> FileOut:
    return _file_out(await _require_file(state, tenant, file_id, param="file_id"))


async def file_content(state: AppState, tenant: str, file_id: str) -> bytes:
    data = await state.files.content(tenant, file_id)
    if data is None:
        raise _no_file(file_id, param="file_id")
    return data


async def delete_file(state: AppState, tenant: str, file_id: str) -> FileDeleted:
    if not await state.files.delete(tenant, file_id):
        raise _no_file(file_id, param="file_id")
    return FileDeleted(id=file_id)


# -- jobs --------------------------------------------------------------------------------------------


async def create_job(state: AppState, tenant_id: str, body: JobCreate) -> JobOut:
    """Check everything, make the training file of a ``from_documents`` job, count the training tokens, then store
    and queue the job (429 when the tenant has as many unfinished jobs as it may)."""
    settings = state.settings
    tenant = await _live_tenant(state, tenant_id)
    options = body.banyan
    if options.activate not in ACTIVATE_CHOICES:
        raise InvalidRequest(f"`banyan.activate` must be one of {', '.join(ACTIVATE_CHOICES)}.",
                             param="banyan.activate")
    if options.rank is not None and not 1 <= options.rank <= settings.max_lora_rank:
        raise InvalidRequest(f"`banyan.rank` must be between 1 and {settings.max_lora_rank}.", param="banyan.rank")
    hyperparameters = _check_hyperparameters(_asked_hyperparameters(body))
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise InvalidRequest(f"`seed` must be between 0 and {MAX_SEED}.", param="seed")
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    continue_from, adapter, base = await _resolve_model(state, tenant_id, body)
    tokens = state.bases[base].tokens
    if body.training_file is None and options.from_documents is None:
        raise InvalidRequest("`training_file` is required unless `banyan.from_documents` is given.",
                             param="training_file")

    examples: list[ChatMessages] = []
    if body.training_file is not None:
        examples = await _examples_of(state, tenant_id, body.training_file, param="training_file")
    if body.validation_file is not None:
        await _examples_of(state, tenant_id, body.validation_file, param="validation_file")
    job_id = new_job_id()
    if options.from_documents is not None:
        examples = [*examples, *await _document_examples(state, tenant_id, options.from_documents.collection,
                                                         seed=seed, tokens=tokens)]
    steps = resolve_hyperparameters(hyperparameters, examples=len(examples))
    training_tokens = await asyncio.to_thread(_count_tokens, tokens, examples) * steps.n_epochs
    if training_tokens > settings.max_training_tokens_per_job:
        raise InvalidRequest(f"This job would train on {training_tokens} tokens ({steps.n_epochs} epochs); a job may "
                             f"train on at most {settings.max_training_tokens_per_job}. Use fewer examples or epochs.",
                             param="training_file" if options.from_documents is None else "banyan.from_documents")

    made_file: FileRecord | None = None
    training_file = body.training_file
    if options.from_documents is not None:
        collection = options.from_documents.collection
        made_file = await _store_file(state, tenant_id, filename=f"documents-{collection or 'all'}-{job_id}.jsonl",
                                      data=_to_jsonl(examples))
        training_file = made_file.id
    job = Job(id=job_id, tenant=tenant_id, model=body.model, base_model=base, adapter=adapter,
              training_file=training_file, validation_file=body.validation_file, hyperparameters=hyperparameters,
              seed=seed, rank=options.rank, activate=options.activate,
              from_documents={"collection": options.from_documents.collection} if options.from_documents else None,
              continue_from=continue_from, training_tokens=training_tokens, created_at=int(time.time()),
              fence=fence_to_dict(state.tenants.fence(tenant)))
    if not await state.jobs.create(job, max_active=settings.max_active_fine_tuning_jobs):
        if made_file is not None:
            await state.files.delete(tenant_id, made_file.id)
        n = settings.max_active_fine_tuning_jobs
        raise RateLimited(f"At most {n} fine-tuning job{'s' if n != 1 else ''} may be queued or running at once; "
                          "wait for one to finish or cancel one.")
    await _undo_if_deleted(state, tenant, job_id)
    return _job_out(job)


async def list_jobs(state: AppState, tenant: str, *, limit: int, after: str | None) -> JobList:
    try:
        jobs, has_more = await state.jobs.list_jobs(tenant, limit=limit, after=after)
    except ValueError as e:
        raise InvalidRequest(str(e), param="after") from e
    return JobList(data=[_job_out(j) for j in jobs], has_more=has_more)


async def get_job(state: AppState, tenant: str, job_id: str) -> JobOut:
    job = await state.jobs.get(tenant, job_id)
    if job is None:
        raise _no_job(job_id)
    return _job_out(job)


async def cancel_job(state: AppState, tenant: str, job_id: str) -> JobOut:
    job = await state.jobs.cancel(tenant, job_id)
    if job is None:
        raise _no_job(job_id)
    return _job_out(job)


async def job_events(state: AppState, tenant: str, job_id: str, *, limit: int, after: str | None) -> EventList:
    try:
        page = await state.jobs.events(tenant, job_id, limit=limit, after=after)
    except ValueError as e:
        raise InvalidRequest(str(e), param="after") from e
    if page is None:
        raise _no_job(job_id)
    events, has_more = page
    return EventList(data=[_event_out(e) for e in events], has_more=has_more)


async def delete_tenant_data(state: AppState, tenant: str) -> None:
    """Remove a tenant's jobs (unfinished ones stop: a worker finds its job gone) and files; repeatable."""
    await state.jobs.delete_tenant(tenant)
    await state.files.delete_tenant(tenant)


async def refresh_job_gauge(state: AppState) -> None:
    for status, count in (await state.jobs.counts_by_status()).items():
        state.metrics.fine_tuning_jobs.labels(status).set(count)


# -- helpers -----------------------------------------------------------------------------------------


def _read_capped(file: BinaryIO, cap: int) -> bytes:
    file.seek(0)
    return file.read(cap)


async def _parse(data: bytes, *, source: str, param: str) -> list[ChatMessages]:
    """The examples of a JSONL file, parsed exactly as the trainer parses them; 400 naming the bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"`{param}` is not UTF-8 text (byte {e.start}).", param=param) from e
    try:
        return await asyncio.to_thread(parse_chat_jsonl, text, source=source)
    except ValueError as e:
        raise InvalidRequest(f"Invalid fine-tuning JSONL at {e}", param=param) from e


async def _store_file(state: AppState, tenant: str, *, filename: str, data: bytes) -> FileRecord:
    limit = state.settings.max_files_per_tenant
    try:
        return await state.files.add(tenant, filename=filename, purpose=PURPOSE, data=data, max_files=limit,
                                     guard=live_guard(tenant))
    except TooManyFiles as e:
        raise RateLimited(f"You may hold at most {limit} files; delete some first.", param="file",
                          code="quota_exceeded") from e
    except FileRefused as e:  # the tenant's deletion began: its keys are revoked
        raise AuthError("Incorrect API key provided.") from e


async def _require_file(state: AppState, tenant: str, file_id: str, *, param: str) -> FileRecord:
    record = await state.files.get(tenant, file_id)
    if record is None:
        raise _no_file(file_id, param=param)
    return record


async def _examples_of(state: AppState, tenant: str, file_id: str, *, param: str) -> list[ChatMessages]:
    record = await _require_file(state, tenant, file_id, param=param)
    if record.purpose != PURPOSE:
        raise InvalidRequest(f"File `{file_id}` is not a `{PURPOSE}` file.", param=param)
    data = await state.files.content(tenant, file_id)
    if data is None:  # deleted meanwhile
        raise _no_file(file_id, param=param)
    return await _parse(data, source=record.filename, param=param)


async def _document_examples(state: AppState, tenant: str, collection: str | None, *, seed: int,
                             tokens: TokenCounter) -> list[ChatMessages]:
    documents = await state.documents.export(tenant, collection=collection)
    try:
        made = await asyncio.to_thread(examples_from_documents, documents, tokens=tokens, seed=seed)
    except ValueError as e:
        raise InvalidRequest(str(e), param="banyan.from_documents") from e
    return [list(m) for m in made]


async def _live_tenant(state: AppState, tenant_id: str) -> Tenant:
    tenant = await state.tenants.get(tenant_id)
    if tenant is None or tenant.deleting:  # its deletion began after the key was checked
        raise AuthError("Incorrect API key provided.")
    return tenant


async def _undo_if_deleted(state: AppState, tenant: Tenant, job_id: str) -> None:
    """A job stored while the tenant's deletion began is cancelled and, if the deletion may already have cleaned
    up, removed with the tenant's other jobs; the worker would refuse its result anyway (the job's fence)."""
    now = await state.tenants.get(tenant.id)
    if now is not None and not now.deleting and now.uid == tenant.uid:
        return
    await state.jobs.cancel(tenant.id, job_id)
    if now is None or now.deleting:
        await state.jobs.delete_tenant(tenant.id)
    raise AuthError("Incorrect API key provided.")


async def _resolve_model(state: AppState, tenant: str,
                         body: JobCreate) -> tuple[dict[str, Any] | None, str, str]:
    """What the job continues from (None: a base model), the adapter it writes a version of, and the base model it
    trains on (``model`` itself, or the base of the adapter's active version)."""
    continue_from: dict[str, Any] | None = None
    if body.model in state.bases:
        base = body.model
        if body.suffix is None:
            raise InvalidRequest("`suffix` (the adapter to make) is required when `model` is a base model.",
                                 param="suffix")
    else:
        meta = await state.adapters.active_meta(tenant, body.model) if is_valid_id(body.model) else None
        if meta is None:
            served = ", ".join(f"`{b}`" for b in state.bases)
            raise ModelNotFound(f"The model `{body.model}` does not exist: use a base model ({served}) or one of "
                                "your adapters with an active version.", param="model")
        base = meta.base_model or state.default_base
        if base not in state.bases:
            raise InvalidRequest(f"`{body.model}` was made for base model `{base}`, which is no longer served: "
                                 "fine-tune a served base model instead.", param="model")
        continue_from = {"name": body.model, "version": meta.version, "uid": meta.uid}
    adapter = body.suffix if body.suffix is not None else body.model
    if not is_valid_id(adapter):
        raise InvalidRequest("`suffix` must match ^[a-z0-9][a-z0-9-]{0,62}$.", param="suffix")
    return continue_from, adapter, base


def _asked_hyperparameters(body: JobCreate) -> dict[str, Any]:
    """Top-level ``hyperparameters``, or those of OpenAI's ``method`` (``supervised`` only)."""
    if body.method is None:
        return dict(body.hyperparameters)
    if body.method.get("type") != "supervised":
        raise InvalidRequest("Only the `supervised` fine-tuning method is supported.", param="method.type")
    nested = (body.method.get("supervised") or {}).get("hyperparameters") or {}
    if nested and body.hyperparameters:
        raise InvalidRequest("Give `hyperparameters` or `method.supervised.hyperparameters`, not both.",
                             param="hyperparameters")
    return dict(nested or body.hyperparameters)


def _check_hyperparameters(asked: Mapping[str, Any]) -> dict[str, int | float | str]:
    """Every hyperparameter, as asked (``"auto"`` for those not given); 400 naming the first bad one."""
    checked: dict[str, int | float | str] = {}
    for name in asked:
        if name not in HYPERPARAMETER_RANGES:
            raise InvalidRequest(f"Unknown hyperparameter `{name}`; known: {', '.join(HYPERPARAMETER_RANGES)}.",
                                 param=f"hyperparameters.{name}")
    for name, (kind, low, high) in HYPERPARAMETER_RANGES.items():
        value = asked.get(name, "auto")
        if value is None or value == "auto":
            checked[name] = "auto"
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (not number or (kind is int and not float(value).is_integer()) or not math.isfinite(value)
                or not low <= value <= high):
            what = "an integer" if kind is int else "a number"
            raise InvalidRequest(f"`hyperparameters.{name}` must be \"auto\" or {what} from {low:g} to {high:g}.",
                                 param=f"hyperparameters.{name}")
        checked[name] = int(value) if kind is int else float(value)
    return checked


def _count_tokens(tokens: TokenCounter, examples: Sequence[ChatMessages]) -> int:
    """Base-model tokens of one pass over the examples (every message's content and its overhead). Blocking."""
    return sum(tokens.count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for example in examples for m in example)


def _to_jsonl(examples: Sequence[ChatMessages]) -> bytes:
    return "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in examples).encode()


def _no_file(file_id: str, *, param: str) -> NotFound:
    return NotFound(f"No such file: `{file_id}`.", param=param)


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"No such fine-tuning job: `{job_id}`.", param="fine_tuning_job_id")


# -- records -> wire models --------------------------------------------------------------------------


def _file_out(record: FileRecord) -> FileOut:
    return FileOut(id=record.id, bytes=record.bytes, created_at=record.created_at, filename=record.filename,
                   purpose=record.purpose)


def _job_out(job: Job) -> JobOut:
    result = job.result if job.status == "succeeded" else None
    error = JobError(code=str(job.error.get("code", "error")), message=str(job.error.get("message", "")),
                     param=job.error.get("param")) if job.error else None
    return JobOut(id=job.id, model=job.model, status=job.status, created_at=job.created_at,
                  finished_at=job.finished_at, training_file=job.training_file, validation_file=job.validation_file,
                  hyperparameters=job.hyperparameters, trained_tokens=job.trained_tokens, error=error,
                  fine_tuned_model=result["adapter"] if result else None, organization_id=job.tenant, seed=job.seed,
                  banyan=JobBanyan(adapter=job.adapter, version=result["version"] if result else None,
                                   activated=result["activated"] if result else None))


def _event_out(event: JobEvent) -> EventOut:
    return EventOut(id=event.id, created_at=event.created_at, level=event.level, message=event.message,
                    type=event.type, data=event.data)
