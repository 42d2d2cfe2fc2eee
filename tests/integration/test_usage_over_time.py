"""Usage over time and the paged tenants' list on the real stack: requests sent through the openai SDK (with and
without ``user``, JSON and streamed) land in the current hour's and day's buckets by model and user with the
tokens the engine reported; the cross-tenant view holds them under the tenant; ``GET /admin/tenants`` pages
through every tenant once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import RunningStack, make_tenant, upload


def _sum(pages: list[dict], *, key: tuple[str, ...]) -> dict[tuple, list[int]]:
    """The results of every bucket of ``pages`` summed by ``key`` (requests, prompt and completion tokens)."""
    sums: dict[tuple, list[int]] = {}
    for page in pages:
        for bucket in page["data"]:
            for r in bucket["results"]:
                counts = sums.setdefault(tuple(r[k] for k in key), [0, 0, 0])
                for i, name in enumerate(("requests", "prompt_tokens", "completion_tokens")):
                    counts[i] += r[name]
    return sums


def _all_pages(admin: httpx.Client, path: str, params: dict) -> list[dict]:
    pages: list[dict] = []
    while True:
        answer = admin.get(path, params=params)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        if not pages[-1]["has_more"]:
            return pages
        params = {**params, "page": pages[-1]["next_page"]}


def test_usage_lands_in_hour_and_day_buckets_by_model_and_user(stack: RunningStack, admin: httpx.Client,
                                                                peft_adapters: dict[str, Path]) -> None:
    tenant = make_tenant(stack, admin, "buckets")
    assert upload(admin, tenant.id, "bucketed", peft_adapters["alpha"]).status_code == 201
    client, base = tenant.client(), stack.info["base_model"]
    start = int(time.time())
    a = client.completions.create(model="bucketed", prompt="hello", max_tokens=5, user="alice")
    b = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       user="bob")
    streamed = list(client.completions.create(model="bucketed", prompt="abc", max_tokens=4, stream=True,
                                              user="alice", stream_options={"include_usage": True}))
    c = client.completions.create(model="bucketed", prompt="no user", max_tokens=2)
    end = int(time.time()) + 1
    ua, ub, uc, us = a.usage, b.usage, c.usage, streamed[-1].usage
    assert ua is not None and ub is not None and uc is not None and us is not None
    expected = {("bucketed", "alice"): [2, ua.prompt_tokens + us.prompt_tokens,
                                         ua.completion_tokens + us.completion_tokens],
                (base, "bob"): [1, ub.prompt_tokens, ub.completion_tokens],
                ("bucketed", None): [1, uc.prompt_tokens, uc.completion_tokens]}
    for width in ("1h", "1d"):
        params = {"bucket_width": width, "start_time": start, "end_time": end}
        pages = _all_pages(admin, f"/admin/tenants/{tenant.id}/usage", params)
        assert all(b["end_time"] - b["start_time"] == {"1h": 3600, "1d": 86400}[width] for p in pages
                   for b in p["data"])
        assert all(b["start_time"] % {"1h": 3600, "1d": 86400}[width] == 0 for p in pages for b in p["data"])
        assert _sum(pages, key=("model", "user")) == expected
    everyone = _all_pages(admin, "/admin/usage", {"bucket_width": "1h", "start_time": start, "end_time": end})
    mine = {k[1:]: v for k, v in _sum(everyone, key=("tenant", "model", "user")).items() if k[0] == tenant.id}
    assert mine == expected
    assert admin.get(f"/admin/tenants/{tenant.id}/usage").json()["total"]["requests"] == 4  # the old shape


def test_a_user_field_too_long_is_refused(stack: RunningStack, admin: httpx.Client) -> None:
    client = make_tenant(stack, admin, "longuser").client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=stack.info["base_model"], prompt="x", max_tokens=1, user="u" * 257)
    assert info.value.body["param"] == "user"  # type: ignore[index]


def test_bad_usage_windows_are_400(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "window")
    now = int(time.time())
    for params, param in (({"bucket_width": "1h", "start_time": now, "end_time": now - 10}, "end_time"),
                          ({"bucket_width": "1h", "start_time": now - 10, "limit": 500}, "limit"),
                          ({"start_time": now}, "bucket_width")):
        answer = admin.get(f"/admin/tenants/{tenant.id}/usage", params=params)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_the_tenants_list_pages_through_every_tenant_once(stack: RunningStack, admin: httpx.Client) -> None:
    made = {make_tenant(stack, admin, "paged").id for _ in range(5)}
    seen: list[str] = []
    after = None
    while True:
        page = admin.get("/admin/tenants", params={"limit": 3, **({"after": after} if after else {})}).json()
        assert len(page["data"]) <= 3
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(set(seen)) and made <= set(seen)
