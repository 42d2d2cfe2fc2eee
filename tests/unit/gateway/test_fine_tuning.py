"""The fine-tuning surface: the routes on in-memory state (``make_harness``), the service where a tenant's deletion
races a write (``fakes``), and the file store's Redis logic on a real Valkey (``redis``)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from adapters.training.jobs import file_key
from gateway.app import _count_jobs_forever, create_app
from gateway.errors import AuthError
from gateway.fine_tuning import service
from gateway.fine_tuning.files import FileRefused, FileStore, TooManyFiles
from gateway.fine_tuning.protocol import FromDocuments, JobCreate
from gateway.settings import Settings
from gateway.tenants import TenantStore, live_guard
from retrieval.documents import NewDocument
from tests.unit.gateway.conftest import (
    ADMIN_KEY,
    OTHER_KEY,
    TENANT_KEY,
    Fakes,
    FakeStore,
    Handler,
    Harness,
)

EXAMPLE = {"messages": [{"role": "user", "content": "Where is the depot?"},
                        {"role": "assistant", "content": "In Quarry Lane."}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "Hello?"}]}


def _jsonl(*records: Any) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def _no_engine(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the fine-tuning routes never call the engine")


@pytest.fixture
def h(make_harness: Callable[[Handler], Harness]) -> Harness:
    return make_harness(_no_engine)


def _upload(h: Harness, data: bytes, *, purpose: str = "fine-tune", key: str = TENANT_KEY,
            filename: str = "train.jsonl") -> httpx.Response:
    return h.client.post("/v1/files", headers=h.tenant_headers(key), data={"purpose": purpose},
                         files={"file": (filename, data, "application/jsonl")})


def _file_id(h: Harness, data: bytes | None = None, *, key: str = TENANT_KEY) -> str:
    response = _upload(h, data if data is not None else _jsonl(EXAMPLE, EXAMPLE), key=key)
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def _create(h: Harness, body: dict[str, Any], *, key: str = TENANT_KEY) -> httpx.Response:
    return h.client.post("/v1/fine_tuning/jobs", headers=h.tenant_headers(key), json=body)


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


# -- files -------------------------------------------------------------------------------------------


def test_a_file_is_stored_listed_read_and_deleted(h: Harness) -> None:
    data = _jsonl(EXAMPLE, EXAMPLE)
    response = _upload(h, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-") and body["object"] == "file"
    assert (body["bytes"], body["filename"], body["purpose"]) == (len(data), "train.jsonl", "fine-tune")
    assert h.files.guards == [live_guard("acme")]
    second = _file_id(h)
    listed = h.client.get("/v1/files", headers=h.tenant_headers()).json()
    assert (listed["object"], listed["has_more"]) == ("list", False)
    assert [f["id"] for f in listed["data"]] == [second, body["id"]]  # newest first
    assert h.client.get(f"/v1/files/{body['id']}", headers=h.tenant_headers()).json() == body
    content = h.client.get(f"/v1/files/{body['id']}/content", headers=h.tenant_headers())
    assert content.status_code == 200 and content.content == data
    deleted = h.client.delete(f"/v1/files/{body['id']}", headers=h.tenant_headers())
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert h.client.get(f"/v1/files/{body['id']}", headers=h.tenant_headers()).status_code == 404
    assert h.client.delete(f"/v1/files/{body['id']}", headers=h.tenant_headers()).status_code == 404


@pytest.mark.parametrize(("lines", "line", "why"), [
    ((EXAMPLE, "{not json", EXAMPLE), 2, "not JSON"),
    ((EXAMPLE, EXAMPLE, NO_ANSWER), 3, "no assistant message"),
    ((EXAMPLE, {"messages": []}), 2, "non-empty `messages`"),
    (({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},), 1, "role"),
    (([1, 2],), 1, "non-empty `messages`"),
])
def test_a_bad_line_is_refused_with_its_number_and_nothing_is_stored(h: Harness, lines: tuple[Any, ...], line: int,
                                                                     why: str) -> None:
    response = _upload(h, _jsonl(*lines))
    assert response.status_code == 400, response.text
    error = _error(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", "file")
    assert f"train.jsonl:{line}:" in error["message"] and why in error["message"]
    assert h.files.stored == {}
    assert h.client.get("/v1/files", headers=h.tenant_headers()).json()["data"] == []


@pytest.mark.parametrize("data", [b"", b"\n\n", b"\xff\xfe{}"])
def test_an_empty_or_undecodable_file_is_refused(h: Harness, data: bytes) -> None:
    response = _upload(h, data)
    assert response.status_code == 400 and _error(response)["param"] == "file"
    assert h.files.stored == {}


def test_only_the_fine_tune_purpose_is_accepted(h: Harness) -> None:
    response = _upload(h, _jsonl(EXAMPLE), purpose="assistants")
    assert response.status_code == 400 and _error(response)["param"] == "purpose"
    assert h.files.stored == {}


def test_a_file_over_the_size_cap_is_413_and_not_stored(h: Harness) -> None:
    h.state.settings.max_training_file_bytes = 1024
    response = _upload(h, _jsonl(*[EXAMPLE] * 20))
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"
    assert h.files.stored == {}


def test_a_file_body_far_over_the_cap_is_refused_before_it_is_read() -> None:
    """The request body limit of ``POST /v1/files`` follows the file cap (not the 4 MiB of other bodies)."""
    settings = Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), max_request_bytes=4096,
                        max_training_file_bytes=64 * 1024)
    made = Fakes(settings=settings)
    made.tenants.add("acme", key=TENANT_KEY)
    from fastapi.testclient import TestClient

    client = TestClient(create_app(settings, state=made.state), raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    fits = _jsonl(*[EXAMPLE] * 200)  # above the general body limit, below the file cap
    assert 4096 < len(fits) < 64 * 1024
    ok = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", fits)})
    assert ok.status_code == 200, ok.text
    huge = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                       files={"file": ("b.jsonl", b"x" * (256 * 1024))})
    assert huge.status_code == 413
    assert len(made.files.stored["acme"]) == 1


def test_the_files_a_tenant_may_hold_are_bounded(h: Harness) -> None:
    h.state.settings.max_files_per_tenant = 2
    _file_id(h)
    _file_id(h)
    response = _upload(h, _jsonl(EXAMPLE))
    assert response.status_code == 429
    assert (_error(response)["code"], "at most 2 files" in _error(response)["message"]) == ("quota_exceeded", True)
    assert len(h.files.stored["acme"]) == 2


def test_another_tenants_file_is_not_found(h: Harness) -> None:
    file_id = _file_id(h)
    other = h.tenant_headers(OTHER_KEY)
    for response in (h.client.get(f"/v1/files/{file_id}", headers=other),
                     h.client.get(f"/v1/files/{file_id}/content", headers=other),
                     h.client.delete(f"/v1/files/{file_id}", headers=other)):
        assert response.status_code == 404
        assert _error(response)["type"] == "not_found_error"
    assert h.client.get("/v1/files", headers=other).json()["data"] == []
    assert file_id in h.files.stored["acme"]
    job = _create(h, {"model": "banyan-demo", "suffix": "mine", "training_file": file_id}, key=OTHER_KEY)
    assert job.status_code == 404 and _error(job)["param"] == "training_file"


def test_the_routes_need_a_tenant_key(h: Harness) -> None:
    for key in ("", ADMIN_KEY):
        response = h.client.get("/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 401


# -- jobs --------------------------------------------------------------------------------------------


def test_a_job_from_the_base_model_is_queued_with_what_it_trains_on(h: Harness) -> None:
    file_id = _file_id(h)
    response = _create(h, {"model": "banyan-demo", "training_file": file_id, "suffix": "support", "seed": 7,
                           "hyperparameters": {"n_epochs": 2}, "banyan": {"rank": 8, "activate": "always"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("ftjob-") and body["object"] == "fine_tuning.job"
    assert (body["status"], body["model"], body["training_file"], body["seed"]) == ("queued", "banyan-demo",
                                                                                   file_id, 7)
    assert body["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert (body["fine_tuned_model"], body["finished_at"], body["error"]) == (None, None, None)
    assert body["banyan"] == {"adapter": "support", "version": None, "activated": None}
    assert body["organization_id"] == "acme" and body["result_files"] == []
    [job] = h.jobs.jobs
    assert (job.adapter, job.base_model, job.continue_from, job.rank, job.activate) == ("support", "banyan-demo",
                                                                                       None, 8, "always")
    # CharTokens: one token a character, plus the per-message overhead, times the epochs.
    per_example = sum(len(m["content"]) + service.MESSAGE_OVERHEAD_TOKENS for m in EXAMPLE["messages"])
    assert job.training_tokens == 2 * per_example * 2
    assert job.fence is not None and job.fence["equals"] == {"uid": h.tenants.tenants["acme"].uid}


def test_a_job_from_an_adapter_continues_its_active_version(h: Harness) -> None:
    h.registry.add("acme", "support", versions=(1, 2), active=2)
    response = _create(h, {"model": "support", "training_file": _file_id(h)})
    assert response.status_code == 200, response.text
    [job] = h.jobs.jobs
    assert job.adapter == "support"
    assert job.continue_from == {"name": "support", "version": 2, "uid": "uid000000002"}
    assert isinstance(job.seed, int)  # random, recorded


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"suffix": None}, 400, "suffix"),
    ({"suffix": "Not Valid"}, 400, "suffix"),
    ({"model": "no-such-adapter"}, 404, "model"),
    ({"model": "../etc"}, 404, "model"),
    ({"training_file": None}, 400, "training_file"),
    ({"training_file": "file-missing"}, 404, "training_file"),
    ({"validation_file": "file-missing"}, 404, "validation_file"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 2.5}}, 400, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, 400, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": "many"}}, 400, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, 400, "hyperparameters.warmup"),
    ({"seed": -1}, 400, "seed"),
    ({"banyan": {"activate": "sometimes"}}, 400, "banyan.activate"),
    ({"banyan": {"rank": 999}}, 400, "banyan.rank"),
    ({"banyan": {"rank": 0}}, 400, "banyan.rank"),
    ({"method": {"type": "dpo"}}, 400, "method.type"),
])
def test_a_bad_job_request_names_its_param_and_queues_nothing(h: Harness, change: dict[str, Any], status: int,
                                                              param: str) -> None:
    body = {"model": "banyan-demo", "suffix": "support", "training_file": _file_id(h), **change}
    response = _create(h, {k: v for k, v in body.items() if v is not None})
    assert response.status_code == status, response.text
    assert _error(response)["param"] == param
    assert h.jobs.jobs == []


def test_hyperparameters_may_come_in_openais_method(h: Harness) -> None:
    response = _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h), "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 0.5}}}})
    assert response.status_code == 200, response.text
    assert h.jobs.jobs[0].hyperparameters == {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}


def test_a_job_over_the_training_token_limit_is_refused(h: Harness) -> None:
    h.state.settings.max_training_tokens_per_job = 50  # the file holds 84
    response = _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h),
                           "hyperparameters": {"n_epochs": 1}})
    assert response.status_code == 400 and _error(response)["param"] == "training_file"
    assert "84 tokens" in _error(response)["message"] and "at most 50" in _error(response)["message"]
    assert h.jobs.jobs == []


def test_a_tenant_may_run_a_bounded_number_of_jobs_at_once(h: Harness) -> None:
    h.state.settings.max_active_fine_tuning_jobs = 1
    body = {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}
    first = _create(h, body)
    assert first.status_code == 200
    refused = _create(h, body)
    assert refused.status_code == 429
    error = _error(refused)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "At most 1 fine-tuning job may" in error["message"]
    assert _create(h, body, key=OTHER_KEY).status_code == 404  # another tenant's file; its own limit is apart
    h.client.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel", headers=h.tenant_headers())
    assert _create(h, body).status_code == 200


def test_jobs_are_listed_newest_first_in_pages(h: Harness) -> None:
    h.state.settings.max_active_fine_tuning_jobs = 10
    body = {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}
    ids = [_create(h, body).json()["id"] for _ in range(3)]
    first = h.client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=h.tenant_headers()).json()
    assert ([j["id"] for j in first["data"]], first["has_more"]) == ([ids[2], ids[1]], True)
    rest = h.client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}, headers=h.tenant_headers())
    assert ([j["id"] for j in rest.json()["data"]], rest.json()["has_more"]) == ([ids[0]], False)
    unknown = h.client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}, headers=h.tenant_headers())
    assert unknown.status_code == 400 and _error(unknown)["param"] == "after"
    too_many = h.client.get("/v1/fine_tuning/jobs", params={"limit": 101}, headers=h.tenant_headers())
    assert too_many.status_code == 400
    assert h.client.get("/v1/fine_tuning/jobs", headers=h.tenant_headers(OTHER_KEY)).json()["data"] == []


def test_cancel_stops_an_unfinished_job_and_leaves_a_finished_one(h: Harness) -> None:
    h.state.settings.max_active_fine_tuning_jobs = 10
    body = {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}
    queued, done = (_create(h, body).json()["id"] for _ in range(2))
    h.jobs.finish(done, status="succeeded", result={"adapter": "s", "version": 3, "activated": True})
    cancelled = h.client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=h.tenant_headers()).json()
    assert (cancelled["status"], cancelled["finished_at"] is not None) == ("cancelled", True)
    finished = h.client.post(f"/v1/fine_tuning/jobs/{done}/cancel", headers=h.tenant_headers()).json()
    assert finished["status"] == "succeeded"
    assert finished["fine_tuned_model"] == "s"
    assert finished["banyan"] == {"adapter": "s", "version": 3, "activated": True}


def test_another_tenants_job_is_not_found(h: Harness) -> None:
    job_id = _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}).json()["id"]
    other = h.tenant_headers(OTHER_KEY)
    for response in (h.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=other),
                     h.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=other),
                     h.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=other)):
        assert response.status_code == 404 and _error(response)["type"] == "not_found_error"
    assert h.jobs.jobs[0].status == "queued"


def test_events_come_newest_first_in_pages(h: Harness) -> None:
    job_id = _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}).json()["id"]
    h.jobs.add_event(job_id, "Job started")
    h.jobs.add_event(job_id, "Step 1/2: loss 2.1", type="metrics", data={"step": 1, "train_loss": 2.1})
    h.jobs.add_event(job_id, "Step 2/2: loss 1.4", type="metrics", data={"step": 2, "train_loss": 1.4})
    page = h.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2},
                        headers=h.tenant_headers()).json()
    assert page["has_more"] is True
    assert [e["data"] for e in page["data"]] == [{"step": 2, "train_loss": 1.4}, {"step": 1, "train_loss": 2.1}]
    assert {(e["object"], e["type"]) for e in page["data"]} == {("fine_tuning.job.event", "metrics")}
    rest = h.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": page["data"][-1]["id"]},
                        headers=h.tenant_headers()).json()
    assert ([e["message"] for e in rest["data"]], rest["has_more"]) == (["Job started"], False)


def test_a_failed_job_shows_its_error(h: Harness) -> None:
    job_id = _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)}).json()["id"]
    h.jobs.jobs[0].status = "failed"
    h.jobs.jobs[0].error = {"code": "invalid_adapter", "message": "rank too high", "param": None}
    body = h.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h.tenant_headers()).json()
    assert body["error"] == {"code": "invalid_adapter", "message": "rank too high", "param": None}
    assert body["fine_tuned_model"] is None


def test_deleting_a_tenant_removes_its_files_and_jobs(h: Harness) -> None:
    _create(h, {"model": "banyan-demo", "suffix": "s", "training_file": _file_id(h)})
    _file_id(h, key=OTHER_KEY)
    response = h.client.delete("/admin/tenants/acme", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    assert "acme" not in h.files.stored and h.jobs.jobs == []
    assert len(h.files.stored["globex"]) == 1


# -- a tenant's deletion racing a write (the service, on the fakes) -----------------------------------------


async def test_no_file_lands_for_a_tenant_whose_deletion_began(fakes: Fakes) -> None:
    await fakes.tenants.begin_delete("acme")
    with pytest.raises(AuthError):
        await service.upload_file(fakes.state, "acme", purpose="fine-tune", filename="t.jsonl",
                                  file=io.BytesIO(_jsonl(EXAMPLE)))
    assert fakes.files.stored == {}


async def test_no_job_is_queued_for_a_tenant_whose_deletion_began(fakes: Fakes) -> None:
    record = await fakes.files.add("acme", filename="t.jsonl", purpose="fine-tune", data=_jsonl(EXAMPLE),
                                   max_files=10, guard=live_guard("acme"))
    await fakes.tenants.begin_delete("acme")
    with pytest.raises(AuthError):
        await service.create_job(fakes.state, "acme", JobCreate(model="banyan-demo", suffix="s",
                                                                training_file=record.id))
    assert fakes.jobs.jobs == []


async def test_a_job_stored_as_the_deletion_began_is_removed(fakes: Fakes) -> None:
    """The deletion begins between the job's checks and its commit: the job does not stay behind."""
    record = await fakes.files.add("acme", filename="t.jsonl", purpose="fine-tune", data=_jsonl(EXAMPLE),
                                   max_files=10, guard=live_guard("acme"))
    create = fakes.jobs.create

    async def create_then_delete(job: Any, *, max_active: int) -> bool:
        stored = await create(job, max_active=max_active)
        await fakes.tenants.begin_delete("acme")
        return stored

    fakes.jobs.create = create_then_delete  # type: ignore[method-assign]
    with pytest.raises(AuthError):
        await service.create_job(fakes.state, "acme", JobCreate(model="banyan-demo", suffix="s",
                                                                training_file=record.id))
    assert fakes.jobs.jobs == []


