"""Usage over time in the admin API: the window a query asks for (alignment, limits, 400s naming the parameter),
pages of one tenant's buckets and of every tenant's (bounded, resumed where they stopped), over HTTP with a real
Valkey behind the usage store; and the tenants' list paged over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from gateway.admin.protocol import UsageQuery
from gateway.admin.usage import all_tenants_page, tenant_page, window
from gateway.errors import InvalidRequest
from gateway.usage import UsageStore
from tests.unit.gateway.conftest import ADMIN_KEY, Harness

DAY = 1_800_057_600  # a UTC midnight
H = 3600


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_window_is_aligned_to_utc_buckets_and_paged() -> None:
    w = window(UsageQuery(bucket_width="1h", start_time=DAY + 1800, end_time=DAY + 3 * H + 1), now=0)
    assert (w.starts, w.next_start) == ([DAY, DAY + H, DAY + 2 * H, DAY + 3 * H], None)
    w = window(UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 30 * H), now=0)
    assert (len(w.starts), w.next_start) == (24, DAY + 24 * H)
    w = window(UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 30 * H, page=str(DAY + 24 * H)), now=0)
    assert (w.starts[0], len(w.starts), w.next_start) == (DAY + 24 * H, 6, None)
    w = window(UsageQuery(bucket_width="1d", start_time=DAY + 5), now=DAY + 86400 * 2 + 7)
    assert w.starts == [DAY, DAY + 86400, DAY + 2 * 86400]  # end_time defaults to now
    w = window(UsageQuery(bucket_width="1d", start_time=DAY, end_time=DAY + 86400 * 60, limit=31), now=0)
    assert len(w.starts) == 31


@pytest.mark.parametrize(("query", "param"), [
    (UsageQuery(start_time=DAY), "bucket_width"),
    (UsageQuery(bucket_width="1h"), "start_time"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY), "end_time"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY - 1), "end_time"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + H, limit=169), "limit"),
    (UsageQuery(bucket_width="1d", start_time=DAY, end_time=DAY + H, limit=32), "limit"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + H, page=str(DAY + H)), "page"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 2 * H, page=str(DAY + 5)), "page"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 2 * H, page=f"{DAY}.acme"), "page"),
    (UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 2 * H, page="soon"), "page"),
])
def test_a_bad_window_is_400_naming_its_parameter(query: UsageQuery, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        window(query, now=DAY)
    assert caught.value.param == param


async def test_pages_of_every_tenant_stop_within_a_bucket_and_resume_there(redis: Redis) -> None:
    clock = Clock(DAY)
    store = UsageStore(redis, clock=clock)
    for tenant in ("a", "b", "c"):
        await store.record(tenant, model="bot", prompt_tokens=1, completion_tokens=2)
    clock.now = DAY + H
    await store.record("b", model="bot", prompt_tokens=3, completion_tokens=4, user="u")
    query = UsageQuery(bucket_width="1h", start_time=DAY, end_time=DAY + 2 * H)
    seen: list[tuple[int, str, str | None, int]] = []
    pages = 0
    while True:
        page = await all_tenants_page(store, window(query, now=0, tenant_cursor=True), max_rows=2)
        pages += 1
        assert sum(len(b.results) for b in page.data) <= 2
        seen += [(b.start_time, r.tenant, r.user, r.prompt_tokens) for b in page.data for r in b.results]
        if not page.has_more:
            break
        query = query.model_copy(update={"page": page.next_page})
    assert pages == 2
    assert seen == [(DAY, "a", None, 1), (DAY, "b", None, 1), (DAY, "c", None, 1), (DAY + H, "b", "u", 3)]
    only = await tenant_page(store, "b", window(UsageQuery(bucket_width="1d", start_time=DAY, end_time=DAY + 1),
                                                now=0))
    assert [(r.model, r.user, r.requests) for r in only.data[0].results] == [("bot", None, 1), ("bot", "u", 1)]


@pytest.fixture
def harness(make_harness: Callable[..., Harness], valkey_url: str) -> Harness:
    """The app with a real usage store (a Redis client of its own: the app runs on the test client's loop)."""
    made = make_harness(lambda request: httpx.Response(200, json={}))
    made.state.usage = UsageStore(Redis.from_url(valkey_url))
    return made


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_usage_over_http_keeps_the_old_shape_and_answers_buckets(harness: Harness, redis: Redis) -> None:
    now = Clock(DAY + 60)
    await UsageStore(redis, clock=now).record("acme", model="bot", prompt_tokens=3, completion_tokens=4, user="al")
    with harness.client as client:  # one event loop for the app's Redis client
        _ask_usage(client)


def _ask_usage(client: TestClient) -> None:
    old = client.get("/admin/tenants/acme/usage", headers=_admin())
    assert old.status_code == 200 and old.json()["object"] == "tenant.usage"
    answer = client.get("/admin/tenants/acme/usage", headers=_admin(),
                        params={"bucket_width": "1h", "start_time": DAY, "end_time": DAY + 2 * H})
    assert answer.status_code == 200
    assert answer.json() == {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": DAY, "end_time": DAY + H, "results": [
            {"model": "bot", "user": "al", "requests": 1, "prompt_tokens": 3, "completion_tokens": 4}]},
        {"object": "bucket", "start_time": DAY + H, "end_time": DAY + 2 * H, "results": []}]}
    everyone = client.get("/admin/usage", headers=_admin(),
                          params={"bucket_width": "1d", "start_time": DAY, "end_time": DAY + 1}).json()
    assert everyone["data"][0]["results"] == [{"tenant": "acme", "model": "bot", "user": "al", "requests": 1,
                                               "prompt_tokens": 3, "completion_tokens": 4}]


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/admin/tenants/acme/usage", {"start_time": DAY}, "bucket_width"),
    ("/admin/tenants/acme/usage", {"bucket_width": "1w", "start_time": DAY}, "bucket_width"),
    ("/admin/tenants/acme/usage", {"bucket_width": "1h", "start_time": DAY, "end_time": DAY - H}, "end_time"),
    ("/admin/tenants/acme/usage", {"bucket_width": "1h", "start_time": DAY, "color": "red"}, "color"),
    ("/admin/usage", {}, "bucket_width"),
    ("/admin/usage", {"bucket_width": "1h", "start_time": -1}, "start_time"),
])
def test_bad_usage_queries_are_400_naming_the_parameter(harness: Harness, path: str, params: dict[str, Any],
                                                         param: str) -> None:
    answer = harness.client.get(path, headers=_admin(), params=params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_usage_of_an_unknown_tenant_is_404(harness: Harness) -> None:
    answer = harness.client.get("/admin/tenants/nobody/usage", headers=_admin(),
                                params={"bucket_width": "1h", "start_time": DAY, "end_time": DAY + H})
    assert answer.status_code == 404


def test_the_tenants_list_pages_over_http(harness: Harness) -> None:
    for tenant_id in ("c1", "c2", "c3"):
        harness.tenants.add(tenant_id)
    first = harness.client.get("/admin/tenants", headers=_admin(), params={"limit": 2}).json()
    assert ([t["id"] for t in first["data"]], first["has_more"], first["last_id"]) == (["acme", "c1"], True, "c1")
    rest = harness.client.get("/admin/tenants", headers=_admin(), params={"limit": 10, "after": "c1"}).json()
    assert ([t["id"] for t in rest["data"]], rest["has_more"]) == (["c2", "c3", "globex"], False)
    bad = harness.client.get("/admin/tenants", headers=_admin(), params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
