"""Safe rollouts on the request path and the admin API, against a fake engine: a canary split (share, stickiness
per ``user``, validation, the split in the adapter's detail, metrics) and the fallback to the base model when the
engine cannot load an adapter."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from adapters.registry import Split
from tests.unit.gateway.conftest import ADMIN_KEY, ChunkStream, Handler, Harness

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BASE = "banyan-demo"


def _engine(*, unloadable: int | None = None, base_refuses: bool = False) -> Handler:
    """An engine that answers every model, except adapters with ``unloadable`` as status (404: it could not fetch
    them; 400: it would not load them); ``base_refuses``: the base model answers 400 too (a bad request)."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        model = body["model"]
        if unloadable is not None and model.startswith("banyan."):
            return httpx.Response(unloadable, json={"error": {"message": f"LoRA adapter {model} failed",
                                                              "type": "BadRequestError", "param": None,
                                                              "code": unloadable}})
        if base_refuses and model == BASE:
            return httpx.Response(400, json={"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                                       "param": "max_tokens", "code": 400}})
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if body.get("stream"):
            chunk = json.dumps({"id": "c", "model": model, "choices": [{"index": 0, "text": BASE}], "usage": usage},
                               separators=(",", ":"))
            data = f"data: {chunk}\n\ndata: [DONE]\n\n".encode()
            return httpx.Response(200, stream=ChunkStream([data[:20], data[20:]]),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": model, "usage": usage,
                                         "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]})

    return answer


def _ask(h: Harness, *, user: str | None = None, model: str = "bot", **extra: object) -> Any:
    """The app's answer to a completion request (the test client's response)."""
    body: dict[str, object] = {"model": model, "prompt": "x", **extra}
    if user is not None:
        body["user"] = user
    return h.client.post("/v1/completions", json=body, headers=h.tenant_headers())


def _metric(h: Harness, line: str) -> float:
    for row in h.client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


# -- the split ---------------------------------------------------------------------------------------


def test_a_canary_gets_its_share_of_users_and_each_user_stays_on_one_version(
        make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=20))
    first = {}
    for i in range(500):
        response = _ask(h, user=f"user-{i}")
        assert response.status_code == 200 and response.json()["model"] == "bot"
        first[i] = response.headers["x-banyan-adapter-version"]
    share = Counter(first.values())["2"] / len(first)
    assert 0.15 <= share <= 0.25, share
    for i in range(0, 500, 7):  # asked again: the same version, every time
        assert _ask(h, user=f"user-{i}").headers["x-banyan-adapter-version"] == first[i]
    models = [body["model"] for body in (json.loads(r.content) for r in h.engine_requests)]
    assert {m.split(".")[3] for m in models} == {"v1", "v2"}
    canary = _metric(h, 'banyan_adapter_split_requests_total{role="canary"}')
    active = _metric(h, 'banyan_adapter_split_requests_total{role="active"}')
    assert canary + active == len(h.engine_requests) and canary == Counter(
        m.split(".")[3] for m in models)["v2"]


def test_without_user_the_split_is_per_request(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=50))
    versions = Counter(_ask(h).headers["x-banyan-adapter-version"] for _ in range(200))
    assert 60 <= versions["2"] <= 140, versions  # 50 % of 200: far outside this only once in ~10^6 runs


def test_a_split_at_0_and_100_percent(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=0))
    assert {_ask(h, user=f"u{i}").headers["x-banyan-adapter-version"] for i in range(50)} == {"1"}
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=100))
    assert {_ask(h, user=f"u{i}").headers["x-banyan-adapter-version"] for i in range(50)} == {"2"}


def test_adapters_without_a_split_are_not_counted_by_role(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=2)
    assert _ask(h, user="u").headers["x-banyan-adapter-version"] == "2"
    assert "banyan_adapter_split_requests_total{" not in h.client.get("/metrics").text


def test_the_version_served_is_in_the_stream_headers(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=100))
    response = _ask(h, user="u", stream=True)
    assert response.status_code == 200 and response.headers["x-banyan-adapter-version"] == "2"
    assert "banyan." not in response.text


def test_activate_with_a_canary_promote_and_roll_back(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2, 3], active=1)
    url = "/admin/tenants/acme/adapters/bot"
    split = h.client.post(url + "/activate", json={"version": 1, "canary": {"version": 3, "percent": 10}},
                          headers=ADMIN)
    assert split.status_code == 200, split.text
    assert split.json()["active_version"] == 1 and split.json()["canary"] == {"version": 3, "percent": 10}
    assert h.client.get(url, headers=ADMIN).json()["canary"] == {"version": 3, "percent": 10}
    listed = h.client.get("/admin/tenants/acme/adapters", headers=ADMIN).json()["data"]
    assert listed[0]["canary"] == {"version": 3, "percent": 10}
    promoted = h.client.post(url + "/activate", json={"version": 3}, headers=ADMIN).json()
    assert promoted["active_version"] == 3 and promoted["canary"] is None
    assert {_ask(h, user=f"u{i}").headers["x-banyan-adapter-version"] for i in range(30)} == {"3"}
    rolled_back = h.client.post(url + "/activate", json={"version": 1}, headers=ADMIN).json()
    assert rolled_back["active_version"] == 1 and rolled_back["canary"] is None
    assert {_ask(h, user=f"u{i}").headers["x-banyan-adapter-version"] for i in range(30)} == {"1"}


