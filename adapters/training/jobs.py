"""Fine-tuning jobs in Redis: their records, their events and the queue the trainer workers share.

The gateway creates, lists and cancels jobs and reads their events (``/v1/fine_tuning/jobs``); the
``banyan trainer`` workers claim, run and finish them. Both go through :class:`JobStore`.

Keys (``<id>`` a job id, ``<t>`` a tenant):

- ``banyan:ft:job:<id>`` hash, one field per :class:`Job` attribute (JSON values; ``id``, ``tenant``,
  ``status`` and ``worker`` plain, so the scripts can compare them);
- ``banyan:ft:jobs:<t>`` sorted set of the tenant's job ids by creation time (listing, newest first);
- ``banyan:ft:active:<t>`` set of the tenant's unfinished jobs (the per-tenant limit);
- ``banyan:ft:events:<id>`` stream of the job's events, capped at about :data:`MAX_EVENTS`;
- ``banyan:ft:counts`` hash, how many jobs are in each status (a gauge, kept by the same scripts that move jobs);
- ``banyan:ft:queue:<base>`` stream with the consumer group ``trainers``: one entry per job to run on base model
  ``<base>`` (one queue per base model, so that a job is only ever taken by a worker that has that base).

**The queue.** A job is added to its base model's stream in the same script that stores it as ``queued``. A worker
reads new entries of the streams of the bases it trains with ``XREADGROUP`` (the entry is then pending for that
worker) and renews its lease while it trains (``XCLAIM ... JUSTID`` on its own pending entry resets the entry's
idle time). A worker that dies stops renewing:
once the entry has been idle longer than the lease, the next worker's :meth:`JobStore.claim` takes it over with
``XAUTOCLAIM`` and runs the job again from the start (``attempts`` counts the starts). The entry is acknowledged
and deleted when its job is done, whatever the outcome. No job is lost: it is in the stream until acknowledged.

**Ownership.** :meth:`JobStore.start` records the worker's name in the job; progress, the resolved settings and
the final status are written only while the job is ``running`` and still that worker's, so a worker that lost
its lease (it stalled, another took over) can no longer change the job. Cancelling moves a queued or running
job to ``cancelled`` at once; the worker sees it between steps and stops, and publishes nothing.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from adapters.registry import Fence

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
ACTIVATE_CHOICES = ("never", "if_better", "always")
EVENT_LEVELS = ("info", "warn", "error")
EVENT_TYPES = ("message", "metrics")

BASE_LEARNING_RATE = 1e-3
"""The learning rate of LoRA training at ``learning_rate_multiplier`` 1 (AdamW, rank 8-16, float32)."""
MAX_EVENTS = 1000
"""Events kept per job (the oldest are trimmed first)."""

QUEUE_PREFIX = "banyan:ft:queue:"
GROUP = "trainers"
_COUNTS = "banyan:ft:counts"
_PLAIN = frozenset({"id", "tenant", "status", "worker"})


def queue_key(base_model: str) -> str:
    """The queue of the jobs that train on ``base_model``."""
    return QUEUE_PREFIX + base_model


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def file_key(tenant: str, file_id: str) -> str:
    """The object-store key of one of a tenant's training files."""
    return f"{files_prefix(tenant)}{file_id}.jsonl"


def files_prefix(tenant: str) -> str:
    return f"files/{tenant}/"


def fence_to_dict(fence: Fence) -> dict[str, Any]:
    return {"key": fence.key, "equals": dict(fence.equals)}


def fence_from_dict(raw: Mapping[str, Any]) -> Fence:
    return Fence(key=str(raw["key"]), equals={str(k): str(v) for k, v in dict(raw.get("equals") or {}).items()})


# -- hyperparameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    def as_dict(self) -> dict[str, int | float]:
        return {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                "learning_rate_multiplier": self.learning_rate_multiplier}

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


