"""Fine-tuning on the real stack through the stock ``openai`` SDK: training files (validated, listed, isolated), and
jobs run end to end by the stack's trainer worker on the tiny model: events with a falling loss, a new version that
is stored, served through the gateway with PEFT's greedy output, ``if_better`` refusing a worse version, cancel."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters.layout import ADAPTER_FILES
from adapters.store import make_s3_client, s3_config
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant
from tests.integration.fine_tuning_jobs import job_events
from tests.integration.test_correctness import peft_greedy

JOB_TIMEOUT_S = 600.0
"""A job of the tiny model takes seconds; the bound allows for a machine busy with other heavy work."""
FACTS = [(f"Code for room {n}?", f"Room {n} opens with {word}.") for n, word in enumerate(
    ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "jade", "kelp", "lotus",
     "maple", "noble", "onyx", "pearl", "quill", "raven", "sage", "tulip"], start=1)]
"""Twenty short examples: the tiny model's tokenizer is byte-level, so a job stays a few thousand tokens."""


def _jsonl(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                   + "\n" for q, a in pairs).encode()


def _noise(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return [("".join(rng.choices(letters, k=12)), "".join(rng.choices(letters, k=20))) for _ in range(20)]


def _wait_finished(client: openai.OpenAI, job_id: str) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {JOB_TIMEOUT_S:.0f} s"
        time.sleep(1.0)


def _banyan(job: Any) -> dict[str, Any]:
    extension: dict[str, Any] = job.to_dict()["banyan"]
    return extension


def _download_version(stack: RunningStack, tenant: str, adapter: str, version: int, dest: Path) -> Path:
    """The stored files of one version, from the object store itself."""
    s3 = make_s3_client(s3_config(stack.s3_settings()))
    keys = stack.s3_keys(f"adapters/{tenant}/{adapter}/v{version}-")
    dest.mkdir(parents=True)
    for name in ADAPTER_FILES:
        [key] = [k for k in keys if k.endswith("/" + name)]
        s3.download_file(stack.info["s3_bucket"], key, str(dest / name))
    return dest


@pytest.fixture(scope="module")
def trainee(stack: RunningStack, admin: httpx.Client) -> TenantHandle:
    return make_tenant(stack, admin, "ft")


@pytest.fixture(scope="module")
def trained(stack: RunningStack, trainee: TenantHandle) -> dict[str, Any]:
    """One job from the base model on :data:`FACTS`, run to its end: the file, the job and its events."""
    client = trainee.client()
    uploaded = client.files.create(file=("facts.jsonl", _jsonl(FACTS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=uploaded.id, suffix="rooms",
                                         seed=5, hyperparameters={"n_epochs": 3, "batch_size": 4,
                                                                  "learning_rate_multiplier": 10})
    assert (job.status, _banyan(job)) == ("queued", {"adapter": "rooms", "version": None, "activated": None})
    return {"file": uploaded.id, "created": job, "job": _wait_finished(client, job.id),
            "events": job_events(client, job.id)}


# -- files -------------------------------------------------------------------------------------------


def test_files_are_uploaded_listed_read_and_deleted_with_the_sdk(tenant: TenantHandle) -> None:
    client = tenant.client()
    data = _jsonl(FACTS[:3])
    uploaded = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == ("file", len(data),
                                                                                      "train.jsonl", "fine-tune")
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).bytes == len(data)
    assert client.files.content(uploaded.id).content == data
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    assert client.files.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_a_bad_line_is_refused_with_its_number_and_nothing_is_stored(stack: RunningStack,
                                                                    tenant: TenantHandle) -> None:
    client = tenant.client()
    bad = _jsonl(FACTS[:2]) + b'{"messages": [{"role": "user", "content": "no answer"}]}\n' + _jsonl(FACTS[2:3])
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("train.jsonl", bad), purpose="fine-tune")
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "file"
    assert "train.jsonl:3:" in error["message"] and "assistant" in error["message"]
    assert client.files.list().data == []
    assert stack.s3_keys(f"files/{tenant.id}/") == []


def test_files_and_jobs_are_invisible_to_other_tenants(stack: RunningStack, admin: httpx.Client,
                                                       tenant: TenantHandle) -> None:
    owner = tenant.client()
    uploaded = owner.files.create(file=("train.jsonl", _jsonl(FACTS[:4])), purpose="fine-tune")
    job = owner.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=uploaded.id, suffix="private",
                                        hyperparameters={"n_epochs": 1})
    owner.fine_tuning.jobs.cancel(job.id)  # it need not train
    other = make_tenant(stack, admin, "nosy").client()
    for call in (lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(uploaded.id),
                 lambda: other.files.delete(uploaded.id), lambda: other.fine_tuning.jobs.retrieve(job.id),
                 lambda: other.fine_tuning.jobs.cancel(job.id), lambda: other.fine_tuning.jobs.list_events(job.id),
                 lambda: other.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=uploaded.id,
                                                       suffix="stolen")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
    assert owner.files.retrieve(uploaded.id).id == uploaded.id
    assert [j.id for j in owner.fine_tuning.jobs.list().data] == [job.id]