# -- from documents ----------------------------------------------------------------------------------


async def _add_documents(fakes: Fakes) -> None:
    for text, collection in (("The depot is in Quarry Lane.", "ops"),
                             ("Standup is at 9:15 on weekdays.", "team")):
        await fakes.documents.add("acme", NewDocument(text=text, title="Note", timestamp="2025-01-01T00:00:00Z",
                                                      collection=collection))


async def test_a_from_documents_job_trains_on_a_file_made_from_the_documents(fakes: Fakes) -> None:
    await _add_documents(fakes)
    record = await fakes.files.add("acme", filename="t.jsonl", purpose="fine-tune", data=_jsonl(EXAMPLE),
                                   max_files=10, guard=live_guard("acme"))
    job = await service.create_job(fakes.state, "acme", JobCreate(
        model="banyan-demo", suffix="notes", training_file=record.id, seed=3,
        banyan={"from_documents": FromDocuments(collection="ops")}))  # type: ignore[arg-type]
    made = await fakes.files.get("acme", job.training_file or "")
    assert made is not None and made.filename == f"documents-ops-{job.id}.jsonl" and made.purpose == "fine-tune"
    content = await fakes.files.content("acme", made.id)
    assert content is not None
    lines = [json.loads(line) for line in content.decode().splitlines()]
    assert lines[0] == EXAMPLE  # the file's examples, then the documents'
    documents = " ".join(m["content"] for line in lines[1:] for m in line["messages"])
    assert "Quarry Lane" in documents and "9:15" not in documents  # only the asked collection
    [stored] = fakes.jobs.jobs
    assert stored.training_file == made.id and stored.from_documents == {"collection": "ops"}


