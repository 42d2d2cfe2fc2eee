"""Tracing on the real stack: a gateway built in-process with ``create_app`` against the session stack's Redis, S3
and vLLM engine, its spans in the SDK's in-memory exporter, called through the openai SDK. A grounded chat (JSON and
streamed) with the client's ``traceparent`` gives the request span under the client's trace and every stage under
it; the engine gets the request id (vLLM names its request after it: the completion's ``id`` says so) and the
engine call span's trace context. And the session's own gateway (tracing off) passes the request id to the engine
too."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from gateway.app import build_state, create_app
from gateway.engine import EnginePool
from gateway.settings import Settings
from gateway.tracing import Tracing
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant

TRACE_ID = secrets.token_hex(16)
PARENT_ID = secrets.token_hex(8)
STAGES = {"auth", "admission", "model_resolution", "retrieval", "engine_call"}


class _Recording(httpx.AsyncBaseTransport):
    """The engine pool's transport: real HTTP to the engine, each request noted."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Traced:
    client: openai.AsyncOpenAI
    exporter: InMemorySpanExporter
    engine: _Recording


@pytest.fixture
def grounded(stack: RunningStack, admin: httpx.Client) -> TenantHandle:
    tenant = make_tenant(stack, admin, "traced")
    with tenant.http() as http:
        added = http.post("/v1/documents", json={"title": "Rota", "text": "The night shift at the Orchard depot "
                                                 "starts at nine and the badge office closes at six."})
    assert added.status_code == 201, added.text
    return tenant


@pytest.fixture
async def traced(stack: RunningStack, grounded: TenantHandle) -> AsyncIterator[Traced]:
    info = stack.info
    settings = Settings(mode="dev", admin_key=SecretStr(stack.admin_key), redis_url=info["redis_url"],
                        s3_endpoint_url=info["s3_endpoint_url"], s3_bucket=info["s3_bucket"],
                        s3_access_key_id=SecretStr("banyan-dev"), s3_secret_access_key=SecretStr("banyan-dev-secret"),
                        engine_urls=[info["engine_url"]], engine_api_key=SecretStr(info["engine_api_key"]),
                        base_model=info["base_model"])
    recording = _Recording()
    engines = EnginePool([info["engine_url"]], api_key=info["engine_api_key"], transport=recording)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    state = build_state(settings, engines=engines)
    state.tracing = Tracing(provider)
    app = create_app(settings, state=state)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=300) as http:
        yield Traced(client=openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=grounded.key, max_retries=0,
                                               http_client=http),
                     exporter=exporter, engine=recording)


def _check_trace(traced: Traced, *, request_id: str, streamed: bool) -> None:
    spans: dict[str, ReadableSpan] = {s.name: s for s in traced.exporter.get_finished_spans()}
    root = spans.pop("POST /v1/chat/completions")
    assert set(spans) == STAGES | ({"stream"} if streamed else set())
    assert root.parent is not None and root.parent.span_id == int(PARENT_ID, 16)
    assert {format(s.context.trace_id, "032x") for s in (root, *spans.values())} == {TRACE_ID}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in spans.values())
    assert root.attributes is not None and root.attributes["banyan.request_id"] == request_id
    (sent,) = [r for r in traced.engine.sent if r.url.path == "/v1/chat/completions"]
    assert sent.headers["x-request-id"] == request_id
    assert sent.headers["traceparent"] == f"00-{TRACE_ID}-{spans['engine_call'].context.span_id:016x}-01"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_grounded_chat_is_traced_under_the_clients_trace(stack: RunningStack, traced: Traced,
                                                                 streamed: bool) -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    raw = await traced.client.chat.completions.with_raw_response.create(
        model=stack.info["base_model"], max_tokens=4, temperature=0, stream=streamed, extra_headers=headers,
        messages=[{"role": "user", "content": "When does the night shift start?"}], extra_body={"rag": True})
    request_id = raw.headers["x-request-id"]
    parsed = raw.parse()
    if streamed:
        chunks = [chunk async for chunk in parsed]  # type: ignore[union-attr]
        completion_id = chunks[0].id
    else:
        completion_id = parsed.id  # type: ignore[union-attr]
    assert completion_id == f"chatcmpl-{request_id}"  # vLLM took the gateway's request id as its own
    _check_trace(traced, request_id=request_id, streamed=streamed)


def test_the_sessions_gateway_passes_its_request_id_to_the_engine(stack: RunningStack, admin: httpx.Client) -> None:
    client = make_tenant(stack, admin, "reqid").client()
    raw = client.completions.with_raw_response.create(model=stack.info["base_model"], prompt="x", max_tokens=1,
                                                      extra_headers={"x-request-id": "req-joined-up-1"})
    assert raw.headers["x-request-id"] == "req-joined-up-1"
    assert raw.parse().id == "cmpl-req-joined-up-1"
