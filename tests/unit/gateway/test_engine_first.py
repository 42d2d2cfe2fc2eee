"""``engine_first``: a completion starts on the engine while its admission is decided, only when the tenant's last
admission on this replica left ample room (:class:`gateway.quotas.Headroom`); a refusal then cancels the engine
call and is the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import RateLimited
from gateway.quotas import Admission, Headroom, RateLimitState, Spent, Window
from tests.unit.gateway.conftest import ChunkStream, FakeAdmission, Handler, Harness

ROOMY = RateLimitState(requests=Window(limit=60, used=1, reset_ms=1000), tokens=Window(limit=100_000, used=50,
                                                                                      reset_ms=1000))
TIGHT = RateLimitState(requests=Window(limit=2, used=2, reset_ms=1000))


def _admission(limits: RateLimitState, *, lease: str | None = None) -> Admission:
    return Admission(tenant="acme", lease=lease, limits=limits)


# -- the room a tenant's last admission left -------------------------------------------------------------------


def test_only_a_recent_grant_with_room_for_two_more_is_ample() -> None:
    now = [100.0]
    headroom = Headroom(window_s=5.0, clock=lambda: now[0])
    assert not headroom.ample("acme", 10)  # never admitted here
    headroom.note("acme", _admission(ROOMY))
    assert headroom.ample("acme", 10)
    assert not headroom.ample("acme", 60_000)  # less than twice the request's worst case left in the tpm window
    now[0] += 5.5
    assert not headroom.ample("acme", 10)  # too long ago


@pytest.mark.parametrize("admission", [
    _admission(TIGHT),  # the request took the rpm window's last slot but one
    _admission(RateLimitState(requests=Window(limit=3, used=2, reset_ms=1))),  # one request left
    _admission(RateLimitState(), lease="l1"),  # a concurrency cap: never started early
])
def test_a_grant_near_a_limit_or_with_a_concurrency_cap_is_not_ample(admission: Admission) -> None:
    headroom = Headroom()
    headroom.note("acme", _admission(ROOMY))
    headroom.note("acme", admission)
    assert not headroom.ample("acme", 1)


def test_a_tenant_without_limits_is_ample_and_a_refusal_forgets_it() -> None:
    headroom = Headroom()
    headroom.note("acme", _admission(RateLimitState()))
    assert headroom.ample("acme", 10**9)
    headroom.refused("acme")
    assert not headroom.ample("acme", 1)


def test_the_record_is_bounded_least_recently_admitted_first() -> None:
    headroom = Headroom(max_entries=2)
    for tenant in ("a", "b", "a", "c"):
        headroom.note(tenant, _admission(ROOMY))
    assert [headroom.ample(t, 1) for t in ("a", "b", "c")] == [True, False, True]


# -- through the app ---------------------------------------------------------------------------------------------


@dataclass
class _Scripted:
    """A limiter whose first admission is granted at once with ``first`` limits, and every later one is decided
    only ``after`` the engine call of its request began (or ``wait_s``, whichever comes first): granted, or refused
    with ``refuse``."""

    engine_began: asyncio.Event
    first: RateLimitState = ROOMY
    refuse: bool = False
    unreachable: bool = False
    """Later admissions fail as with Redis down (instead of being decided)."""
    wait_s: float = 0.3
    order: list[str] = field(default_factory=list)
    admissions: list[FakeAdmission] = field(default_factory=list)

    def needs_count(self, tenant: str) -> bool:
        return True

    async def admit(self, tenant: str, *, reserve_tokens: int | None = 0, budgeted: bool = True) -> Admission:
        if self.admissions or self.order:
            self.order.append("admission asked")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine_began.wait(), timeout=self.wait_s)
            self.order.append("admission decided")
            if self.unreachable:
                raise RedisConnectionError("Connection refused")
            if self.refuse:
                raise RateLimited("Rate limit reached for requests per minute; retry after 1 s.",
                                  headers={"retry-after": "1"})
        self.admissions.append(FakeAdmission(tenant=tenant, reserved=reserve_tokens or 0, limits=self.first))
        return self.admissions[-1]

    async def spent(self, tenants: list[str]) -> dict[str, Spent]:
        return {}

    async def forget(self, tenant: str) -> None:
        return None


@dataclass
class _Engine:
    """Answers the first request at once; every later one only once ``go`` is set (or ``hold_s`` passed), noting
    whether it was cancelled meanwhile (the gateway closed the call)."""

    began: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    hold_s: float = 0.3
    order: list[str] = field(default_factory=list)
    seen: int = 0
    cancelled: int = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen += 1
        body = json.loads(request.content)
        if self.seen > 1:
            self.order.append("engine called")
            self.began.set()
            try:
                await asyncio.wait_for(self.go.wait(), timeout=self.hold_s)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if body.get("stream"):
            event = json.dumps({"id": "c", "model": body["model"], "choices": [{"index": 0, "text": "x"}],
                                "usage": usage}, separators=(",", ":"))
            return httpx.Response(200, stream=ChunkStream([f"data: {event}\n\ndata: [DONE]\n\n".encode()]),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": body["model"],
                                         "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                                         "usage": usage})


def _harness(make_harness: Callable[[Handler], Harness], *, first: RateLimitState = ROOMY, refuse: bool = False,
             unreachable: bool = False) -> tuple[Harness, _Engine, _Scripted]:
    engine = _Engine()
    h = make_harness(engine)
    limiter = _Scripted(engine_began=engine.began, first=first, refuse=refuse, unreachable=unreachable,
                        order=engine.order)
    h.state.quotas = limiter
    return h, engine, limiter


def _engine_first(h: Harness, outcome: str) -> float:
    return h.metrics.registry.get_sample_value("banyan_engine_first_total", {"outcome": outcome}) or 0.0


def _complete(h: Harness, **extra: object) -> httpx.Response:
    return h.client.post("/v1/completions", headers=h.tenant_headers(),
                         json={"model": "banyan-demo", "prompt": "hi", "max_tokens": 1, **extra})


@pytest.mark.parametrize("stream", [False, True])
def test_after_a_roomy_grant_the_engine_starts_while_admission_is_decided(
        make_harness: Callable[[Handler], Harness], stream: bool) -> None:
    h, engine, limiter = _harness(make_harness)
    assert _complete(h).status_code == 200
    response = _complete(h, stream=stream)
    assert response.status_code == 200
    assert engine.order[:3] == ["admission asked", "engine called", "admission decided"]
    assert response.headers["x-ratelimit-remaining-requests"] == "59"
    assert all(a.released for a in limiter.admissions)
    assert _engine_first(h, "granted") == 1 and _engine_first(h, "refused") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_decided_meanwhile_cancels_the_engine_call_and_is_the_answer(
        make_harness: Callable[[Handler], Harness], stream: bool) -> None:
    h, engine, _ = _harness(make_harness, refuse=True)
    assert _complete(h).status_code == 200
    response = _complete(h, stream=stream)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded" and response.headers["retry-after"] == "1"
    assert engine.seen == 2 and engine.cancelled == 1  # it began, and the gateway closed it
    assert _engine_first(h, "refused") == 1 and _engine_first(h, "granted") == 0
    assert h.usage.records and len(h.usage.records) == 1  # only the first request is charged
    # Refused once, the tenant waits for its admissions again: the next request does not reach the engine.
    assert _complete(h).status_code == 429
    assert engine.seen == 2
    assert engine.order[-2:] == ["admission asked", "admission decided"]


def test_after_a_grant_near_a_limit_the_engine_waits_for_the_admission(
        make_harness: Callable[[Handler], Harness]) -> None:
    h, engine, _ = _harness(make_harness, first=TIGHT, refuse=True)
    assert _complete(h).status_code == 200
    assert _complete(h).status_code == 429
    assert engine.seen == 1 and engine.order == ["admission asked", "admission decided"]


def test_off_the_engine_always_waits(make_harness: Callable[[Handler], Harness]) -> None:
    h, engine, _ = _harness(make_harness)
    h.state.settings = h.state.settings.model_copy(update={"engine_first": False})
    assert _complete(h).status_code == 200
    assert _complete(h).status_code == 200
    assert engine.order[:3] == ["admission asked", "admission decided", "engine called"]


def test_a_rag_request_waits_for_its_admission(make_harness: Callable[[Handler], Harness]) -> None:
    h, engine, _ = _harness(make_harness)
    assert _complete(h).status_code == 200
    assert _complete(h, rag=True).status_code == 200
    assert engine.order[:3] == ["admission asked", "admission decided", "engine called"]


def test_an_admission_that_fails_meanwhile_cancels_the_engine_call_and_the_next_ones_wait(
        make_harness: Callable[[Handler], Harness]) -> None:
    h, engine, _ = _harness(make_harness, unreachable=True)
    assert _complete(h).status_code == 200
    response = _complete(h)
    assert response.status_code == 503 and response.json()["error"]["code"] == "dependency_unavailable"
    assert engine.seen == 2 and engine.cancelled == 1
    assert _complete(h).status_code == 503  # Redis still down: no engine call without an admission
    assert engine.seen == 2