async def test_a_from_documents_job_needs_no_file(fakes: Fakes) -> None:
    await _add_documents(fakes)
    job = await service.create_job(fakes.state, "acme", JobCreate(
        model="banyan-demo", suffix="notes", banyan={"from_documents": {}}))  # type: ignore[arg-type]
    made = await fakes.files.get("acme", job.training_file or "")
    assert made is not None and made.filename == f"documents-all-{job.id}.jsonl"


async def test_documents_with_nothing_to_learn_are_a_400_on_from_documents(fakes: Fakes) -> None:
    from gateway.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        await service.create_job(fakes.state, "acme", JobCreate(
            model="banyan-demo", suffix="notes", banyan={"from_documents": {}}))  # type: ignore[arg-type]
    assert caught.value.param == "banyan.from_documents"
    assert fakes.jobs.jobs == [] and fakes.files.stored == {}


async def test_the_made_file_is_removed_when_the_job_is_refused_by_the_limit(fakes: Fakes) -> None:
    await _add_documents(fakes)
    fakes.settings.max_active_fine_tuning_jobs = 1
    body = JobCreate(model="banyan-demo", suffix="notes", banyan={"from_documents": {}})  # type: ignore[arg-type]
    await service.create_job(fakes.state, "acme", body)
    from gateway.errors import RateLimited

    with pytest.raises(RateLimited):
        await service.create_job(fakes.state, "acme", body)
    assert len(fakes.files.stored["acme"]) == 1


