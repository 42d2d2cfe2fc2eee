"""Bulk imports of adapters: many (tenant, name, source) items run in the background with bounded concurrency,
their progress in Redis, resumed by any gateway that starts while one is unfinished.

Layout in Redis (``<id>`` is the import's id)::

    banyan:import:<id>            HASH  created, total, succeeded, failed, status, finished, credentials
    banyan:import:<id>:items      LIST  one JSON item per index (tenant, name, source, activate, base_model)
    banyan:import:<id>:results    HASH  index -> JSON result: status running|succeeded|failed, attempts,
                                        version and uid (of the version being stored), active, error
    banyan:import:<id>:failed     ZSET  the failed indices (to page through failures only)
    banyan:import:<id>:lease      STRING  the token of the gateway running it, with a TTL it renews
    banyan:imports:unfinished     SET   ids of imports not finished

Per-request credentials are never written here: the gateway that received the import keeps them in memory for as
long as its run lasts (``credentials`` says ``request``). An import whose gateway stopped cannot get them back: the
gateway that takes it over fails its remaining items (code ``credentials_unavailable``) and ends it ``interrupted``.

Nothing is imported twice. An item's result is final once written (the finishing script refuses a second one). A
version allocated for an item is noted in its result (``version``, ``uid``) before it is published, so a runner
that takes over an item found ``running`` first asks the registry whether that version landed; only if it did not
is the item run again (the files of the dead attempt are swept like any abandoned upload). One runner per import
at a time: the lease, renewed every third of its TTL; a runner that cannot renew it starts no new item. (An item
in flight when its runner stalled for longer than the lease could be run by both; the lease TTL bounds that.)
An item interrupted more than ``MAX_ATTEMPTS`` times (a gateway dying on it) fails instead of looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, cast

from redis.asyncio import Redis

from adapters.naming import AdapterRef
from adapters.store import SourceCredentials

log = logging.getLogger("banyan.imports")

MAX_ATTEMPTS = 3
_PAGE = 500
_PROGRESS_EVERY_S = 5.0
_UNFINISHED = "banyan:imports:unfinished"

ImportStatus = Literal["in_progress", "completed", "interrupted"]
ItemStatus = Literal["pending", "running", "succeeded", "failed"]


def _key(import_id: str, part: str = "") -> str:
    return f"banyan:import:{import_id}" + (f":{part}" if part else "")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class ImportItem:
    tenant: str
    name: str
    source: str
    activate: bool = True
    base_model: str | None = None


@dataclass(frozen=True, slots=True)
class ItemResult:
    status: ItemStatus = "pending"
    attempts: int = 0
    version: int | None = None
    uid: str | None = None
    active: bool = False
    error: dict[str, Any] | None = None
    """The OpenAI error object (``message``, ``type``, ``param``, ``code``) of a failed item."""

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> ItemResult:
        return cls(**json.loads(raw)) if raw else cls()

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class ImportRecord:
    id: str
    created: int
    total: int
    succeeded: int
    failed: int
    status: ImportStatus
    finished: int | None
    credentials: Literal["gateway", "request"]

    @property
    def pending(self) -> int:
        return self.total - self.succeeded - self.failed


@dataclass(frozen=True, slots=True)
class ItemPage:
    items: list[tuple[int, ImportItem, ItemResult]]
    has_more: bool


class ItemFailed(Exception):
    """An item that cannot be imported (its tenant, its source, its files): recorded as the item's error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


class LeaseLost(Exception):
    """Raised by the ``note`` an :class:`ImportWorker` calls when this gateway no longer runs the import: the worker
    lets it through and publishes nothing."""


@dataclass(frozen=True, slots=True)
class ItemDone:
    version: int
    active: bool


