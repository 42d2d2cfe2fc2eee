"""The completion request path against a fake engine: model resolution, name rewriting, errors."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from adapters.naming import AdapterRef
from gateway.openai_api.serving import ResolvedModel, _EventRewriter, cache_salt
from tests.unit.gateway.conftest import OTHER_KEY, ChunkStream, Handler, Harness

ENGINE_NAME = "banyan.acme.helper.v1.abcdef012345"


def _completion(model: str) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _echo_engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        chunk = json.dumps({"id": "c", "model": body["model"], "choices": [{"text": "x"}]})
        stream = f"data: {chunk}\n\ndata: {chunk}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "c", "model": body["model"], "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
            stream += f"data: {json.dumps(usage, separators=(',', ':'))}\n\n"
        stream = (stream + "data: [DONE]\n\n").encode()
        return httpx.Response(200, stream=ChunkStream([stream[:7], stream[7:50], stream[50:]]),
                              headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=_completion(body["model"]))


def test_adapter_request_uses_internal_name_and_echoes_public(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x"}, headers=h.tenant_headers())
    assert response.status_code == 200
    assert response.json()["model"] == "helper"
    assert response.headers["x-banyan-adapter"] == "helper"
    assert response.headers["x-banyan-adapter-version"] == "1"
    sent = json.loads(h.engine_requests[0].content)
    assert sent["model"] == ENGINE_NAME
    assert sent["cache_salt"] == cache_salt("acme") != cache_salt("globex")
    assert "rag" not in sent


def test_stream_rewrites_internal_name(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x", "stream": True},
                             headers=h.tenant_headers())
    assert response.status_code == 200
    assert ENGINE_NAME not in response.text and "banyan." not in response.text
    assert response.text.count('"model": "helper"') + response.text.count('"model":"helper"') == 2
    assert response.text.endswith("data: [DONE]\n\n")


def test_another_tenants_adapter_is_model_not_found(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x"},
                             headers=h.tenant_headers(OTHER_KEY))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert h.engine_requests == []


def test_inactive_adapter_is_not_served(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.registry.add("acme", "staged", active=False)
    response = h.client.post("/v1/completions", json={"model": "staged", "prompt": "x"}, headers=h.tenant_headers())
    assert response.status_code == 404
    models = h.client.get("/v1/models", headers=h.tenant_headers()).json()["data"]
    assert [m["id"] for m in models] == ["banyan-demo"]


def test_engine_only_fields_are_refused(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    for field in ("cache_salt", "chat_template"):
        response = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": "x", field: "y"},
                                 headers=h.tenant_headers())
        assert response.status_code == 400
        assert response.json()["error"]["param"] == field
    assert h.engine_requests == []


def test_engine_unreachable_is_503(make_harness: Callable[[Handler], Harness]) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    h = make_harness(down)
    for stream in (False, True):
        response = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": "x", "stream": stream},
                                 headers=h.tenant_headers())
        assert response.status_code == 503
        assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "server_error",
                                            "param": None, "code": "engine_unavailable"}


def test_engine_4xx_passes_through_without_internal_name(make_harness: Callable[[Handler], Harness]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        return httpx.Response(400, json={"error": {"message": f"bad max_tokens for {model}", "type": "BadRequestError",
                                                   "param": "max_tokens", "code": 400}})

    h = make_harness(refuse)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x", "max_tokens": -1},
                             headers=h.tenant_headers())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == "bad max_tokens for helper"
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens" and error["code"] is None


def test_stream_broken_midway_ends_with_error_event(make_harness: Callable[[Handler], Harness]) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b'data: {"model": "banyan-demo", "choices": []}\n\n'
            raise httpx.ReadError("connection reset")

    h = make_harness(lambda request: httpx.Response(200, stream=Broken()))
    response = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": "x", "stream": True},
                             headers=h.tenant_headers())
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert json.loads(events[-2][6:])["error"]["code"] == "engine_unavailable"
    assert events[-1] == "data: [DONE]"


def test_name_rewriter_handles_events_split_anywhere() -> None:
    ref = AdapterRef("acme", "helper", 3, "abcdef012345")
    resolved = ResolvedModel(public="helper", engine=ref.engine_name, adapter=ref)
    event = f'data: {{"model":"{ref.engine_name}","x":1}}\n\n'.encode() * 3
    for cut in range(1, len(event)):
        rewriter = _EventRewriter(resolved)
        out = rewriter.feed(event[:cut]) + rewriter.feed(event[cut:]) + rewriter.flush()
        assert out == b'data: {"model":"helper","x":1}\n\n' * 3, cut


def test_name_rewriter_renders_engine_error_events() -> None:
    ref = AdapterRef("acme", "helper", 3, "abcdef012345")
    resolved = ResolvedModel(public="helper", engine=ref.engine_name, adapter=ref)
    rewriter = _EventRewriter(resolved)
    raw = b'data: {"error": {"message": "boom", "type": "InternalServerError", "param": null, "code": 500}}\n\n'
    out = json.loads(rewriter.feed(raw)[6:])
    assert out["error"]["type"] == "server_error" and out["error"]["code"] == "engine_unavailable"


def test_stream_usage_is_counted_and_shown_only_when_asked(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.registry.add("acme", "helper")
    body = {"model": "helper", "prompt": "x", "stream": True}
    plain = h.client.post("/v1/completions", json=body, headers=h.tenant_headers())
    assert '"usage"' not in plain.text and plain.text.endswith("data: [DONE]\n\n")
    assert json.loads(h.engine_requests[-1].content)["stream_options"] == {"include_usage": True}
    asked = h.client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}},
                          headers=h.tenant_headers())
    assert asked.text.count('"usage":{"prompt_tokens":3') == 1
    assert h.usage.records == [("acme", "helper", 3, 2), ("acme", "helper", 3, 2)]
    metrics = h.client.get("/metrics").text
    assert 'banyan_tokens_total{kind="completion"} 4.0' in metrics
    assert 'banyan_time_to_first_token_seconds_count{endpoint="completions"} 2.0' in metrics


def test_json_usage_is_recorded_per_model(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    response = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": "x"},
                             headers=h.tenant_headers())
    assert response.status_code == 200
    assert h.usage.records == [("acme", "banyan-demo", 3, 2)]
    assert 'banyan_model_resolutions_total{result="base"} 1.0' in h.client.get("/metrics").text


def test_adapter_dropped_by_the_engine_is_asked_again_once(make_harness: Callable[[Handler], Harness]) -> None:
    misses = {"left": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        if misses["left"] > 0:
            misses["left"] -= 1
            return httpx.Response(404, json={"error": {"message": "gone", "type": "NotFoundError", "code": 404}})
        return _echo_engine(request)

    h = make_harness(flaky)
    h.registry.add("acme", "helper")
    for stream in (False, True):
        misses["left"] = 1
        before = len(h.engine_requests)
        response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x", "stream": stream},
                                 headers=h.tenant_headers())
        assert response.status_code == 200 and len(h.engine_requests) == before + 2
        misses["left"] = 2  # twice in a row: a real failure, answered before any stream starts
        response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "x", "stream": stream},
                                 headers=h.tenant_headers())
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