def test_activate_refuses_a_bad_split_and_changes_nothing(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot", [1, 2], active=1, canary=Split(version=2, percent=10))
    before = h.registry.records[("acme", "bot")]
    url = "/admin/tenants/acme/adapters/bot/activate"
    cases = [({"version": 2, "canary": {"version": 2, "percent": 10}}, 400, "canary.version"),
             ({"version": 1, "canary": {"version": 2, "percent": 101}}, 400, "canary.percent"),
             ({"version": 1, "canary": {"version": 2, "percent": -1}}, 400, "canary.percent"),
             ({"version": 1, "canary": {"version": 2}}, 400, "canary.percent"),
             ({"version": 1, "canary": {"version": 9, "percent": 10}}, 404, "canary.version"),
             ({"version": 9, "canary": {"version": 2, "percent": 10}}, 404, "version")]
    for body, status, param in cases:
        response = h.client.post(url, json=body, headers=ADMIN)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param, body
    assert h.registry.records[("acme", "bot")] == before


# -- the fallback ------------------------------------------------------------------------------------


def _opt_in(h: Harness, tenant: str = "acme", *, on: bool = True) -> None:
    patched = h.client.patch(f"/admin/tenants/{tenant}", json={"fallback_to_base": on}, headers=ADMIN)
    assert patched.status_code == 200 and patched.json()["fallback_to_base"] is on


def test_tenants_take_fallback_to_base_on_create_and_patch(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    created = h.client.post("/admin/tenants", json={"id": "initech", "fallback_to_base": True}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["fallback_to_base"] is True
    plain = h.client.post("/admin/tenants", json={"id": "hooli"}, headers=ADMIN)
    assert plain.json()["fallback_to_base"] is False
    _opt_in(h, "hooli")
    _opt_in(h, "hooli", on=False)
    refused = h.client.patch("/admin/tenants/hooli", json={"fallback_to_base": None}, headers=ADMIN)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "fallback_to_base"


def test_an_adapter_the_engine_cannot_fetch_is_503_without_the_fallback(
        make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=404))
    h.registry.add("acme", "bot")
    for stream in (False, True):
        response = _ask(h, stream=stream)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        assert "x-banyan-fallback" not in response.headers
    assert [json.loads(r.content)["model"].startswith("banyan.") for r in h.engine_requests] == [True] * 4
    assert h.usage.records == []


def test_an_adapter_the_engine_cannot_fetch_is_served_by_the_base_model(
        make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=404))
    h.registry.add("acme", "bot")
    _opt_in(h)
    response = _ask(h)
    assert response.status_code == 200, response.text
    assert response.headers["x-banyan-fallback"] == "base"
    assert "x-banyan-adapter" not in response.headers and "x-banyan-adapter-version" not in response.headers
    assert response.json()["model"] == "bot"  # what the client asked for, as OpenAI clients expect
    sent = [json.loads(r.content)["model"] for r in h.engine_requests]
    assert sent[-1] == BASE and all(m.startswith("banyan.") for m in sent[:-1])  # the adapter was tried first
    assert h.usage.records == [("acme", BASE, 3, 2)]  # what served
    assert _metric(h, 'banyan_adapter_fallbacks_total{reason="unresolved"}') == 1.0


def test_a_stream_falls_back_before_its_first_byte(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=404))
    h.registry.add("acme", "bot")
    _opt_in(h)
    response = _ask(h, stream=True)
    assert response.status_code == 200 and response.headers["x-banyan-fallback"] == "base"
    event = json.loads(response.text.split("\n\n")[0][len("data: "):])
    assert event["model"] == "bot"
    assert event["choices"][0]["text"] == BASE  # the base model's id written by the model is left alone
    assert h.usage.records == [("acme", BASE, 3, 2)]


def test_the_fallback_keeps_the_grounding(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=404))
    h.registry.add("acme", "bot")
    _opt_in(h)
    added = h.client.post("/v1/documents", json={"text": "The vault code is 4417."}, headers=h.tenant_headers())
    assert added.status_code == 201
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "bot", "messages": [{"role": "user", "content": "code?"}], "rag": True})
    assert response.status_code == 200 and response.headers["x-banyan-fallback"] == "base"
    assert response.json()["sources"][0]["text"] == "The vault code is 4417."
    tried, served = (json.loads(r.content) for r in h.engine_requests[-2:])
    assert served["model"] == BASE and served["messages"] == tried["messages"]
    assert "4417" in json.dumps(served["messages"])
    assert len(h.documents.budgets) == 1  # retrieved once


def test_an_adapter_the_engine_refuses_falls_back_when_the_base_accepts_the_request(
        make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=400))
    h.registry.add("acme", "bot")
    without = _ask(h)
    assert without.status_code == 400 and "banyan." not in without.text  # as before: the engine's refusal
    _opt_in(h)
    response = _ask(h)
    assert response.status_code == 200 and response.headers["x-banyan-fallback"] == "base"
    assert _metric(h, 'banyan_adapter_fallbacks_total{reason="refused"}') == 1.0


def test_a_request_the_base_model_refuses_too_gets_its_own_error(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine(unloadable=400, base_refuses=True))
    h.registry.add("acme", "bot")
    _opt_in(h)
    response = _ask(h)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "max_tokens is too large"
    assert response.json()["error"]["param"] == "max_tokens"
    assert "x-banyan-fallback" not in response.headers
    assert _metric(h, 'banyan_adapter_fallbacks_total{reason="refused"}') == 0.0
    assert h.usage.records == []


def test_a_served_adapter_never_reads_the_tenant(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine())
    h.registry.add("acme", "bot")
    tenants = h.state.tenants
    assert hasattr(tenants, "calls")
    tenants.calls.clear()
    assert _ask(h).status_code == 200
    assert "get" not in tenants.calls  # the fallback setting is read only when an adapter failed