class ImportWorker(Protocol):
    """What importing one item takes (the admin service implements it on the gateway's state)."""

    async def run(self, item: ImportItem, *, credentials: SourceCredentials | None,
                  note: Callable[[AdapterRef], Awaitable[None]]) -> ItemDone:
        """Import ``item``; call ``note`` with the version's reference before publishing it (it raises
        :class:`LeaseLost`, to be let through). ItemFailed for anything else that stops the item."""
        ...

    async def landed(self, ref: AdapterRef) -> bool:
        """Whether the version an interrupted attempt noted was recorded (so the item is done)."""
        ...


# Start (or restart) an item while the lease is ours: -1 the lease is lost, 0 the item is final already,
# 1 go (the attempt is noted), 2 it failed now (too many attempts). KEYS: results, lease, meta, failed, unfinished.
_START = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local result = raw and cjson.decode(raw) or {attempts = 0}
if result['status'] == 'succeeded' or result['status'] == 'failed' then return 0 end
local attempts = (result['attempts'] or 0) + 1
if attempts > tonumber(ARGV[3]) then
  return 2
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({status = 'running', attempts = attempts, active = false}))
return 1
"""

# Note the version an attempt is about to publish (only while the lease is ours and the item is running).
_NOTE = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local result = cjson.decode(raw)
if result['status'] ~= 'running' then return 0 end
result['version'] = tonumber(ARGV[3])
result['uid'] = ARGV[4]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(result))
return 1
"""

# Write an item's final result once and count it; when every item is final, finish the import (status ARGV[4]) and
# let its records expire. Returns {written, succeeded, failed, total}. KEYS: results, meta, failed, unfinished,
# items, lease. ARGV: index, result JSON, 'succeeded'|'failed', final status, now, retention seconds, import id.
_FINISH = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local status = cjson.decode(raw)['status']
  if status == 'succeeded' or status == 'failed' then
    local m = redis.call('HMGET', KEYS[2], 'succeeded', 'failed', 'total')
    return {0, tonumber(m[1]), tonumber(m[2]), tonumber(m[3])}
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if ARGV[3] == 'failed' then redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ARGV[1]) end
local m = redis.call('HMGET', KEYS[2], 'succeeded', 'failed', 'total')
local succeeded, failed, total = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
if succeeded + failed >= total then
  redis.call('HSET', KEYS[2], 'status', ARGV[4], 'finished', ARGV[5])
  redis.call('SREM', KEYS[4], ARGV[7])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[6])) end
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[6]))
  redis.call('DEL', KEYS[6])
