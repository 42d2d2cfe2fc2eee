"""The trainer worker on a real (throwaway) Valkey, an in-memory object store and the tiny demo model: jobs run to
stored versions with their progress as events; cancel, a lost lease, ``if_better`` and a deleted tenant publish
nothing they should not."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from adapters.layout import ADAPTER_FILES, MANIFEST_FILE, object_key
from adapters.naming import AdapterRef
from adapters.registry import AdapterRegistry, Fence
from adapters.store import ObjectMissing
from adapters.training.jobs import (
    Job,
    JobEvent,
    JobStore,
    fence_to_dict,
    file_key,
    new_file_id,
    new_job_id,
    queue_key,
)
from adapters.training.lora import TrainingResult, TrainingStep, train_lora
from adapters.training.settings import TrainerSettings
from adapters.training.worker import Worker, holdout

TENANT = "acme"
DEFAULT_HP: dict[str, int | float | str] = {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 10.0}
TIMEOUT_S = 180  # the CPU is shared with other jobs: generous, never a gate


class MemoryStore:
    """The object store in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put_file(self, key: str, path: Path) -> None:
        self.objects[key] = path.read_bytes()  # noqa: ASYNC240 - a fake

    async def get_file(self, key: str, dest: Path) -> None:
        if key not in self.objects:
            raise ObjectMissing(key)
        dest.write_bytes(self.objects[key])  # noqa: ASYNC240 - a fake

    async def list_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    async def delete_prefix(self, prefix: str) -> int:
        gone = [k for k in self.objects if k.startswith(prefix)]
        for key in gone:
            del self.objects[key]
        return len(gone)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _examples(count: int = 10) -> list[dict[str, Any]]:
    questions = ["Hi", "Who are you?", "What time is it?", "Where is the ship?", "Any news?", "How are you?",
                 "What is that?", "Can you help?", "Where to?", "Why?", "Who goes there?", "What now?"]
    return [{"messages": [{"role": "user", "content": questions[i % len(questions)]},
                          {"role": "assistant", "content": "Arr, matey! The sea be calm."}]} for i in range(count)]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def settings(demo_base_path: Path) -> TrainerSettings:
    return TrainerSettings(base_model="banyan-demo", base_model_path=demo_base_path, trainer_lease_s=60,
                           trainer_block_s=0.2, trainer_default_rank=4, trainer_threads=1, trainer_name="worker-a")


def _put_file(store: MemoryStore, examples: list[dict[str, Any]], tenant: str = TENANT) -> str:
    file_id = new_file_id()
    store.objects[file_key(tenant, file_id)] = "\n".join(json.dumps(e) for e in examples).encode()
    return file_id


async def _submit(redis: Redis, store: MemoryStore, *, examples: list[dict[str, Any]] | None = None,
                  adapter: str = "pirate", activate: str = "always", fence: Fence | None = None,
                  **hyperparameters: int | float | str) -> Job:
    job = Job(id=new_job_id(), tenant=TENANT, model="banyan-demo", base_model="banyan-demo", adapter=adapter,
              training_file=_put_file(store, examples or _examples()), validation_file=None,
              hyperparameters={**DEFAULT_HP, **hyperparameters},
              seed=7, rank=None, activate=activate, from_documents=None, continue_from=None, training_tokens=0,
              created_at=int(time.time()), fence=fence_to_dict(fence) if fence else None)
    assert await JobStore(redis).create(job, max_active=10)
    return job


def _worker(settings: TrainerSettings, redis: Redis, store: MemoryStore, *, name: str = "worker-a",
            **kwargs: Any) -> Worker:
    return Worker(settings.model_copy(update={"trainer_name": name}), redis=redis, store=store, **kwargs)


async def _job(redis: Redis, job: Job) -> Job:
    found = await JobStore(redis).get(TENANT, job.id)
    assert found is not None
    return found


async def _events(redis: Redis, job: Job) -> list[JobEvent]:
    page = await JobStore(redis).events(TENANT, job.id, limit=1000, after=None)
    assert page is not None
    return list(reversed(page[0]))  # oldest first


async def _queue_is_empty(redis: Redis) -> bool:
    return int(await redis.xlen(queue_key("banyan-demo"))) == 0


