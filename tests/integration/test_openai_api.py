"""The official `openai` client against the gateway: models, chat and completions, streaming, errors."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.integration.conftest import RunningStack, TenantHandle, upload


@pytest.fixture
def tenant_with_adapter(tenant: TenantHandle, admin: httpx.Client, peft_adapters: dict) -> TenantHandle:
    response = upload(admin, tenant.id, "helper", peft_adapters["alpha"])
    assert response.status_code == 201, response.text
    return tenant


def test_models_lists_base_and_active_adapters(tenant_with_adapter: TenantHandle, stack: RunningStack) -> None:
    models = {m.id: m for m in tenant_with_adapter.client().models.list()}
    base = stack.info["base_model"]
    assert set(models) == {base, "helper"}
    assert models[base].owned_by == "banyan"
    helper = models["helper"].model_dump()
    assert helper["owned_by"] == tenant_with_adapter.id
    assert helper["parent"] == base and helper["root"] == base


@pytest.mark.parametrize("model", ["base", "helper"])
def test_chat_completion(tenant_with_adapter: TenantHandle, stack: RunningStack, model: str) -> None:
    name = stack.info["base_model"] if model == "base" else model
    raw = tenant_with_adapter.client().chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    completion = raw.parse()
    assert completion.model == name
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers.get("x-request-id")
    if model == "helper":
        assert raw.headers["x-banyan-adapter"] == "helper"
        assert raw.headers["x-banyan-adapter-version"] == "1"
    else:
        assert "x-banyan-adapter" not in raw.headers


def test_completion_non_streaming(tenant_with_adapter: TenantHandle) -> None:
    completion = tenant_with_adapter.client().completions.create(model="helper", prompt="Once upon", max_tokens=6,
                                                               temperature=0)
    assert completion.model == "helper"
    assert completion.usage is not None and completion.usage.prompt_tokens == len("Once upon")
    assert len(completion.choices[0].text) > 0


def test_chat_streaming_with_usage(tenant_with_adapter: TenantHandle) -> None:
    stream = tenant_with_adapter.client().chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.model == "helper" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.prompt_tokens > 0 and len(text) <= usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streaming_matches_non_streaming(tenant_with_adapter: TenantHandle) -> None:
    client = tenant_with_adapter.client()
    whole = client.completions.create(model="helper", prompt="abc", max_tokens=10, temperature=0)
    pieces = client.completions.create(model="helper", prompt="abc", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text


def test_raw_stream_ends_with_done_and_hides_internal_names(tenant_with_adapter: TenantHandle) -> None:
    with tenant_with_adapter.http() as http:
        body = {"model": "helper", "prompt": "xyz", "max_tokens": 5, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(response.iter_bytes()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    for event in events[:-1]:
        assert json.loads(event[6:])["model"] == "helper"
    assert "banyan." not in raw


def test_wrong_key_is_authentication_error(stack: RunningStack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="bk_" + "x" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_missing_key_is_401(stack: RunningStack) -> None:
    response = httpx.get(stack.url + "/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_404_model_not_found(tenant: TenantHandle) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        tenant.client().chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert info.value.body["type"] == "not_found_error"  # type: ignore[index]


def test_unknown_model_stream_is_404_before_the_stream(tenant: TenantHandle) -> None:
    with tenant.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "nope", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/json")
        assert json.loads(response.read())["error"]["code"] == "model_not_found"


def test_bad_request_is_400_with_openai_shape(tenant: TenantHandle, stack: RunningStack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        tenant.client().chat.completions.create(model=stack.info["base_model"], messages=[])
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # the engine's own refusal, passed through
        tenant.client().completions.create(model=stack.info["base_model"], prompt="x", max_tokens=-1)


def test_malformed_json_is_400(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        response = http.post("/v1/chat/completions", content=b"{not json",
                             headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]


def test_request_id_is_echoed(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        response = http.get("/v1/models", headers={"x-request-id": "my-trace-123"})
    assert response.headers["x-request-id"] == "my-trace-123"


def test_ops_endpoints(stack: RunningStack) -> None:
    assert httpx.get(stack.url + "/healthz").status_code == 200
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200, ready.text
    metrics = httpx.get(stack.url + "/metrics").text
    assert "banyan_requests_total" in metrics and "banyan_request_duration_seconds_bucket" in metrics


def test_a_json_client_that_leaves_stops_the_engine(tenant: TenantHandle, stack: RunningStack) -> None:
    """Without the gateway closing its engine call, the engine would go on with 16 x 4000 tokens for nobody."""
    body = json.dumps({"model": stack.info["base_model"], "prompt": "x", "max_tokens": 4000, "n": 16,
                       "ignore_eos": True}).encode()
    url = urlsplit(stack.url)
    generated_before = stack.engine_metric("vllm:generation_tokens_total")
    left_before = stack.gateway_metric("banyan_client_disconnects_total", kind="json")
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer " + tenant.key.encode() + b"\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 120
        while (running := stack.engine_metric("vllm:num_requests_running")) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running >= 1, "the engine never started the request"
    # The client hung up mid-generation: the gateway notices and the engine drops the request.
    deadline = time.monotonic() + 120
    while stack.engine_metric("vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.engine_metric("vllm:num_requests_running") == 0
    assert stack.engine_metric("vllm:generation_tokens_total") - generated_before < 16 * 4000
    assert stack.gateway_metric("banyan_client_disconnects_total", kind="json") == left_before + 1