end
return {1, succeeded, failed, total}
"""

# Take the lease if nobody holds it, or renew it if we do.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Progress:
    succeeded: int
    failed: int
    total: int


class ImportStore:
    """The records of bulk imports in Redis (layout in the module docstring)."""

    def __init__(self, redis: Redis, *, retention_s: int) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._start: Any = redis.register_script(_START)
        self._note: Any = redis.register_script(_NOTE)
        self._finish: Any = redis.register_script(_FINISH)
        self._renew: Any = redis.register_script(_RENEW)
        self._release: Any = redis.register_script(_RELEASE)

    async def create(self, items: list[ImportItem], *, with_credentials: bool, owner: str,
                     lease_s: float) -> ImportRecord:
        """Record a new import, its lease already held by ``owner`` (no other gateway can pick it up first)."""
        import_id = "imp_" + secrets.token_hex(12)
        record = ImportRecord(id=import_id, created=int(time.time()), total=len(items), succeeded=0, failed=0,
                              status="in_progress", finished=None,
                              credentials="request" if with_credentials else "gateway")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_key(import_id, "lease"), owner, px=int(lease_s * 1000))
            for start in range(0, len(items), _PAGE):
                pipe.rpush(_key(import_id, "items"),
                           *(json.dumps(asdict(i), separators=(",", ":")) for i in items[start:start + _PAGE]))
            pipe.hset(_key(import_id), mapping={"created": record.created, "total": record.total, "succeeded": 0,
                                                "failed": 0, "status": record.status,
                                                "credentials": record.credentials})
            pipe.sadd(_UNFINISHED, import_id)
            await pipe.execute()
        return record

    async def get(self, import_id: str) -> ImportRecord | None:
        raw = {_text(k): _text(v) for k, v in (await self._redis.hgetall(_key(import_id))).items()}
        if not raw:
            return None
        return ImportRecord(id=import_id, created=int(raw["created"]), total=int(raw["total"]),
                            succeeded=int(raw["succeeded"]), failed=int(raw["failed"]),
                            status=cast(ImportStatus, raw["status"]),
                            finished=int(raw["finished"]) if raw.get("finished") else None,
                            credentials=cast(Literal["gateway", "request"], raw["credentials"]))

    async def page(self, import_id: str, *, after: int, limit: int, failed_only: bool = False) -> ItemPage:
        """Items with an index above ``after``, in index order, with their results."""
        if failed_only:
            found = await self._redis.zrangebyscore(_key(import_id, "failed"), f"({after}", "+inf", start=0,
                                                    num=limit + 1)
            indices = [int(_text(cast(bytes, i))) for i in found]
        else:
            total = int(await self._redis.hget(_key(import_id), "total") or 0)
            indices = list(range(after + 1, min(after + 2 + limit, total)))
        has_more = len(indices) > limit
        indices = indices[:limit]
        if not indices:
            return ItemPage(items=[], has_more=False)
        async with self._redis.pipeline(transaction=False) as pipe:
            for index in indices:
                pipe.lindex(_key(import_id, "items"), index)
            pipe.hmget(_key(import_id, "results"), [str(i) for i in indices])
            *raw_items, raw_results = await pipe.execute()
        items = [(index, ImportItem(**json.loads(raw)), ItemResult.from_json(result))
                 for index, raw, result in zip(indices, raw_items, raw_results, strict=True) if raw is not None]
        return ItemPage(items=items, has_more=has_more)

    async def unfinished(self) -> list[str]:
        return sorted(_text(m) for m in await self._redis.smembers(_UNFINISHED))

    async def hold(self, import_id: str, *, owner: str, lease_s: float) -> bool:
        """Take the import's lease if it is free, or renew it if ``owner`` holds it; False when another does."""
        return bool(await self._renew(keys=[_key(import_id, "lease")], args=[owner, int(lease_s * 1000)]))

    async def release(self, import_id: str, *, owner: str) -> None:
        await self._release(keys=[_key(import_id, "lease")], args=[owner])

    async def start_item(self, import_id: str, index: int, *, owner: str) -> int:
        """-1: the lease is lost; 0: the item is final; 1: go; 2: too many attempts (fail it)."""
        return int(await self._start(keys=[_key(import_id, "results"), _key(import_id, "lease")],
                                     args=[index, owner, MAX_ATTEMPTS]))

    async def note(self, import_id: str, index: int, ref: AdapterRef, *, owner: str) -> bool:
        return bool(await self._note(keys=[_key(import_id, "results"), _key(import_id, "lease")],
                                     args=[index, owner, ref.version, ref.uid]))

    async def finish_item(self, import_id: str, index: int, result: ItemResult, *,
                          final_status: ImportStatus = "completed") -> tuple[bool, Progress]:
        """Record a final result (once: False when the item had one already) and the import's progress."""
        assert result.final
        written, succeeded, failed, total = await self._finish(
            keys=[_key(import_id, "results"), _key(import_id), _key(import_id, "failed"), _UNFINISHED,
                  _key(import_id, "items"), _key(import_id, "lease")],
            args=[index, result.to_json(), result.status, final_status, int(time.time()), self._retention_s,
                  import_id])
        return bool(written), Progress(succeeded=int(succeeded), failed=int(failed), total=int(total))