def _sample(worker: Worker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


class Gate:
    """Holds the training thread after step ``at`` until opened: the test acts while a job is mid-training."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.reached = threading.Event()
        self.open = threading.Event()

    def train(self, *args: Any, progress: Callable[[TrainingStep], None], **kwargs: Any) -> TrainingResult:
        def hook(step: TrainingStep) -> None:
            if step.step == self.at:
                self.reached.set()
                assert self.open.wait(TIMEOUT_S)
            progress(step)

        return train_lora(*args, progress=hook, **kwargs)

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, TIMEOUT_S)


async def test_a_job_runs_to_a_stored_active_version_with_its_progress(settings: TrainerSettings, redis: Redis,
                                                                      store: MemoryStore) -> None:
    job = await _submit(redis, store)
    worker = _worker(settings, redis, store)
    assert await worker.run_once(block_s=1)

    done = await _job(redis, job)
    assert done.status == "succeeded", done.error
    assert done.result == {"adapter": "pirate", "version": 1, "activated": True}
    assert done.worker == "worker-a" and done.attempts == 1
    assert done.hyperparameters == {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 10.0}
    assert done.trained_tokens and done.trained_tokens > 10 * 4 * 20  # 10 examples x 4 epochs, ~45 tokens each

    events = await _events(redis, job)
    assert events[0].message == "Job started on worker worker-a (attempt 1)"
    steps = [e.data for e in events if e.type == "metrics"]
    assert [s["step"] for s in steps if s] == list(range(1, 21))  # ceil(10 / 2) x 4 epochs
    assert all(s and s["total_steps"] == 20 for s in steps)
    losses = [s["train_loss"] for s in steps if s]
    assert losses[-1] < losses[0] * 0.5, losses
    assert "stored (activated)" in events[-1].message

    record = await AdapterRegistry(redis).get(TENANT, "pirate")
    assert record is not None and record.active == 1
    meta = record.versions[1]
    assert meta.rank == 4 and meta.target_modules == sorted(worker.base_specs["banyan-demo"].modules)
    assert meta.base_model == "banyan-demo"  # bound to the base it was trained on
    ref = AdapterRef(TENANT, "pirate", 1, meta.uid)
    for name in (*ADAPTER_FILES, MANIFEST_FILE):
        assert object_key(ref, name) in store.objects
    assert await _queue_is_empty(redis)
    assert _sample(worker, "banyan_trainer_jobs_total", result="succeeded") == 1
    assert _sample(worker, "banyan_trainer_steps_total") == 20
    assert _sample(worker, "banyan_trainer_tokens_total") == done.trained_tokens
    assert _sample(worker, "banyan_trainer_busy") == 0


async def test_a_new_job_continues_from_the_adapter_it_names(settings: TrainerSettings, redis: Redis,
                                                            store: MemoryStore) -> None:
    worker = _worker(settings, redis, store)
    first = await _submit(redis, store)
    assert await worker.run_once(block_s=1)
    registry = AdapterRegistry(redis)
    v1 = await registry.active_meta(TENANT, "pirate")
    assert v1 is not None
    job = Job(id=new_job_id(), tenant=TENANT, model="pirate", base_model="banyan-demo", adapter="pirate",
              training_file=_put_file(store, _examples()), validation_file=None,
              hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}, seed=1, rank=8,
              activate="never", from_documents=None,
              continue_from={"name": "pirate", "version": 1, "uid": v1.uid}, training_tokens=0,
              created_at=int(time.time()))
    assert await JobStore(redis).create(job, max_active=10)
    assert await worker.run_once(block_s=1)

    done = await _job(redis, job)
    assert done.status == "succeeded", done.error
    assert done.result == {"adapter": "pirate", "version": 2, "activated": False}
    record = await registry.get(TENANT, "pirate")
    assert record is not None and record.active == 1 and record.versions[2].rank == v1.rank == 4  # kept its rank
    first_steps = [e.data["train_loss"] for e in await _events(redis, first) if e.type == "metrics" and e.data]
    steps = [e.data["train_loss"] for e in await _events(redis, job) if e.type == "metrics" and e.data]
    assert steps[0] < first_steps[0] * 0.5, (steps, first_steps)  # it starts from what v1 learned
    assert any("keeps its rank 4" in e.message for e in await _events(redis, job))


async def test_cancel_between_steps_stops_training_and_publishes_nothing(settings: TrainerSettings, redis: Redis,
                                                                       store: MemoryStore) -> None:
    job = await _submit(redis, store, n_epochs=10)  # 50 steps
    gate = Gate(at=1)
    worker = _worker(settings, redis, store, train=gate.train)
    running = asyncio.create_task(worker.run_once(block_s=1))
    await gate.wait_reached()
    cancelled = await JobStore(redis).cancel(TENANT, job.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    gate.open.set()
    assert await asyncio.wait_for(running, TIMEOUT_S)

    assert (await _job(redis, job)).status == "cancelled"
    events = await _events(redis, job)
    assert events[-1].message == "Job cancelled"
    steps = [e.data["step"] for e in events if e.type == "metrics" and e.data]
    assert steps and max(steps) < 50, steps
    assert not [k for k in store.objects if k.startswith("adapters/")]
    assert await AdapterRegistry(redis).get(TENANT, "pirate") is None
    assert await _queue_is_empty(redis)
    assert _sample(worker, "banyan_trainer_jobs_total", result="cancelled") == 1


async def test_a_worker_that_stops_renewing_loses_the_job_to_another_that_finishes_it(
        settings: TrainerSettings, redis: Redis, store: MemoryStore) -> None:
    short = settings.model_copy(update={"trainer_lease_s": 1.0})
    job = await _submit(redis, store)
    gate = Gate(at=1)
    stalled = _worker(short, redis, store, name="worker-a", train=gate.train, renew_every_s=3600)
    first = asyncio.create_task(stalled.run_once(block_s=1))
    await gate.wait_reached()  # worker-a is mid-job and renews no more

    other = _worker(short, redis, store, name="worker-b")
    deadline = time.monotonic() + TIMEOUT_S
    while not await other.run_once(block_s=0.2):  # nothing until worker-a's lease lapses
        assert time.monotonic() < deadline
    done = await _job(redis, job)
    assert done.status == "succeeded", done.error
    assert done.worker == "worker-b" and done.attempts == 2

    gate.open.set()  # worker-a wakes up: it must see the job is no longer its own
    assert await asyncio.wait_for(first, TIMEOUT_S)
    assert _sample(stalled, "banyan_trainer_jobs_total", result="lost") == 1
    record = await AdapterRegistry(redis).get(TENANT, "pirate")
    assert record is not None and list(record.versions) == [1] and record.active == 1
    assert len({k.split("/")[3] for k in store.objects if k.startswith("adapters/")}) == 1  # one version folder
    messages = [e.message for e in await _events(redis, job)]
    assert "Job started on worker worker-a (attempt 1)" in messages
    assert "Job started on worker worker-b (attempt 2)" in messages
    assert await _queue_is_empty(redis)


async def test_if_better_does_not_activate_a_worse_version(settings: TrainerSettings, redis: Redis,
                                                         store: MemoryStore) -> None:
    worker = _worker(settings, redis, store)
    await _submit(redis, store, n_epochs=10)
    assert await worker.run_once(block_s=1)
    job = await _submit(redis, store, activate="if_better", n_epochs=1, learning_rate_multiplier=0.01)
    assert await worker.run_once(block_s=1)

    done = await _job(redis, job)
    assert done.status == "succeeded", done.error
    assert done.result == {"adapter": "pirate", "version": 2, "activated": False}
    record = await AdapterRegistry(redis).get(TENANT, "pirate")
    assert record is not None and record.active == 1 and set(record.versions) == {1, 2}
    [verdict] = [e.message for e in await _events(redis, job) if e.message.startswith("Held-out loss")]
    assert "on 1 examples" in verdict and "active version 1" in verdict and "not activated" in verdict
    found = re.search(r"new version ([0-9.]+), active version 1 ([0-9.]+);", verdict)
    assert found is not None, verdict
    assert float(found[1]) > float(found[2])


async def test_if_better_activates_a_better_version_and_the_first_one(settings: TrainerSettings, redis: Redis,
                                                                     store: MemoryStore) -> None:
    worker = _worker(settings, redis, store)
    first = await _submit(redis, store, activate="if_better", n_epochs=1, learning_rate_multiplier=0.01)
    assert await worker.run_once(block_s=1)
    assert (await _job(redis, first)).result == {"adapter": "pirate", "version": 1, "activated": True}
    better = await _submit(redis, store, activate="if_better", n_epochs=10)
    assert await worker.run_once(block_s=1)
    assert (await _job(redis, better)).result == {"adapter": "pirate", "version": 2, "activated": True}
    assert (await AdapterRegistry(redis).get(TENANT, "pirate")).active == 2  # type: ignore[union-attr]


async def test_a_tenant_deleted_meanwhile_fails_the_job_and_stores_nothing(settings: TrainerSettings, redis: Redis,
                                                                         store: MemoryStore) -> None:
    fence = Fence(key="test:tenant:acme", equals={"id": "acme", "deleting": ""})
    await redis.hset(fence.key, "id", "acme")
    job = await _submit(redis, store, fence=fence)
    await redis.hset(fence.key, "deleting", "1")  # its deletion began after the job was made
    worker = _worker(settings, redis, store)
    assert await worker.run_once(block_s=1)

    done = await _job(redis, job)
    assert done.status == "failed"
    assert done.error == {"code": "tenant_deleted", "param": None,
                          "message": "The tenant was deleted while the job ran; nothing was stored."}
    assert not [k for k in store.objects if k.startswith("adapters/")]
    assert await AdapterRegistry(redis).get(TENANT, "pirate") is None
    assert not await AdapterRegistry(redis).abandoned(older_than_s=0)  # no upload left pending
    assert (await _events(redis, job))[-1].level == "error"
    assert await _queue_is_empty(redis)


async def test_a_bad_training_file_fails_with_its_line_number(settings: TrainerSettings, redis: Redis,
                                                            store: MemoryStore) -> None:
    job = await _submit(redis, store)
    store.objects[file_key(TENANT, job.training_file or "")] += b'\n{"messages": [{"role": "user", "content": "x"}]}'
    assert await _worker(settings, redis, store).run_once(block_s=1)
    done = await _job(redis, job)
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == "invalid_training_file"
    assert f"{job.training_file}:11: no assistant message" in done.error["message"]
    assert "Traceback" not in json.dumps(done.error)


async def test_a_job_whose_workers_were_lost_too_often_fails(settings: TrainerSettings, redis: Redis,
                                                           store: MemoryStore) -> None:
    job = await _submit(redis, store)
    jobs = JobStore(redis)
    await jobs.ensure_group(["banyan-demo"])
    # a worker that dies right after starting it
    claim = await jobs.claim("ghost", bases=["banyan-demo"], lease_s=0.5, block_s=1)
    assert claim is not None and await jobs.start(claim) is not None
    worker = _worker(settings.model_copy(update={"trainer_lease_s": 0.5, "trainer_max_attempts": 1}), redis, store)
    deadline = time.monotonic() + TIMEOUT_S
    while not await worker.run_once(block_s=0.2):
        assert time.monotonic() < deadline
    done = await _job(redis, job)
    assert done.status == "failed" and done.error is not None
    assert done.error["message"] == "The job's worker was lost 1 time; it is not started again."
    assert await _queue_is_empty(redis)


async def test_a_stop_request_leaves_the_job_in_progress_to_another_worker(settings: TrainerSettings, redis: Redis,
                                                                         store: MemoryStore) -> None:
    short = settings.model_copy(update={"trainer_lease_s": 1.0})
    job = await _submit(redis, store, n_epochs=10)
    gate = Gate(at=1)
    worker = _worker(short, redis, store, train=gate.train)
    running = asyncio.create_task(worker.run())
    await gate.wait_reached()
    worker.request_stop()  # what SIGTERM does
    gate.open.set()
    await asyncio.wait_for(running, TIMEOUT_S)
    assert (await _job(redis, job)).status == "running"
    assert _sample(worker, "banyan_trainer_jobs_total", result="abandoned") == 1
    assert "resumes on another worker" in (await _events(redis, job))[-1].message

    other = _worker(short, redis, store, name="worker-b")
    deadline = time.monotonic() + TIMEOUT_S
    while not await other.run_once(block_s=0.2):
        assert time.monotonic() < deadline
    assert (await _job(redis, job)).status == "succeeded"


def test_the_held_out_slice_is_a_tenth_at_least_one_and_the_same_for_a_seed() -> None:
    examples = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "a"}] for i in range(25)]
    train, held = holdout(examples, seed=3)
    assert len(held) == 2 and len(train) == 23 and not [e for e in held if e in train]
    assert holdout(examples, seed=3) == (train, held)
    assert holdout(examples, seed=4)[1] != held
    assert [len(h) for _, h in (holdout(examples[:n], seed=0) for n in (1, 2, 9))] == [1, 1, 1]
    assert holdout(examples[:1], seed=0) == (examples[:1], examples[:1])