# -- the job gauge -----------------------------------------------------------------------------------


async def test_the_job_gauge_follows_the_store_and_outlives_redis_errors(fakes: Fakes) -> None:
    record = await fakes.files.add("acme", filename="t.jsonl", purpose="fine-tune", data=_jsonl(EXAMPLE),
                                   max_files=10, guard=live_guard("acme"))
    await service.create_job(fakes.state, "acme", JobCreate(model="banyan-demo", suffix="s", training_file=record.id))
    fakes.jobs.unreachable_for = 2
    counter = asyncio.create_task(_count_jobs_forever(fakes.state, every_s=0))
    gauge = fakes.metrics.fine_tuning_jobs
    try:
        await asyncio.wait_for(fakes.jobs.counted.wait(), timeout=10)  # after two failed rounds
    finally:
        counter.cancel()
    assert fakes.jobs.unreachable_for == 0
    assert (gauge.labels("queued")._value.get(), gauge.labels("running")._value.get()) == (1, 0)


# -- the file store on a real Valkey -----------------------------------------------------------------


async def _live_tenant(redis: Redis, tenant: str) -> None:
    assert await TenantStore(redis).create(tenant, name=tenant, limits={}) is not None


async def test_the_file_store_keeps_bytes_and_metadata_together(redis: Redis) -> None:
    store = FakeStore()
    files = FileStore(redis, store)
    await _live_tenant(redis, "acme")
    first = await files.add("acme", filename="a.jsonl", purpose="fine-tune", data=b"one\n", max_files=5,
                            guard=live_guard("acme"))
    second = await files.add("acme", filename="b.jsonl", purpose="fine-tune", data=b"two\n", max_files=5,
                             guard=live_guard("acme"))
    assert store.objects[file_key("acme", first.id)] == b"one\n"
    assert await files.get("acme", first.id) == first
    assert await files.get("globex", first.id) is None
    assert [r.id for r in await files.list_files("acme")] == [second.id, first.id]  # newest first
    assert await files.content("acme", second.id) == b"two\n"
    assert await files.content("globex", second.id) is None
    assert await files.delete("acme", first.id) and not await files.delete("acme", first.id)
    assert file_key("acme", first.id) not in store.objects
    assert await files.delete_tenant("acme") == 1
    assert store.objects == {} and await files.list_files("acme") == []


