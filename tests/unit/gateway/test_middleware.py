"""The edge of the gateway, driven as ASGI: keys checked before any body is read, the body's read time bounded,
bounded metric labels, the cached and terse readiness, and the shutdown drain (unready, streams ended cleanly)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.types import ASGIApp, Message

from gateway.app import create_app
from gateway.health import Drain
from gateway.openai_api.protocol import CompletionRequest
from gateway.openai_api.serving import CompletionService
from gateway.settings import Settings
from tests.unit.gateway.conftest import ADMIN_KEY, TENANT_KEY, FakeEngine, Fakes, FakeStore, Handler, Harness


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the engine must not be called")


def _app(**settings: Any) -> tuple[ASGIApp, Fakes]:
    made = Fakes(settings=Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), engine_urls=["http://engine"],
                                   **settings), engine=FakeEngine(_never))
    made.tenants.add("acme", key=TENANT_KEY)
    return create_app(made.settings, state=made.state), made


def _scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
            "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


async def _call(app: ASGIApp, scope: dict[str, Any],
                receive: Callable[[], Awaitable[Message]]) -> tuple[int, dict[str, str], Any]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body) if body else None


async def _body_never_read() -> Message:
    raise AssertionError("the body was read")


BIG_UPLOAD = {"content-type": "multipart/form-data; boundary=x", "content-length": str(60 * 1024 * 1024)}
BIG_JSON = {"content-type": "application/json", "content-length": str(4 * 1024 * 1024 - 1)}


@pytest.mark.parametrize(("path", "headers"), [
    ("/admin/tenants/acme/adapters", BIG_UPLOAD),
    ("/admin/tenants/acme/adapters", {**BIG_UPLOAD, "authorization": f"Bearer {TENANT_KEY}"}),
    ("/v1/chat/completions", BIG_JSON),
    ("/v1/chat/completions", {**BIG_JSON, "authorization": f"Bearer {ADMIN_KEY}"}),
    ("/v1/documents", {**BIG_JSON, "authorization": "Bearer bk_unknown"}),
])
async def test_a_refused_key_is_401_before_any_body_is_read(path: str, headers: dict[str, str]) -> None:
    app, _ = _app()
    status, response_headers, body = await _call(app, _scope("POST", path, headers), _body_never_read)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert response_headers["connection"] == "close"  # the unread body is never read: the connection ends
    assert response_headers["x-request-id"].startswith("req_")


async def test_the_tenant_is_authenticated_once_and_counted_by_route() -> None:
    app, made = _app()

    async def empty() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    status, _, body = await _call(app, _scope("GET", "/v1/models", {"authorization": f"Bearer {TENANT_KEY}"}), empty)
    assert status == 200 and body["object"] == "list"
    assert made.tenants.calls.count("authenticate") == 1
    await _call(app, _scope("GET", "/v1/models", {"authorization": "Bearer nope"}), empty)
    text = made.metrics.registry.get_sample_value("banyan_requests_total",
                                                  {"route": "/v1/models", "method": "GET", "status": "401"})
    assert text == 1.0


async def test_a_database_outage_while_authenticating_is_503_dependency_unavailable() -> None:
    app, made = _app()

    async def down(key: str) -> str | None:
        raise RedisConnectionError("connection refused")

    made.tenants.authenticate = down  # type: ignore[method-assign]
    status, _, body = await _call(app, _scope("POST", "/v1/completions", {**BIG_JSON, "authorization": "Bearer k"}),
                                  _body_never_read)
    assert status == 503 and body["error"]["code"] == "dependency_unavailable"


async def test_a_trickling_body_is_cut_after_the_body_timeout() -> None:
    app, made = _app(body_read_timeout_s=0.3)
    parts = 0

    async def trickle() -> Message:
        nonlocal parts
        parts += 1
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    headers = {"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"}
    started = asyncio.get_running_loop().time()
    status, response_headers, body = await _call(app, _scope("POST", "/v1/completions", headers), trickle)
    elapsed = asyncio.get_running_loop().time() - started
    assert status == 408 and body["error"]["type"] == "invalid_request_error"
    assert response_headers["connection"] == "close"
    assert 0.3 <= elapsed < 2.0 and parts >= 3
    assert made.engine.requests == []


async def test_a_body_that_arrives_in_time_is_served_and_then_unbounded() -> None:
    """The deadline covers the body only: once it is complete, waiting on ``receive`` (for a disconnect) is not
    cut short."""
    app, _ = _app(body_read_timeout_s=0.2)
    body = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()
    messages = [{"type": "http.request", "body": body[:10], "more_body": True},
                {"type": "http.request", "body": body[10:], "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    headers = {"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"}
    status, _, answer = await _call(app, _scope("POST", "/v1/chat/completions", headers), receive)
    assert status == 404 and answer["error"]["code"] == "model_not_found"


def test_unknown_methods_share_one_metric_label(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    for method in ("FOO", "BAR", "X-" + "Y" * 30):
        h.client.request(method, "/healthz")
    h.client.request("PATCH", "/healthz")
    labels = {s.labels["method"] for m in h.metrics.registry.collect() if m.name == "banyan_requests"
              for s in m.samples}
    assert labels == {"other", "PATCH"}


class _CountingStore(FakeStore):
    pings: int = 0

    async def ping(self) -> None:
        self.pings += 1
        raise OSError("s3.internal.example:9000 refused")


def test_readyz_names_roles_not_addresses_and_is_cached() -> None:
    from fastapi.testclient import TestClient

    store = _CountingStore()
    made = Fakes(settings=Settings(mode="dev", readiness_cache_s=60), store=store,
                 engine=FakeEngine(lambda request: httpx.Response(503)))
    client = TestClient(create_app(made.settings, state=made.state))
    first, second = client.get("/readyz"), client.get("/readyz")
    assert first.status_code == second.status_code == 503
    assert first.json() == second.json()
    assert first.json()["checks"] == {"engine": "failed", "redis": "ok", "object_store": "failed"}
    assert first.json()["error"]["code"] == "engine_unavailable"
    assert "http://engine" not in first.text and "example" not in first.text and "OSError" not in first.text
    assert store.pings == 1  # the second probe reused the first check


def test_readyz_is_503_as_soon_as_the_gateway_drains(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(lambda request: httpx.Response(200, json={"data": []}))
    assert h.client.get("/readyz").status_code == 200
    h.state.drain.begin()
    response = h.client.get("/readyz")
    assert response.status_code == 503 and response.json()["status"] == "draining"


async def test_the_drain_waits_for_requests_then_stops() -> None:
    drain, stopped = Drain(), asyncio.Event()
    drain.enter()
    run = asyncio.ensure_future(drain.run(seconds=10, stop=stopped.set))
    await asyncio.sleep(0.05)
    assert drain.draining and not stopped.is_set()
    drain.leave()
    await asyncio.wait_for(run, timeout=1)
    assert stopped.is_set() and not drain.streams_cut


async def test_the_drain_cuts_what_is_still_open_when_its_time_is_up() -> None:
    drain, stopped = Drain(), asyncio.Event()
    waiting = asyncio.Event()
    cuts: list[str] = []

    async def stalled_relay() -> None:
        drain.enter()
        task = asyncio.current_task()
        assert task is not None
        forget = drain.on_cut(lambda: (cuts.append("cut"), task.cancel()))
        try:
            waiting.set()
            await asyncio.sleep(3600)  # waiting for the engine's next bytes
        finally:
            forget()
            drain.leave()

    relayed = asyncio.ensure_future(stalled_relay())
    forgotten = drain.on_cut(lambda: cuts.append("forgotten"))
    forgotten()  # a stream that ended is not cut
    await waiting.wait()
    await asyncio.wait_for(drain.run(seconds=0.2, stop=stopped.set), timeout=5)
    assert relayed.cancelled() and cuts == ["cut"] and stopped.is_set()
    late: list[str] = []
    drain.on_cut(lambda: late.append("cut"))  # a stream starting after the cut is cut at once
    assert late == ["cut"]


class _StalledStream(httpx.AsyncByteStream):
    """One SSE event with usage, then nothing (the engine is busy): only a cut ends it."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield (b'data: {"id":"c","object":"text_completion","model":"banyan-demo","choices":[{"index":0,'
               b'"text":"a"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n')
        self.waiting.set()
        await asyncio.sleep(3600)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_stream_open_when_the_drain_time_is_up_ends_with_an_error_event_and_done(
        make_harness: Callable[[Handler], Harness]) -> None:
    stream = _StalledStream()
    h = make_harness(lambda request: httpx.Response(200, stream=stream,
                                                    headers={"content-type": "text/event-stream"}))
    response = await CompletionService(h.state).handle(
        tenant="acme", request=CompletionRequest(model="banyan-demo", prompt="x", max_tokens=50, stream=True))
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    async def receive() -> Message:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    served = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send))
    await asyncio.wait_for(stream.waiting.wait(), timeout=5)
    h.state.drain.cut_streams()
    await asyncio.wait_for(served, timeout=5)
    events = [e for e in b"".join(sent).split(b"\n\n") if e]
    assert json.loads(events[0][len(b"data: "):])["choices"][0]["text"] == "a"
    error = json.loads(events[-2][len(b"data: "):])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert events[-1] == b"data: [DONE]"
    assert stream.closed and h.quotas.admissions[0].released
    assert h.usage.records == [("acme", "banyan-demo", 3, 1)]  # what was sent is charged
