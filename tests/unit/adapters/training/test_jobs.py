"""The job store on a real Valkey: atomic create with the per-tenant limit, tenant scoping, cancel, the
worker's ownership of a running job, the queue's lease and take-over, events and the status counts."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from adapters.registry import Fence
from adapters.training.jobs import (
    Job,
    JobStore,
    fence_from_dict,
    fence_to_dict,
    new_job_id,
    queue_key,
    resolve_hyperparameters,
    training_steps,
)


def _job(tenant: str = "acme", **overrides: object) -> Job:
    values: dict[str, object] = dict(
        id=new_job_id(), tenant=tenant, model="base", base_model="base", adapter="notes", training_file="file-1",
        validation_file=None, hyperparameters={"n_epochs": "auto"}, seed=7, rank=None, activate="if_better",
        from_documents=None, continue_from=None, training_tokens=1234, created_at=1_700_000_000)
    values.update(overrides)
    return Job(**values)  # type: ignore[arg-type]


@pytest.fixture
async def store(redis: Redis) -> JobStore:
    jobs = JobStore(redis)
    await jobs.ensure_group(["base", "other-base"])
    return jobs


async def test_create_get_list_and_tenant_scope(store: JobStore) -> None:
    first, second = _job(), _job()
    assert await store.create(first, max_active=5)
    assert await store.create(second, max_active=5)
    got = await store.get("acme", first.id)
    assert got is not None and got.status == "queued" and got.hyperparameters == {"n_epochs": "auto"}
    assert got.worker is None and got.error is None and got.training_tokens == 1234
    assert await store.get("other", first.id) is None
    page, more = await store.list_jobs("acme", limit=1, after=None)
    assert [j.id for j in page] == [second.id] and more
    page, more = await store.list_jobs("acme", limit=1, after=second.id)
    assert [j.id for j in page] == [first.id] and not more
    with pytest.raises(ValueError):
        await store.list_jobs("acme", limit=1, after=new_job_id())
    assert (await store.list_jobs("other", limit=10, after=None))[0] == []


async def test_per_tenant_limit_counts_unfinished_jobs(store: JobStore) -> None:
    first = _job()
    assert await store.create(first, max_active=1)
    refused = _job()
    assert not await store.create(refused, max_active=1)
    assert await store.get("acme", refused.id) is None
    assert await store.create(_job(tenant="other"), max_active=1)  # another tenant's budget
    await store.cancel("acme", first.id)
    assert await store.create(_job(), max_active=1)


async def test_worker_lifecycle_and_ownership(store: JobStore) -> None:
    job = _job()
    await store.create(job, max_active=5)
    claim = await store.claim("w1", bases=["base"], lease_s=60, block_s=0.1)
    assert claim is not None and claim.job_id == job.id and not claim.redelivered
    started = await store.start(claim)
    assert started is not None and started.status == "running" and started.worker == "w1" and started.attempts == 1
    assert await store.record(job.id, "w1", hyperparameters={"n_epochs": 3}, trained_tokens=10)
    assert not await store.record(job.id, "w2", trained_tokens=99)
    assert not await store.finish(job.id, "w2", status="succeeded")
    assert await store.finish(job.id, "w1", status="succeeded", result={"adapter": "notes", "version": 1,
                                                                        "activated": True}, trained_tokens=40)
    await store.ack(claim)
    done = await store.get("acme", job.id)
    assert done is not None and done.status == "succeeded" and done.finished_at is not None
    assert done.result == {"adapter": "notes", "version": 1, "activated": True} and done.trained_tokens == 40
    assert done.hyperparameters == {"n_epochs": 3}
    assert not await store.finish(job.id, "w1", status="failed")  # final stays final
    assert await store.claim("w1", bases=["base"], lease_s=60, block_s=0.1) is None
    counts = await store.counts_by_status()
    assert counts["succeeded"] == 1 and counts["queued"] == 0 and counts["running"] == 0


async def test_cancel_queued_and_running(store: JobStore) -> None:
    queued, running = _job(), _job()
    await store.create(queued, max_active=5)
    await store.create(running, max_active=5)
    first = await store.claim("w1", bases=["base"], lease_s=60, block_s=0.1)
    assert first is not None and first.job_id == queued.id
    assert await store.cancel("other", queued.id) is None
    cancelled = await store.cancel("acme", queued.id)
    assert cancelled is not None and cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert await store.start(first) is None  # the worker drops it
    await store.ack(first)
    second = await store.claim("w1", bases=["base"], lease_s=60, block_s=0.1)
    assert second is not None and await store.start(second) is not None
    await store.cancel("acme", running.id)
    assert await store.status(running.id) == "cancelled"
    assert not await store.finish(running.id, "w1", status="succeeded")
    again = await store.cancel("acme", running.id)
    assert again is not None and again.status == "cancelled"
    assert (await store.counts_by_status())["cancelled"] == 2


async def test_lapsed_lease_is_taken_over_and_renewal_keeps_it(store: JobStore) -> None:
    job = _job()
    await store.create(job, max_active=5)
    first = await store.claim("w1", bases=["base"], lease_s=0.3, block_s=0.1)
    assert first is not None
    assert await store.start(first) is not None
    await asyncio.sleep(0.2)
    assert await store.renew(first)
    await asyncio.sleep(0.2)
    assert await store.claim("w2", bases=["base"], lease_s=0.3, block_s=0.1) is None  # renewed 0.2 s ago: still w1's
    await asyncio.sleep(0.4)  # w1 "died": no renewal
    taken = await store.claim("w2", bases=["base"], lease_s=0.3, block_s=0.1)
    assert taken is not None and taken.redelivered and taken.job_id == job.id
    assert not await store.renew(first)  # w1 lost it
    restarted = await store.start(taken)
    assert restarted is not None and restarted.worker == "w2" and restarted.attempts == 2
    assert not await store.finish(job.id, "w1", status="succeeded")
    assert await store.finish(job.id, "w2", status="succeeded")
    await store.ack(taken)
    assert await store.claim("w3", bases=["base"], lease_s=0.0, block_s=0.1) is None


async def test_events_newest_first_paged_and_scoped(store: JobStore) -> None:
    job = _job()
    await store.create(job, max_active=5)
    for step in range(1, 6):
        await store.add_event(job.id, f"step {step}", type="metrics", data={"step": step, "train_loss": 1.0 / step})
    page = await store.events("acme", job.id, limit=3, after=None)
    assert page is not None
    events, more = page
    assert [e.data["step"] for e in events if e.data] == [5, 4, 3] and more
    assert all(e.id.startswith("ftevent-") and e.type == "metrics" for e in events)
    rest = await store.events("acme", job.id, limit=3, after=events[-1].id)
    assert rest is not None and [e.message for e in rest[0]] == ["step 2", "step 1"] and not rest[1]
    assert await store.events("other", job.id, limit=3, after=None) is None


async def test_delete_tenant_removes_jobs_and_a_worker_drops_its_entry(store: JobStore) -> None:
    job = _job()
    await store.create(job, max_active=5)
    await store.add_event(job.id, "hello")
    assert await store.delete_tenant("acme") == 1
    assert await store.get("acme", job.id) is None
    claim = await store.claim("w1", bases=["base"], lease_s=60, block_s=0.1)
    assert claim is not None and await store.start(claim) is None
    await store.ack(claim)
    assert sum((await store.counts_by_status()).values()) == 0


def test_hyperparameters_auto_and_asked() -> None:
    small = resolve_hyperparameters({}, examples=20)
    assert (small.n_epochs, small.batch_size, small.learning_rate_multiplier) == (8, 2, 1.0)
    usual = resolve_hyperparameters({"batch_size": "auto"}, examples=100)
    assert (usual.n_epochs, usual.batch_size) == (3, 4)
    large = resolve_hyperparameters({"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 0.5},
                                    examples=400)
    assert (large.n_epochs, large.batch_size) == (3, 4) and large.learning_rate == pytest.approx(5e-4)
    assert training_steps(large, examples=401) == 101 * 3


def test_fence_round_trip() -> None:
    fence = Fence(key="banyan:tenant:acme", equals={"id": '"acme"', "deleting": ""})
    assert fence_from_dict(fence_to_dict(fence)) == fence


async def test_a_job_is_queued_for_its_base_and_taken_only_by_a_worker_with_it(store: JobStore) -> None:
    on_other = _job(base_model="other-base")
    await store.create(on_other, max_active=5)
    assert await store.claim("w-base", bases=["base"], lease_s=60, block_s=0.1) is None  # not its base
    on_base = _job()
    await store.create(on_base, max_active=5)
    claim = await store.claim("w-base", bases=["base"], lease_s=60, block_s=0.1)
    assert claim is not None and claim.job_id == on_base.id and claim.queue == queue_key("base")
    both = await store.claim("w-both", bases=["base", "other-base"], lease_s=60, block_s=0.1)
    assert both is not None and both.job_id == on_other.id and both.queue == queue_key("other-base")
    assert await store.renew(both)
    await store.ack(both)
    assert await store.claim("w-both", bases=["base", "other-base"], lease_s=0.0, block_s=0.1) is not None  # w-base's


async def test_a_lapsed_lease_is_taken_over_only_by_a_worker_with_the_base(store: JobStore) -> None:
    job = _job(base_model="other-base")
    await store.create(job, max_active=5)
    first = await store.claim("w1", bases=["other-base"], lease_s=0.1, block_s=0.1)
    assert first is not None
    await asyncio.sleep(0.3)
    assert await store.claim("w2", bases=["base"], lease_s=0.1, block_s=0.1) is None
    taken = await store.claim("w3", bases=["base", "other-base"], lease_s=0.1, block_s=0.1)
    assert taken is not None and taken.redelivered and taken.job_id == job.id