async def test_the_file_store_refuses_over_the_cap_and_for_a_tenant_being_deleted(redis: Redis) -> None:
    store = FakeStore()
    files = FileStore(redis, store)
    await _live_tenant(redis, "acme")
    await files.add("acme", filename="a.jsonl", purpose="fine-tune", data=b"one\n", max_files=1,
                    guard=live_guard("acme"))
    with pytest.raises(TooManyFiles):
        await files.add("acme", filename="b.jsonl", purpose="fine-tune", data=b"two\n", max_files=1,
                        guard=live_guard("acme"))
    assert len(store.objects) == 1
    await TenantStore(redis).begin_delete("acme")
    with pytest.raises(FileRefused):
        await files.add("acme", filename="c.jsonl", purpose="fine-tune", data=b"three\n", max_files=5,
                        guard=live_guard("acme"))
    assert len(store.objects) == 1 and len(await files.list_files("acme")) == 1


async def test_concurrent_uploads_cannot_pass_the_cap_together(redis: Redis) -> None:
    store = FakeStore()
    files = FileStore(redis, store)
    await _live_tenant(redis, "acme")
    results = await asyncio.gather(*(files.add("acme", filename=f"{i}.jsonl", purpose="fine-tune", data=b"x\n",
                                               max_files=3, guard=live_guard("acme")) for i in range(8)),
                                   return_exceptions=True)
    assert sum(1 for r in results if isinstance(r, TooManyFiles)) == 5
    assert len(await files.list_files("acme")) == 3 and len(store.objects) == 3