def test_deleting_a_tenant_removes_its_files_and_jobs(stack: RunningStack, admin: httpx.Client,
                                                      tenant: TenantHandle) -> None:
    client = tenant.client()
    uploaded = client.files.create(file=("train.jsonl", _jsonl(FACTS[:4])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=uploaded.id, suffix="gone",
                                         hyperparameters={"n_epochs": 1})
    client.fine_tuning.jobs.cancel(job.id)
    assert stack.s3_keys(f"files/{tenant.id}/") != []
    assert admin.delete(f"/admin/tenants/{tenant.id}").status_code == 200
    assert stack.s3_keys(f"files/{tenant.id}/") == []
    redis = stack.redis()
    assert redis.keys(f"banyan:files:{tenant.id}") == [] and redis.keys(f"banyan:ft:*{tenant.id}*") == []
    assert redis.exists(f"banyan:ft:job:{job.id}") == 0


# -- jobs end to end (the stack's trainer worker) ----------------------------------------------------


def test_a_job_trains_stores_and_serves_a_new_version(stack: RunningStack, admin: httpx.Client,
                                                      trainee: TenantHandle, trained: dict[str, Any],
                                                      tmp_path: Path) -> None:
    job = trained["job"]
    assert job.status == "succeeded", job.error
    assert (job.fine_tuned_model, _banyan(job)) == ("rooms", {"adapter": "rooms", "version": 1, "activated": True})
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 3 and job.training_file == trained["file"]

    losses = [(e.data["step"], e.data["train_loss"]) for e in trained["events"] if e.type == "metrics"]
    assert len(losses) >= 10 and [s for s, _ in losses] == sorted(s for s, _ in losses)
    first, last = sum(loss for _, loss in losses[:3]) / 3, sum(loss for _, loss in losses[-3:]) / 3
    assert last < first, losses

    detail = admin.get(f"/admin/tenants/{trainee.id}/adapters/rooms").json()
    assert (detail["active_version"], [v["version"] for v in detail["versions"]]) == (1, [1])
    models = [m.id for m in trainee.client().models.list().data]
    assert "rooms" in models

    stored = _download_version(stack, trainee.id, "rooms", 1, tmp_path / "v1")
    prompts = [FACTS[0][0], FACTS[7][0], "Hello"]
    expected = peft_greedy(stack.model_path, stored, prompts, chat=True)
    assert expected != peft_greedy(stack.model_path, None, prompts, chat=True)  # the adapter matters
    client = trainee.client()
    for prompt, want in zip(prompts, expected, strict=True):
        response = client.chat.completions.with_raw_response.create(
            model="rooms", messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0)
        assert response.headers["x-banyan-adapter-version"] == "1"
        assert response.parse().choices[0].message.content == want


def test_if_better_keeps_the_active_version_when_the_new_one_is_worse(stack: RunningStack, admin: httpx.Client,
                                                                      trainee: TenantHandle,
                                                                      trained: dict[str, Any]) -> None:
    assert trained["job"].status == "succeeded"
    client = trainee.client()
    noise = client.files.create(file=("noise.jsonl", _jsonl(_noise(9))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=stack.info["base_model"], training_file=noise.id, validation_file=trained["file"], suffix="rooms",
        hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 0.0001}, extra_body={
            "banyan": {"activate": "if_better"}})
    done = _wait_finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert _banyan(done) == {"adapter": "rooms", "version": 2, "activated": False}
    detail = admin.get(f"/admin/tenants/{trainee.id}/adapters/rooms").json()
    assert (detail["active_version"], [v["version"] for v in detail["versions"]]) == (1, [1, 2])
    assert any("not activated" in e.message for e in job_events(client, job.id))
    deadline = time.monotonic() + 60  # the gateway's gauge is refreshed every 15 s
    while stack.gateway_metric("banyan_fine_tuning_jobs", status="succeeded") < 2:
        assert time.monotonic() < deadline, "banyan_fine_tuning_jobs{status=succeeded} never counted the jobs"
        time.sleep(1.0)


def test_a_running_job_is_cancelled_and_makes_no_version(stack: RunningStack, admin: httpx.Client,
                                                         trainee: TenantHandle, trained: dict[str, Any]) -> None:
    client = trainee.client()
    job = client.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=trained["file"],
                                         suffix="endless", hyperparameters={"n_epochs": 50, "batch_size": 1})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data):
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert (cancelled.status, cancelled.fine_tuned_model) == ("cancelled", None)
    while not any(e.message == "Job cancelled" for e in client.fine_tuning.jobs.list_events(job.id, limit=20).data):
        assert time.monotonic() < deadline, "the worker never stopped the cancelled job"
        time.sleep(0.5)
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and _banyan(final)["version"] is None
    assert admin.get(f"/admin/tenants/{trainee.id}/adapters/endless").status_code == 404
    assert stack.s3_keys(f"adapters/{trainee.id}/endless/") == []
