"""Per-tenant limits and token budgets, enforced in Redis so every gateway replica shares them.

A tenant may have ``rpm`` (requests per minute), ``tpm`` (prompt + completion tokens per minute),
``max_concurrency`` (requests in flight), ``daily_token_budget`` and ``monthly_token_budget``. One Lua script
checks them all and, only when all pass, counts the request, reserves its tokens and takes a concurrency lease,
atomically in one round trip: a refused attempt changes nothing. The same round trip returns what the
``x-ratelimit-*`` headers say (:meth:`Admission.headers`, and the headers of a 429).

- **Sliding windows.** ``rpm`` and ``tpm`` count what happened in the last minute, not in the clock's minute (a
  fixed window lets twice the limit through across a minute boundary). Each window is a HASH of one-second
  buckets (``<unix second>`` -> requests or tokens); a bucket counts while ``now < second + 61``, so whatever
  it holds is counted for at least 60 s (between 60 and 61), and no 60 s span ever holds more than the limit.
  Stale buckets are dropped as the window is read: at most 61 fields per window, whatever the traffic.
- ``tpm``: a request reserves its worst case (``reserve_tokens``, see :mod:`gateway.openai_api.limits`) in the
  bucket of its admission, and is let in only if the window has room for it; a request that could never fit
  (its worst case alone is over ``tpm``) is refused outright. When it is released, the reservation is taken back
  out of its bucket (unless that bucket has left the window already) and the tokens it really used
  (:meth:`Admission.spend`) go into the bucket of the release; so the window holds what was used plus what
  requests in flight may still use, exactly. Counting a prompt's tokens costs the gateway more CPU than anything
  else a short request needs (36-69 us on this project's machine), so a tenant seen without a ``tpm`` has its
  requests admitted uncounted (``reserve_tokens=None``); should it have a ``tpm`` by then, the script changes
  nothing and says so (:class:`CountNeeded`), and the request is counted and asked again.
- ``max_concurrency``: per-request leases, a sorted set of request ids scored by their expiry. Admission
  drops expired leases, counts the rest and adds its own; release removes its own (a release after its
  lease expired removes nothing). The replica holding a lease renews it every third of its lifetime
  (``lease_s``); a replica that died mid-request stops renewing and its leases fall out by themselves.
  Nothing is a counter that can go negative, and a refused attempt renews nothing.
- **Budgets** are per calendar day and month in UTC: ``banyan:budget:<tenant>:daily:<YYYYMMDD>`` and
  ``...:monthly:<YYYYMM>`` count the tokens spent (prompt + completion, added when a request is released with its
  usage, whether or not the tenant has a budget, so a budget set mid-month counts what was spent already) and
  expire a day after their period. Admission refuses (429 ``quota_exceeded``) once a period's count has reached
  its budget; requests admitted before that may end over it (the check is on what is spent, not reserved).
  Raising the budget (PATCH) lets requests in again at once: the script reads the budget from the tenant's record.

Headers, as OpenAI sends them, for the limits the tenant has: ``x-ratelimit-limit-requests``,
``-remaining-requests`` (after this request) and ``-reset-requests`` (how long until the window is back to its
initial state: the newest bucket leaves it), and the same for ``-tokens`` (remaining after the reservation).
Durations are written the way OpenAI writes them (:func:`format_duration`: ``20ms``, ``1.5s``, ``1m0.5s``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.redis_batch import ScriptBatcher, once_id

log = logging.getLogger("banyan.quotas")

WINDOW_S = 60
SPAN_S = WINDOW_S + 1
"""A one-second bucket counts while ``now < second + SPAN_S``: each entry for at least :data:`WINDOW_S`."""
_PERIOD_GRACE_S = 86_400
"""How long a budget counter outlives its period."""

_WINDOW_LUA = f"""
local SPAN = {SPAN_S}
local function window(key, now)
  local raw = redis.call('HGETALL', key)
  local total, newest, live, stale = 0, nil, {{}}, {{}}
  for i = 1, #raw, 2 do
    local s, n = tonumber(raw[i]), tonumber(raw[i + 1])
    if s + SPAN <= now then stale[#stale + 1] = raw[i]
    else
      total = total + n
      live[#live + 1] = {{s, n}}
      if newest == nil or s > newest then newest = s end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return total, live, newest
end
local function wait_ms(live, need, now)
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, b in ipairs(live) do
    freed = freed + b[2]
    if freed >= need then return math.ceil((b[1] + SPAN - now) * 1000) end
  end
  return 0
end
local function reset_ms(newest, now)
  if newest == nil then return 0 end
  return math.ceil((newest + SPAN - now) * 1000)
end
"""

_ADMIT = _WINDOW_LUA + f"""
local function limit(field)
  local raw = redis.call('HGET', KEYS[1], field)
  if raw == false or raw == 'null' then return nil end
  return tonumber(raw)
end
local now, reserve = tonumber(ARGV[1]), tonumber(ARGV[3])
local sec = math.floor(now)
local rpm, tpm, conc = limit('rpm'), limit('tpm'), limit('max_concurrency')
local daily, monthly = nil, nil
if ARGV[5] == '1' then daily, monthly = limit('daily_token_budget'), limit('monthly_token_budget') end
local requests, r_live, r_newest, tokens, t_live, t_newest = 0, {{}}, nil, 0, {{}}, nil
if rpm then requests, r_live, r_newest = window(KEYS[2], now) end
if tpm then tokens, t_live, t_newest = window(KEYS[3], now) end
local verdict, retry = 0, 0
if daily and tonumber(redis.call('GET', KEYS[5]) or '0') >= daily then verdict = 5
elseif monthly and tonumber(redis.call('GET', KEYS[6]) or '0') >= monthly then verdict = 6
elseif tpm and reserve < 0 then verdict = 7
elseif tpm and reserve > tpm then verdict = 4
elseif tpm and tokens + reserve > tpm then verdict = 2; retry = wait_ms(t_live, tokens + reserve - tpm, now)
elseif rpm and requests >= rpm then verdict = 1; retry = wait_ms(r_live, requests - rpm + 1, now)
elseif conc then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= conc then verdict = 3 end
end
local leased, reserved = 0, 0
if verdict == 0 then
  if rpm then
    redis.call('HINCRBY', KEYS[2], sec, 1)
    redis.call('PEXPIRE', KEYS[2], {SPAN_S * 1000})
    requests = requests + 1
    r_newest = sec
  end
  if tpm and reserve > 0 then
    redis.call('HINCRBY', KEYS[3], sec, reserve)
    redis.call('PEXPIRE', KEYS[3], {SPAN_S * 1000})
    tokens = tokens + reserve
    t_newest = sec
    reserved = reserve
  end
  if conc then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[2])
    redis.call('PEXPIRE', KEYS[4], math.ceil(tonumber(ARGV[4]) * 1000))
    leased = 1
  end
end
return {{verdict, leased, reserved, retry, rpm or -1, requests, reset_ms(r_newest, now), tpm or -1, tokens,
        reset_ms(t_newest, now)}}
"""
"""KEYS: the tenant's record, its requests window, its tokens window, its leases, its daily and monthly budget
counters. ARGV: now (s), the lease id, the tokens to reserve (-1: not counted; a tenant with a tpm then gets
verdict 7, "count it", and nothing changes), the lease lifetime (s), whether the budgets apply ('1'). Returns
{verdict, lease
taken, tokens reserved, ms until the refused request could fit, rpm (-1: none), requests in the window, ms until
the requests window is empty, tpm (-1: none), tokens in the window, ms until the tokens window is empty}."""

_RELEASE = f"""
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local reserved, spent = tonumber(ARGV[2]), tonumber(ARGV[4])
if reserved > 0 then
  local left = redis.call('HGET', KEYS[2], ARGV[3])
  if left then
    left = tonumber(left) - reserved
    if left > 0 then redis.call('HSET', KEYS[2], ARGV[3], left) else redis.call('HDEL', KEYS[2], ARGV[3]) end
  end
end
if spent > 0 then
  if ARGV[6] == '1' then
    redis.call('HINCRBY', KEYS[2], ARGV[5], spent)
    redis.call('PEXPIRE', KEYS[2], {SPAN_S * 1000})
  end
  redis.call('INCRBY', KEYS[3], spent)
  redis.call('EXPIREAT', KEYS[3], ARGV[7])
  redis.call('INCRBY', KEYS[4], spent)
  redis.call('EXPIREAT', KEYS[4], ARGV[8])
end
return 0
"""
"""KEYS: the leases, the tokens window, the daily and monthly budget counters (and the batcher's once-mark: a
repeat changes nothing). ARGV: the lease id ('' for none),
the tokens to give back, the bucket they were reserved in, the tokens spent, the bucket of now, whether the
spent tokens go into the window ('1': the tenant had a tpm), the counters' expiries (unix s)."""

_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
"""KEYS: the leases. ARGV: the new expiry (s), the lease id, the lease lifetime (ms). Renews only a lease that is
still there (an expired one is gone for good)."""

_REASONS = {1: ("rpm", "requests per minute"), 2: ("tpm", "tokens per minute"),
            3: ("concurrency", "concurrent requests")}
_BUDGETS = {5: "daily", 6: "monthly"}
_COUNT_IT = 7


class CountNeeded(Exception):
    """An admission asked without the request's tokens (``reserve_tokens=None``) for a tenant that has a ``tpm``:
    nothing was counted or taken; ask again with them."""


def requests_key(tenant: str) -> str:
    return f"banyan:rl:{tenant}:requests"


def tokens_key(tenant: str) -> str:
    return f"banyan:rl:{tenant}:tokens"


def leases_key(tenant: str) -> str:
    return f"banyan:rl:{tenant}:leases"


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar budget period (UTC) around a moment: ``daily`` or ``monthly``."""

    name: str
    label: str
    """``YYYYMMDD`` or ``YYYYMM``: the period's counter is named after it."""
    ends: int
    """Its end (unix s): the budget resets then."""

    def key(self, tenant: str) -> str:
        return f"banyan:budget:{tenant}:{self.name}:{self.label}"


def periods(now: float) -> tuple[Period, Period]:
    """The day and the month (UTC) ``now`` falls in."""
    return _periods_of_day(int(now // 86_400))


@functools.lru_cache(maxsize=4)
def _periods_of_day(day_number: int) -> tuple[Period, Period]:
    """:func:`periods` of a UTC day (days since the epoch): computed once a day, not per request."""
    day = datetime.fromtimestamp(day_number * 86_400, UTC)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return (Period("daily", day.strftime("%Y%m%d"), int((day + timedelta(days=1)).timestamp())),
            Period("monthly", month.strftime("%Y%m"), int(next_month.timestamp())))


def format_duration(ms: int) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's form, to the millisecond):
    ``0s``, ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3.4s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0") + "s" if millis else f"{seconds}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


@dataclass(frozen=True, slots=True)
class Window:
    """One sliding window as the admission left it."""

    limit: int
    used: int
    """Requests or tokens in the window (this request and its reservation included when it was admitted)."""
    reset_ms: int
    """How long until the window is empty again."""


@dataclass(frozen=True, slots=True)
class RateLimitState:
    requests: Window | None = None
    tokens: Window | None = None

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the limits there are (none for a tenant without rpm and tpm)."""
        headers: dict[str, str] = {}
        for kind, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, window.limit - window.used))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(window.reset_ms)
        return headers


def _window(limit: int, used: int, reset_ms: int) -> Window | None:
    return None if limit < 0 else Window(limit=limit, used=used, reset_ms=reset_ms)


@dataclass(frozen=True, slots=True)
class Spent:
    """Tokens a tenant spent in the current day and month (UTC), and when those periods end."""

    daily: int
    monthly: int
    daily_resets_at: int
    monthly_resets_at: int


class Limiter(Protocol):
    """What the gateway needs of the tenant limits (:class:`Quotas`; the unit tests' in-memory fake): the request
    path admits, the admin service reads and forgets budgets."""

    async def admit(self, tenant: str, *, reserve_tokens: int | None = 0, budgeted: bool = True) -> Admission:
        """Let a request of ``tenant`` in, reserving ``reserve_tokens`` against its ``tpm``, or raise
        :class:`RateLimited`; ``budgeted``: a spent token budget refuses it too (generation). ``None``: the
        request's tokens were not counted (:meth:`needs_count` said so); a tenant with a ``tpm`` then raises
        :class:`CountNeeded`, having changed nothing."""
        ...

    def needs_count(self, tenant: str) -> bool:
        """Whether admitting a request of ``tenant`` needs its tokens counted: False only when the tenant's last
        admission here found no ``tpm`` (a guess: a tpm set since then costs one :class:`CountNeeded`)."""
        ...

    async def spent(self, tenants: list[str]) -> dict[str, Spent]:
        """What each of ``tenants`` spent in the current periods (one round trip)."""
        ...

    async def forget(self, tenant: str) -> None:
        """Drop the tenant's windows and budget counters (it is being deleted)."""
        ...


@dataclass
class Admission:
    """A request let in. :meth:`release` (idempotent) gives back its concurrency lease and the tokens it
    reserved, and charges what it :meth:`spend`-t; an admission without ``quotas`` holds nothing."""

    tenant: str
    quotas: Quotas | None = None
    lease: str | None = None
    id: str = ""
    """The admission's own id (its release takes effect once for it)."""
    reserved: int = 0
    bucket: int = 0
    """The second (bucket of the tokens window) the reservation went into."""
    spent: int = 0
    """Tokens the request used (prompt + completion), charged to the window and the budgets on release."""
    limits: RateLimitState = field(default_factory=RateLimitState)
    renewal: asyncio.Task[None] | None = field(default=None, repr=False)
    released: bool = False
    """Whether :meth:`release` was called (a second call does nothing)."""

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the response (what admission saw, this request included)."""
        return self.limits.headers()

    def spend(self, tokens: int) -> None:
        """Note the tokens the request used, once known (its usage)."""
        self.spent += max(0, tokens)

    def keep_reservation(self) -> None:
        """Leave the reserved tokens in the tpm window (the request's real usage is unknown)."""
        self.reserved = 0

    async def release(self) -> None:
        self.released = True
        quotas, self.quotas = self.quotas, None
        if self.renewal is not None:
            self.renewal.cancel()
        if quotas is not None and (self.lease is not None or self.reserved > 0 or self.spent > 0):
            await quotas.give_back(self)


class Headroom:
    """The room each tenant's last admission on this replica left (bounded, least recently admitted dropped
    first): whether a request of the tenant may start on the engine before its own admission is decided
    (:attr:`gateway.settings.Settings.engine_first`)."""

    def __init__(self, *, window_s: float = 5.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._last: OrderedDict[str, tuple[float, int | None, int | None]] = OrderedDict()
        """tenant -> (when, requests left, tokens left); None: no such window."""

    def note(self, tenant: str, admission: Admission) -> None:
        """A grant: the room it left, unless the tenant has a concurrency cap (a lease: never ample)."""
        if admission.lease is not None or self._max_entries <= 0:
            self._last.pop(tenant, None)
            return
        requests, tokens = admission.limits.requests, admission.limits.tokens
        self._last[tenant] = (self._clock(), None if requests is None else requests.limit - requests.used,
                              None if tokens is None else tokens.limit - tokens.used)
        self._last.move_to_end(tenant)
        while len(self._last) > self._max_entries:
            self._last.popitem(last=False)

    def refused(self, tenant: str) -> None:
        self._last.pop(tenant, None)

    def ample(self, tenant: str, reserve_tokens: int) -> bool:
        """Whether the tenant's last grant is recent and left at least two requests and twice ``reserve_tokens``."""
        last = self._last.get(tenant)
        if last is None:
            return False
        when, requests, tokens = last
        return (self._clock() - when <= self._window_s and (requests is None or requests >= 2)
                and (tokens is None or tokens >= 2 * reserve_tokens))


class Quotas:
    def __init__(self, redis: Redis, *, metrics: Metrics, lease_s: float = 60.0,
                 clock: Callable[[], float] = time.time, batcher: ScriptBatcher | None = None,
                 max_untimed: int = 10_000) -> None:
        """``batcher``: sends the admission and release scripts with the other scripts of the same moment
        (share one with :class:`gateway.usage.UsageStore` so a request's release and usage go out together).
        ``max_untimed``: how many tenants seen without a ``tpm`` are remembered (least recently admitted dropped
        first; a tenant forgotten has its requests counted again)."""
        self._redis = redis
        self._max_untimed = max_untimed
        self._untimed: OrderedDict[str, None] = OrderedDict()
        """Tenants whose last admission here found no tpm: their requests are admitted without counting."""
        self._metrics = metrics
        self._lease_s = lease_s
        self._clock = clock
        self._batch = batcher or ScriptBatcher(redis)
        self._admit = self._batch.script(_ADMIT)
        self._release = self._batch.script(_RELEASE, once="release")
        self._renew: Any = redis.register_script(_RENEW)

    async def admit(self, tenant: str, *, reserve_tokens: int | None = 0, budgeted: bool = True) -> Admission:
        now = self._clock()
        lease = once_id()  # unique across replicas too: also the admission's id
        day, month = periods(now)
        keys = [f"banyan:tenant:{tenant}", requests_key(tenant), tokens_key(tenant), leases_key(tenant),
                day.key(tenant), month.key(tenant)]
        reserve = -1 if reserve_tokens is None else max(0, reserve_tokens)
        args = [repr(now), lease, reserve, repr(self._lease_s), "1" if budgeted else "0"]
        reply = [int(v) for v in await self._batch.run(self._admit, keys=keys, args=args)]
        verdict, leased, reserved, retry_ms = reply[:4]
        limits = RateLimitState(requests=_window(*reply[4:7]), tokens=_window(*reply[7:10]))
        self._note_tpm(tenant, timed=limits.tokens is not None)
        if verdict == _COUNT_IT:
            raise CountNeeded(tenant)
        if verdict:
            raise self._refusal(verdict, now=now, retry_ms=retry_ms, reserve_tokens=reserve_tokens, limits=limits,
                                budget_periods=(day, month))
        admission = Admission(tenant=tenant, quotas=self, lease=lease if leased else None, id=lease, reserved=reserved,
                              bucket=int(now), limits=limits)
        if leased:
            admission.renewal = asyncio.create_task(self._keep_alive(tenant, lease))
        return admission

    def needs_count(self, tenant: str) -> bool:
        return tenant not in self._untimed

    def _note_tpm(self, tenant: str, *, timed: bool) -> None:
        if timed or self._max_untimed <= 0:
            self._untimed.pop(tenant, None)
            return
        self._untimed[tenant] = None
        self._untimed.move_to_end(tenant)
        while len(self._untimed) > self._max_untimed:
            self._untimed.popitem(last=False)

    def _refusal(self, verdict: int, *, now: float, retry_ms: int, reserve_tokens: int | None,
                 limits: RateLimitState,
                 budget_periods: tuple[Period, Period]) -> RateLimited:
        headers = limits.headers()
        if verdict in _BUDGETS:
            period = budget_periods[0] if verdict == 5 else budget_periods[1]
            self._metrics.budget_refusals.labels(period.name).inc()
            ends = datetime.fromtimestamp(period.ends, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            retry = str(max(1, period.ends - int(now)))
            return RateLimited(f"The {period.name} token budget is spent; it resets at {ends} (or when an admin "
                               "raises it).", code="quota_exceeded", headers={**headers, "retry-after": retry})
        if verdict == 4:
            self._metrics.rate_limited.labels("tpm_request").inc()
            return RateLimited(f"Request too large for tokens per minute: it may use up to {reserve_tokens} tokens, "
                               "more than the limit allows in a minute. Lower `max_tokens` or `n`.",
                               code="rate_limit_exceeded", param="max_tokens", headers=headers)
        reason, what = _REASONS[verdict]
        self._metrics.rate_limited.labels(reason).inc()
        retry = "1" if reason == "concurrency" else str(max(1, -(-retry_ms // 1000)))
        return RateLimited(f"Rate limit reached for {what}; retry after {retry} s.", code="rate_limit_exceeded",
                           headers={**headers, "retry-after": retry})

    async def give_back(self, admission: Admission) -> None:
        """Give back the lease and the reservation, and charge what was spent. With Redis unreachable this only
        logs: the lease expires by itself within its lifetime, the reservation stays counted in its window, and
        the spent tokens are not charged to the budgets."""
        now = self._clock()
        day, month = periods(now)
        tenant = admission.tenant
        try:
            await self._batch.run(
                self._release, keys=[leases_key(tenant), tokens_key(tenant), day.key(tenant), month.key(tenant)],
                args=[admission.lease or "", admission.reserved, admission.bucket, admission.spent, int(now),
                      "1" if admission.limits.tokens is not None else "0", day.ends + _PERIOD_GRACE_S,
                      month.ends + _PERIOD_GRACE_S], run_id=admission.id or None)
        except RedisError as e:
            log.warning("giving back an admission failed (%s): its lease expires by itself", type(e).__name__)

    async def spent(self, tenants: list[str]) -> dict[str, Spent]:
        if not tenants:
            return {}
        day, month = periods(self._clock())
        values = await self._redis.mget([k for t in tenants for k in (day.key(t), month.key(t))])
        return {t: Spent(daily=int(values[2 * i] or 0), monthly=int(values[2 * i + 1] or 0),
                         daily_resets_at=day.ends, monthly_resets_at=month.ends) for i, t in enumerate(tenants)}

    async def forget(self, tenant: str) -> None:
        day, month = periods(self._clock())
        await self._redis.delete(requests_key(tenant), tokens_key(tenant), leases_key(tenant), day.key(tenant),
                                 month.key(tenant))

    async def renew(self, tenant: str, lease: str) -> bool:
        """Push a lease's expiry one lifetime ahead; False if it had expired (it stays gone)."""
        expiry = self._clock() + self._lease_s
        renewed = await self._renew(keys=[leases_key(tenant)],
                                    args=[repr(expiry), lease, int(self._lease_s * 1000) + 1])
        return bool(renewed)

    async def _keep_alive(self, tenant: str, lease: str) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if not await self.renew(tenant, lease):
                    log.warning("a concurrency lease expired before its request ended")
                    return
            except RedisError as e:  # try again next time; the lease lives a whole lifetime
                log.warning("renewing a concurrency lease failed: %s", type(e).__name__)