def failure(message: str, *, code: str, type_: str = "invalid_request_error",
            param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": param, "code": code}


@dataclass
class ImportRunner:
    """Runs the imports of this gateway: those it received (with their credentials, in memory) and unfinished ones
    it takes over. ``concurrency`` bounds the items in flight across all of them."""

    store: ImportStore
    concurrency: int = 4
    lease_s: float = 30.0
    poll_s: float = 15.0
    owner: str = field(default_factory=lambda: secrets.token_hex(8))
    _slots: asyncio.Semaphore = field(init=False)
    _running: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)

    async def submit(self, items: list[ImportItem], worker: ImportWorker, *,
                     credentials: SourceCredentials | None) -> ImportRecord:
        record = await self.store.create(items, with_credentials=credentials is not None, owner=self.owner,
                                         lease_s=self.lease_s)
        log.info("import received", extra={"import_id": record.id, "total": record.total,
                                           "credentials": record.credentials})
        self._launch(record.id, worker, credentials)
        return record

    def _launch(self, import_id: str, worker: ImportWorker, credentials: SourceCredentials | None) -> None:
        task = asyncio.create_task(self._run(import_id, worker, credentials), name=f"import-{import_id}")
        self._running[import_id] = task
        task.add_done_callback(lambda _: self._running.pop(import_id, None))

    async def resume_forever(self, worker: ImportWorker) -> None:
        """Every ``poll_s``, take over the unfinished imports whose runner is gone (its lease expired)."""
        while True:
            try:
                await self.resume_once(worker)
            except Exception as e:  # the resumer must outlive a Redis outage
                log.warning("looking for unfinished imports failed: %s", type(e).__name__)
            await asyncio.sleep(self.poll_s)

    async def resume_once(self, worker: ImportWorker) -> list[str]:
        """Start every unfinished import nobody runs; the ids started."""
        started = []
        for import_id in await self.store.unfinished():
            if import_id not in self._running and await self.store.hold(import_id, owner=self.owner,
                                                                        lease_s=self.lease_s):
                log.info("import resumed", extra={"import_id": import_id})
                self._launch(import_id, worker, None)
                started.append(import_id)
        return started

    async def wait(self, import_id: str) -> None:
        """Until this gateway's run of the import ends (tests and shutdown)."""
        task = self._running.get(import_id)
        if task is not None:
            await asyncio.shield(task)

    async def aclose(self) -> None:
        """Stop running imports and give their leases back, so that another gateway resumes them at once."""
        tasks = list(self._running.items())
        for _, task in tasks:
            task.cancel()
        for import_id, task in tasks:
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await self.store.release(import_id, owner=self.owner)

    async def _run(self, import_id: str, worker: ImportWorker, credentials: SourceCredentials | None) -> None:
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(import_id, lost))
        try:
            record = await self.store.get(import_id)
            if record is None or record.status != "in_progress":
                return
            if record.credentials == "request" and credentials is None:
                await self._interrupt(import_id, record, worker)
                return
            await self._run_items(import_id, worker, credentials, lost=lost)
        except Exception:
            log.exception("import run failed; another gateway (or this one) resumes it", extra={"import_id": import_id})
        finally:
            keeper.cancel()
            if lost.is_set():
                log.warning("import lease lost; its remaining items are left to the gateway that took it",
                            extra={"import_id": import_id})

    async def _keep_lease(self, import_id: str, lost: asyncio.Event) -> None:
        while not lost.is_set():
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.store.hold(import_id, owner=self.owner, lease_s=self.lease_s):
                    lost.set()
            except Exception as e:  # Redis away: the lease may still hold; try again
                log.warning("renewing an import lease failed: %s", type(e).__name__)

    async def _run_items(self, import_id: str, worker: ImportWorker, credentials: SourceCredentials | None, *,
                         lost: asyncio.Event) -> None:
        reporter = _Reporter(import_id)
        after = -1
        async with asyncio.TaskGroup() as group:
            while not lost.is_set():
                page = await self.store.page(import_id, after=after, limit=_PAGE)
                for index, item, result in page.items:
                    after = index
                    if result.final:
                        continue
                    await self._slots.acquire()
                    if lost.is_set():
                        self._slots.release()
                        break
                    group.create_task(self._item(import_id, index, item, result, worker, credentials,
                                                 reporter=reporter, lost=lost))
                if not page.has_more:
                    break

    async def _item(self, import_id: str, index: int, item: ImportItem, previous: ItemResult,
                    worker: ImportWorker, credentials: SourceCredentials | None, *, reporter: _Reporter,
                    lost: asyncio.Event) -> None:
        try:
            if await self._landed_before(import_id, index, item, previous, worker, reporter=reporter):
                return
            started = await self.store.start_item(import_id, index, owner=self.owner)
            if started == -1:
                lost.set()
                return
            if started == 0:
                return
            if started == 2:
                error = failure(f"The import of this item was interrupted {MAX_ATTEMPTS} times; it is not tried "
                                "again.", code="import_interrupted", type_="server_error")
                await self._finish(import_id, index, ItemResult(status="failed", attempts=previous.attempts,
                                                                error=error), reporter=reporter)
                return
            attempts = previous.attempts + 1

            async def note(ref: AdapterRef) -> None:
                if not await self.store.note(import_id, index, ref, owner=self.owner):
                    raise LeaseLost(import_id)

            try:
                done = await worker.run(item, credentials=credentials, note=note)
            except LeaseLost:
                lost.set()
                return
            except ItemFailed as e:
                result = ItemResult(status="failed", attempts=attempts, error=e.error)
            else:
                result = ItemResult(status="succeeded", attempts=attempts, version=done.version, active=done.active)
            await self._finish(import_id, index, result, reporter=reporter)
        except Exception as e:
            log.warning("an import item could not be recorded: %s", type(e).__name__,
                        extra={"import_id": import_id, "index": index})
        finally:
            self._slots.release()

    async def _landed_before(self, import_id: str, index: int, item: ImportItem, previous: ItemResult,
                             worker: ImportWorker, *, reporter: _Reporter) -> bool:
        """An attempt interrupted after noting its version: done if that version was recorded."""
        if previous.status != "running" or previous.version is None or previous.uid is None:
            return False
        ref = AdapterRef(item.tenant, item.name, previous.version, previous.uid)
        if not await worker.landed(ref):
            return False
        await self._finish(import_id, index, ItemResult(status="succeeded", attempts=previous.attempts,
                                                        version=ref.version, uid=ref.uid, active=item.activate),
                           reporter=reporter)
        return True

    async def _finish(self, import_id: str, index: int, result: ItemResult, *, reporter: _Reporter,
                      final_status: ImportStatus = "completed") -> None:
        _, progress = await self.store.finish_item(import_id, index, result, final_status=final_status)
        reporter.report(progress)

    async def _interrupt(self, import_id: str, record: ImportRecord, worker: ImportWorker) -> None:
        """The import's credentials died with the gateway that received it: end every unfinished item."""
        log.warning("import used per-request credentials that are gone; ending its remaining items",
                    extra={"import_id": import_id, "pending": record.pending})
        reporter = _Reporter(import_id)
        after = -1
        while True:
            page = await self.store.page(import_id, after=after, limit=_PAGE)
            for index, item, result in page.items:
                after = index
                if result.final or await self._landed_before(import_id, index, item, result, worker,
                                                             reporter=reporter):
                    continue
                error = failure("This import used per-request credentials, which only the gateway that received it "
                                "keeps (in memory); that gateway stopped before this item was imported. Submit it "
                                "again.", code="credentials_unavailable")
                await self._finish(import_id, index, ItemResult(status="failed", attempts=result.attempts,
                                                                error=error),
                                   reporter=reporter, final_status="interrupted")
            if not page.has_more:
                return


@dataclass
class _Reporter:
    """Progress lines in the log: at most one every few seconds, and the last."""

    import_id: str
    _last: float = field(default=0.0, init=False)

    def report(self, progress: Progress) -> None:
        now = time.monotonic()
        done = progress.succeeded + progress.failed
        if done < progress.total and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        log.info("import finished" if done >= progress.total else "import progress",
                 extra={"import_id": self.import_id, "done": done, "total": progress.total,
                        "succeeded": progress.succeeded, "failed": progress.failed})
