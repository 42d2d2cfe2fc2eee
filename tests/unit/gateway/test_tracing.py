"""Tracing on the request path with the SDK's in-memory exporter: a request's stages as children of its server span,
the server span a child of the client's ``traceparent``, the engine call carrying the request id and the engine
call span's trace context, attributes without prompts or keys; and, off (the default), no SDK at all while the
request id and the client's ``traceparent`` still reach the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import Settings
from gateway.tracing import Tracing
from tests.unit.gateway.conftest import ADMIN_KEY, TENANT_KEY, FakeEngine, Fakes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PROMPT = "the secret launch plan of project nightingale"
STAGES = {"auth", "admission", "model_resolution", "retrieval", "engine_call"}


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if body.get("stream"):
        events = [{"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "ok"}}],
                   "usage": usage}]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"id": "c", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                  "finish_reason": "stop"}], "usage": usage})


class Traced:
    def __init__(self, tracing: Tracing | None) -> None:
        settings = Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), engine_urls=["http://engine"])
        self.fakes = Fakes(settings=settings, engine=FakeEngine(_engine))
        self.fakes.tenants.add("acme", key=TENANT_KEY)
        if tracing is not None:
            self.fakes.state.tracing = tracing
        self.client = TestClient(create_app(settings, state=self.fakes.state), raise_server_exceptions=False)

    def chat(self, *, stream: bool = False, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {TENANT_KEY}",
                                                                  **(headers or {})},
                                json={"model": "banyan-demo", "rag": True, "stream": stream, "user": "alice",
                                      "messages": [{"role": "user", "content": PROMPT}]})


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    yield exported
    exported.shutdown()


def _tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


@pytest.mark.parametrize("stream", [False, True])
def test_the_stages_of_a_request_are_children_of_its_span_under_the_clients_trace(
        exporter: InMemorySpanExporter, stream: bool) -> None:
    traced = Traced(_tracing(exporter))
    response = traced.chat(stream=stream, headers={"traceparent": TRACEPARENT, "x-request-id": "req-from-client"})
    assert response.status_code == 200
    spans = _by_name(exporter.get_finished_spans())
    root = spans.pop("POST /v1/chat/completions")
    assert set(spans) == STAGES | ({"stream"} if stream else set())
    assert root.parent is not None and root.parent.span_id == int(PARENT_ID, 16) and root.parent.is_remote
    assert {format(s.context.trace_id, "032x") for s in (root, *spans.values())} == {TRACE_ID}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in spans.values())
    assert root.attributes is not None and root.attributes["http.route"] == "/v1/chat/completions"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["banyan.request_id"] == "req-from-client"

    (sent,) = traced.fakes.engine.requests
    assert sent.headers["x-request-id"] == "req-from-client" == response.headers["x-request-id"]
    engine_call = spans["engine_call"].context
    assert sent.headers["traceparent"] == f"00-{TRACE_ID}-{engine_call.span_id:016x}-01"


def test_span_attributes_never_hold_a_prompt_or_a_key(exporter: InMemorySpanExporter) -> None:
    traced = Traced(_tracing(exporter))
    traced.chat()
    traced.chat(stream=True)
    traced.client.get("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    dumped = json.dumps([(s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events])
                         for s in exporter.get_finished_spans()])
    assert "GET /admin/tenants" in dumped and "banyan.model" in dumped
    for secret in (PROMPT, "nightingale", TENANT_KEY, ADMIN_KEY, "alice"):
        assert secret not in dumped


def test_a_failed_stage_is_marked_by_its_error_type_only(exporter: InMemorySpanExporter) -> None:
    traced = Traced(_tracing(exporter))
    response = traced.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {TENANT_KEY}"},
                                  json={"model": f"no-such-{PROMPT.replace(' ', '-')}"[:60],
                                        "messages": [{"role": "user", "content": PROMPT}]})
    assert response.status_code == 404
    resolution = _by_name(exporter.get_finished_spans())["model_resolution"]
    assert resolution.status.status_code.name == "ERROR" and resolution.status.description == "ModelNotFound"
    assert resolution.events == ()  # no exception event: its message quotes the request


def test_without_a_traceparent_the_request_starts_a_trace(exporter: InMemorySpanExporter) -> None:
    traced = Traced(_tracing(exporter))
    traced.chat()
    root = _by_name(exporter.get_finished_spans())["POST /v1/chat/completions"]
    assert root.parent is None


def test_off_the_engine_still_gets_the_request_id_and_the_clients_traceparent() -> None:
    traced = Traced(None)
    assert not traced.fakes.state.tracing.enabled
    response = traced.chat(headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    (sent,) = traced.fakes.engine.requests
    assert sent.headers["x-request-id"] == response.headers["x-request-id"]
    assert (sent.headers["traceparent"], sent.headers["tracestate"]) == (TRACEPARENT, "vendor=1")
    traced.chat()
    assert "traceparent" not in traced.fakes.engine.requests[-1].headers


def test_off_by_default_no_sdk_is_loaded_and_the_endpoint_turns_it_on() -> None:
    """(The Redis client loads the SDK's metrics package by itself: the tracing SDK and exporter are what stay out.)"""
    code = ("import sys; from gateway.app import build_state; from gateway.settings import Settings; "
            "from gateway.tracing import Tracing; t = Tracing.from_settings(Settings(mode='dev')); "
            "assert not t.enabled; "
            "sdk = ('opentelemetry.sdk.trace', 'opentelemetry.exporter'); "
            "assert not [m for m in sys.modules if m.startswith(sdk)]; "
            "t = Tracing.from_settings(Settings(mode='dev', otel_exporter_otlp_endpoint='http://127.0.0.1:9/')); "
            "assert t.enabled; t.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
