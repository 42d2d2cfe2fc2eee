"""Routes of the fine-tuning surface (tenant key): parse, call one service function, render.

Every call is scoped by the tenant of the key; another tenant's file or job answers exactly like a missing one
(404). These routes hold no generation slot: they are not admitted by the rpm/tpm limits of completions (the
per-tenant limits of fine-tuning are files held, jobs running at once and training tokens per job)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from gateway.deps import StateDep, TenantDep
from gateway.fine_tuning import service
from gateway.fine_tuning.protocol import EventList, FileDeleted, FileList, FileOut, JobCreate, JobList, JobOut

router = APIRouter(prefix="/v1", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/files")
async def upload_file(state: StateDep, tenant: TenantDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> FileOut:
    return await service.upload_file(state, tenant, purpose=purpose, filename=file.filename or "", file=file.file)


@router.get("/files")
async def list_files(state: StateDep, tenant: TenantDep) -> FileList:
    return await service.list_files(state, tenant)


@router.get("/files/{file_id}")
async def get_file(file_id: str, state: StateDep, tenant: TenantDep) -> FileOut:
    return await service.get_file(state, tenant, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, state: StateDep, tenant: TenantDep) -> Response:
    return Response(await service.file_content(state, tenant, file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, state: StateDep, tenant: TenantDep) -> FileDeleted:
    return await service.delete_file(state, tenant, file_id)


@router.post("/fine_tuning/jobs")
async def create_job(body: JobCreate, state: StateDep, tenant: TenantDep) -> JobOut:
    return await service.create_job(state, tenant, body)


@router.get("/fine_tuning/jobs")
async def list_jobs(state: StateDep, tenant: TenantDep, limit: Limit = 20, after: str | None = None) -> JobList:
    return await service.list_jobs(state, tenant, limit=limit, after=after)


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, state: StateDep, tenant: TenantDep) -> JobOut:
    return await service.get_job(state, tenant, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, state: StateDep, tenant: TenantDep) -> JobOut:
    return await service.cancel_job(state, tenant, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, state: StateDep, tenant: TenantDep, limit: Limit = 20,
                     after: str | None = None) -> EventList:
    return await service.job_events(state, tenant, job_id, limit=limit, after=after)