def resolve_hyperparameters(asked: Mapping[str, int | float | str], *, examples: int) -> Hyperparameters:
    """The numbers a job trains with: what was asked, and for ``"auto"`` (or absent) a default for ``examples``.

    ``auto`` aims at a couple of hundred example passes: 3 epochs from 50 examples up, more for smaller sets (at
    most 10); batches of up to 4, about a tenth of the set, so that a small set still takes several steps an epoch.
    Measured on SmolLM2-135M (``loadtests/memory_bench.py``): 3 epochs bring a from-documents set of about 60
    examples to a loss near 0.01; batches of 8 grounded examples (about 250 tokens each, padded to the longest)
    took a CPU trainer to 7-8 GiB. The gateway (counting a job's training tokens) and the worker (training) both
    call this, so they agree."""
    count = max(1, examples)

    def pick(name: str, default: int | float) -> Any:
        value = asked.get(name, "auto")
        return default if value == "auto" or value is None else value

    return Hyperparameters(
        n_epochs=int(pick("n_epochs", 3 if count >= 50 else min(10, math.ceil(150 / count)))),
        batch_size=int(pick("batch_size", min(4, max(1, count // 10)))),
        learning_rate_multiplier=float(pick("learning_rate_multiplier", 1.0)))


def training_steps(hp: Hyperparameters, *, examples: int) -> int:
    """Optimizer steps of a job: every example once an epoch, in batches."""
    return math.ceil(max(1, examples) / hp.batch_size) * hp.n_epochs


# -- records -------------------------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    tenant: str
    model: str
    """As the client asked: the base model id, or one of the tenant's adapters."""
    base_model: str
    adapter: str
    """The adapter the result becomes a new version of (the request's ``suffix``)."""
    training_file: str | None
    validation_file: str | None
    hyperparameters: dict[str, int | float | str]
    """As asked (``"auto"`` allowed) until the worker records the numbers it trains with."""
    seed: int
    rank: int | None
    activate: str
    from_documents: dict[str, str | None] | None
    continue_from: dict[str, Any] | None
    """``{"name", "version", "uid"}``: the active version the job continues from, when ``model`` is an adapter."""
    training_tokens: int
    """The gateway's count when the job was made: tokens of the training examples x epochs."""
    created_at: int
    status: str = "queued"
    started_at: int | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    """``{"adapter", "version", "activated"}`` once succeeded."""
    worker: str | None = None
    attempts: int = 0
    fence: dict[str, Any] | None = None
    """The condition the result is committed under (:func:`fence_to_dict` of the tenant's fence): nothing lands
    for a tenant deleted (or deleted and created again) while the job ran."""

    def to_fields(self) -> dict[str, str]:
        return {f.name: _encode(f.name, getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Job:
        values = {_text(k): _text(v) for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        return cls(**{name: _decode(name, value) for name, value in values.items() if name in known})

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _encode(name: str, value: Any) -> str:
    if name in _PLAIN:
        return "" if value is None else str(value)
    return json.dumps(value)


def _decode(name: str, value: str) -> Any:
    if name == "worker":
        return value or None
    if name in _PLAIN:
        return value
    return json.loads(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class JobEvent:
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Claim:
    entry_id: str
    job_id: str
    consumer: str
    redelivered: bool
    """Taken over from a worker whose lease lapsed."""
    queue: str
    """The stream the entry is in (its job's base model's)."""


# -- scripts -------------------------------------------------------------------------------------------

# KEYS: job, tenant's jobs, tenant's active set, queue, counts. ARGV: max_active, score, id, then field/value pairs.
_CREATE = """
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], '*', 'job', ARGV[3])
redis.call('HINCRBY', KEYS[5], 'queued', 1)
return 1
"""

# KEYS: job, tenant's active set, counts. ARGV: tenant, now, id. The job's fields after; false if not the tenant's.
_CANCEL = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'queued' or s == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[3])
  redis.call('HINCRBY', KEYS[3], s, -1)
  redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job, counts. ARGV: worker, now. queued/running -> running for this worker; the fields, or false.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return false end
if s == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'attempts', attempts)
local started = redis.call('HGET', KEYS[1], 'started_at')
if not started or started == 'null' then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job. ARGV: worker, then field/value pairs. Only while running and owned.
_RECORD = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: job, tenant's active set, counts. ARGV: worker, status, now, id, then field/value pairs.
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], 'running', -1)
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""

# KEYS: job, events, tenant's jobs, tenant's active set, counts. ARGV: id.
_DELETE = """
local s = redis.call('HGET', KEYS[1], 'status')
if s then redis.call('HINCRBY', KEYS[5], s, -1) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return s and 1 or 0
"""

# KEYS: queue. ARGV: group, consumer, entry id. Reset the entry's idle time if this consumer still holds it.
_RENEW = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #pending == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


def _job_key(job_id: str) -> str:
    return f"banyan:ft:job:{job_id}"


def _events_key(job_id: str) -> str:
    return f"banyan:ft:events:{job_id}"


def _jobs_key(tenant: str) -> str:
    return f"banyan:ft:jobs:{tenant}"


def _active_key(tenant: str) -> str:
    return f"banyan:ft:active:{tenant}"


def _pairs(values: Mapping[str, str]) -> list[str]:
    return [x for item in values.items() for x in item]


class JobStore:
    """Jobs, their events and the queue (see the module docstring). A worker's Redis client needs a socket
    timeout above the ``block_s`` it claims with (``XREADGROUP`` blocks that long)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._create: Any = redis.register_script(_CREATE)
        self._cancel: Any = redis.register_script(_CANCEL)
        self._start: Any = redis.register_script(_START)
        self._record: Any = redis.register_script(_RECORD)
        self._finish: Any = redis.register_script(_FINISH)
        self._delete: Any = redis.register_script(_DELETE)
        self._renew: Any = redis.register_script(_RENEW)

    # -- the gateway's side --------------------------------------------------------------------------

    async def create(self, job: Job, *, max_active: int) -> bool:
        """Store ``job`` as ``queued`` and enqueue it, in one step; False (nothing stored) when the tenant
        already has ``max_active`` unfinished jobs."""
        score = time.time_ns() // 1_000_000
        done = await self._create(
            keys=[_job_key(job.id), _jobs_key(job.tenant), _active_key(job.tenant), queue_key(job.base_model), _COUNTS],
            args=[max_active, score, job.id, *_pairs(job.to_fields())])
        if int(done) < 0:
            raise ValueError(f"job {job.id} exists")
        return bool(int(done))

    async def get(self, tenant: str, job_id: str) -> Job | None:
        """The job, if it is ``tenant``'s."""
        job = await self._load(job_id)
        return job if job is not None and job.tenant == tenant else None

    async def list_jobs(self, tenant: str, *, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """A page of the tenant's jobs, newest first, and whether there are more; ``after`` is the last id of
        the previous page (``ValueError`` when it is not one of the tenant's jobs)."""
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(_jobs_key(tenant), after)
            if not isinstance(rank, int):
                raise ValueError("`after` is not the id of one of your fine-tuning jobs")
            start = rank + 1
        found: Any = await self._redis.zrevrange(_jobs_key(tenant), start, start + limit)
        ids = [_text(i) for i in found]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids[:limit]:
                pipe.hgetall(_job_key(job_id))
            raws = await pipe.execute()
        return [Job.from_fields(raw) for raw in raws if raw], len(ids) > limit

    async def cancel(self, tenant: str, job_id: str) -> Job | None:
        """Cancel a queued or running job at once (a finished one is returned as it is); None when it is not
        the tenant's. A worker running it stops at its next step and publishes nothing."""
        raw = await self._cancel(keys=[_job_key(job_id), _active_key(tenant), _COUNTS],
                                 args=[tenant, int(time.time()), job_id])
        return Job.from_fields(dict(zip(raw[::2], raw[1::2], strict=True))) if raw else None

    async def events(self, tenant: str, job_id: str, *, limit: int,
                     after: str | None) -> tuple[list[JobEvent], bool] | None:
        """A page of the job's events, newest first, and whether there are more; None when it is not the
        tenant's job. ``after`` is the id of the last event of the previous page."""
        if await self.get(tenant, job_id) is None:
            return None
        top = "+"
        if after is not None:
            if not after.startswith("ftevent-"):
                raise ValueError("`after` is not the id of an event of this job")
            top = "(" + after.removeprefix("ftevent-")
        try:
            entries: Any = await self._redis.xrevrange(_events_key(job_id), top, "-", count=limit + 1)
        except ResponseError as e:
            raise ValueError("`after` is not the id of an event of this job") from e
        return [_event(entry_id, values) for entry_id, values in entries[:limit]], len(entries) > limit

    async def delete_tenant(self, tenant: str) -> int:
        """Remove every job of the tenant with its events (a worker running one finds it gone and drops it)."""
        found: Any = await self._redis.zrange(_jobs_key(tenant), 0, -1)
        ids = [_text(i) for i in found]
        for job_id in ids:
            await self._delete(keys=[_job_key(job_id), _events_key(job_id), _jobs_key(tenant), _active_key(tenant),
                                     _COUNTS], args=[job_id])
        await self._redis.delete(_jobs_key(tenant), _active_key(tenant))
        return len(ids)

    async def counts_by_status(self) -> dict[str, int]:
        """How many jobs are in each status now."""
        raw = await self._redis.hgetall(_COUNTS)
        counts = {_text(k): int(v) for k, v in raw.items()}
        return {status: max(0, counts.get(status, 0)) for status in STATUSES}

    # -- the workers' side ---------------------------------------------------------------------------

    async def ensure_group(self, bases: Sequence[str]) -> None:
        """Create the consumer group of each base model's queue (reading it from its start) unless it exists."""
        for base in bases:
            try:
                await self._redis.xgroup_create(queue_key(base), GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def claim(self, consumer: str, *, bases: Sequence[str], lease_s: float, block_s: float) -> Claim | None:
        """The next entry of the queues of ``bases`` for ``consumer``: one whose worker's lease lapsed (idle longer
        than ``lease_s``), else a new one, waiting up to ``block_s`` for it; None when there is none."""
        for base in bases:
            taken = await self._take_over(queue_key(base), consumer, lease_s=lease_s)
            if taken is not None:
                return taken
        read: Any = await self._redis.xreadgroup(GROUP, consumer, {queue_key(b): ">" for b in bases}, count=1,
                                            block=max(1, int(block_s * 1000)))
        for stream, entries in read or []:
            for entry_id, values in entries:
                if values:
                    return _claim(entry_id, values, consumer, redelivered=False, queue=_text(stream))
        return None

    async def _take_over(self, queue: str, consumer: str, *, lease_s: float) -> Claim | None:
        cursor = "0-0"
        for _ in range(100):  # each round scans a bounded part of the pending list
            answer: Any = await self._redis.xautoclaim(queue, GROUP, consumer, int(lease_s * 1000),
                                                       start_id=cursor, count=1)
            cursor, entries = _text(answer[0]), answer[1]
            for entry_id, values in entries:
                if values:  # an entry deleted meanwhile has none
                    return _claim(entry_id, values, consumer, redelivered=True, queue=queue)
            if cursor == "0-0":
                break
        return None

    async def renew(self, claim: Claim) -> bool:
        """Reset the lease of a claimed entry; False when it is no longer this worker's."""
        return bool(await self._renew(keys=[claim.queue], args=[GROUP, claim.consumer, claim.entry_id]))

    async def ack(self, claim: Claim) -> None:
        """Done with the entry, whatever became of its job."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(claim.queue, GROUP, claim.entry_id)
            pipe.xdel(claim.queue, claim.entry_id)
            await pipe.execute()

    async def start(self, claim: Claim) -> Job | None:
        """Mark the claimed job running for this worker; None when it was cancelled, finished or deleted."""
        raw = await self._start(keys=[_job_key(claim.job_id), _COUNTS], args=[claim.consumer, int(time.time())])
        return Job.from_fields(dict(zip(raw[::2], raw[1::2], strict=True))) if raw else None

    async def status(self, job_id: str) -> str | None:
        value = await self._redis.hget(_job_key(job_id), "status")
        return _text(value) if value is not None else None

    async def record(self, job_id: str, worker: str, **values: Any) -> bool:
        """Set fields of a job this worker runs (``hyperparameters``, ``trained_tokens``); False when it is no
        longer running or no longer this worker's."""
        return bool(await self._record(keys=[_job_key(job_id)],
                                       args=[worker, *_pairs({k: _encode(k, v) for k, v in values.items()})]))

    async def finish(self, job_id: str, worker: str, *, status: str, result: dict[str, Any] | None = None,
                     error: dict[str, Any] | None = None, trained_tokens: int | None = None) -> bool:
        """Move a job this worker runs to a final status; False when it is no longer running or no longer this
        worker's (cancelled, deleted, or taken over)."""
        if status not in FINISHED:
            raise ValueError(f"not a final status: {status}")
        values = {"result": result, "error": error}
        if trained_tokens is not None:
            values["trained_tokens"] = trained_tokens  # type: ignore[assignment]
        job = await self._load(job_id)
        if job is None:
            return False
        done = await self._finish(
            keys=[_job_key(job_id), _active_key(job.tenant), _COUNTS],
            args=[worker, status, int(time.time()), job_id, *_pairs({k: _encode(k, v) for k, v in values.items()})])
        return bool(done)

    async def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                        data: dict[str, Any] | None = None) -> None:
        await self._redis.xadd(_events_key(job_id), {
            "created_at": str(int(time.time())), "level": level, "message": message, "type": type,
            "data": json.dumps(data)}, maxlen=MAX_EVENTS, approximate=True)

    async def _load(self, job_id: str) -> Job | None:
        raw = await self._redis.hgetall(_job_key(job_id))
        return Job.from_fields(raw) if raw else None


def _claim(entry_id: bytes | str, values: Mapping[Any, Any], consumer: str, *, redelivered: bool,
           queue: str) -> Claim:
    fields_ = {_text(k): _text(v) for k, v in values.items()}
    return Claim(entry_id=_text(entry_id), job_id=fields_["job"], consumer=consumer, redelivered=redelivered,
                 queue=queue)


def _event(entry_id: bytes | str, values: Mapping[Any, Any]) -> JobEvent:
    fields_ = {_text(k): _text(v) for k, v in values.items()}
    return JobEvent(id="ftevent-" + _text(entry_id), created_at=int(fields_.get("created_at", "0")),
                    level=fields_.get("level", "info"), message=fields_.get("message", ""),
                    type=fields_.get("type", "message"), data=json.loads(fields_.get("data", "null")))
