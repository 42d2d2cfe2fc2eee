"""The completion request path against a fake engine: model resolution, name rewriting, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from starlette.responses import Response

from adapters.naming import AdapterRef
from gateway.openai_api import serving
from gateway.openai_api.protocol import CompletionRequest
from gateway.openai_api.serving import CompletionService, ResolvedModel, _EventRewriter, cache_salt
from tests.unit.gateway.conftest import OTHER_KEY, ChunkStream, Handler, Harness

ENGINE_NAME = "banyan.acme.helper.v1.uid000000001"


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
    h.registry.add("acme", "staged", active=None)
    response = h.client.post("/v1/completions", json={"model": "staged", "prompt": "x"}, headers=h.tenant_headers())
    assert response.status_code == 404
    models = h.client.get("/v1/models", headers=h.tenant_headers()).json()["data"]
    assert [m["id"] for m in models] == ["banyan-demo"]


def test_engine_only_fields_are_refused(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    for field in ("cache_salt", "chat_template", "request_id", "priority", "vllm_xargs", "no_such_field"):
        response = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": "x", field: "y"},
                                 headers=h.tenant_headers())
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field
        assert "Unrecognized request argument" in error["message"]
    assert h.engine_requests == []


def test_only_allowlisted_fields_reach_the_engine(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0,
        "top_k": 5, "ignore_eos": True, "store": True, "metadata": {"a": "b"}, "user": "u1",
        "stream_options": {"include_usage": True, "smuggled": 1}})
    assert response.status_code == 200
    sent = json.loads(h.engine_requests[-1].content)
    assert set(sent) == {"model", "messages", "max_tokens", "temperature", "top_k", "ignore_eos", "user", "stream",
                         "cache_salt"}


def test_caps_are_400_with_param_before_admission(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    h.state.settings.max_tokens_per_request = 100
    cases = [({"prompt": ["a"] * 17}, "prompt"), ({"prompt": "x", "n": 17}, "n"),
             ({"prompt": "x", "best_of": 17}, "best_of"), ({"prompt": "x", "max_tokens": 101}, "max_tokens")]
    for extra, param in cases:
        response = h.client.post("/v1/completions", json={"model": "banyan-demo", **extra},
                                 headers=h.tenant_headers())
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    chat = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 101})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_completion_tokens"
    assert h.engine_requests == [] and h.quotas.reserved == []
    within = h.client.post("/v1/completions", json={"model": "banyan-demo", "prompt": ["a"] * 16, "n": 16,
                                                    "max_tokens": 100}, headers=h.tenant_headers())
    assert within.status_code == 200


def test_a_tenant_seen_without_a_tpm_is_admitted_uncounted(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    counted: list[str] = []
    tokens = h.state.tokens
    count = tokens.count

    def spy(text: str) -> int:
        counted.append(text)
        return count(text)

    setattr(tokens, "count", spy)  # noqa: B010 (the harness's counter, watched)
    assert h.state.bases["banyan-demo"].tokens is tokens
    h.quotas.uncounted.add("acme")
    body = {"model": "banyan-demo", "prompt": "x" * 10, "max_tokens": 5}
    assert h.client.post("/v1/completions", json=body, headers=h.tenant_headers()).status_code == 200
    assert h.quotas.reserved == [None] and counted == []  # admitted without counting the prompt
    # The tenant got a tpm since: the limiter asks for the count, and the request is admitted with it.
    h.quotas.timed.add("acme")
    assert h.client.post("/v1/completions", json={**body, "stream": True},
                         headers=h.tenant_headers()).status_code == 200
    assert h.quotas.reserved == [None, None, (10 + 8) + 5] and len(counted) == 1
    # `rag` needs the count for its context budget whatever the limits: counted once, before admission.
    counted.clear()
    rag = {**body, "rag": {"top_k": 1}}
    assert h.client.post("/v1/completions", json=rag, headers=h.tenant_headers()).status_code == 200
    assert h.quotas.reserved[-1] == (10 + 8) + 5 + h.state.settings.rag_max_context_tokens and len(counted) == 1


def test_the_worst_case_is_reserved(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_echo_engine)
    state = h.state
    window = state.settings.max_model_len
    post = h.client.post
    # One token a character (the harness's counter): 10 prompt tokens and 8 for the template (one string is counted
    # as its surface counts it for `rag`), 2 choices of at most 5.
    assert post("/v1/completions", json={"model": "banyan-demo", "prompt": "x" * 10, "n": 2, "max_tokens": 5},
                headers=h.tenant_headers()).status_code == 200
    # Two prompts (text, token ids), OpenAI's default of 16 tokens each.
    assert post("/v1/completions", json={"model": "banyan-demo", "prompt": [[1, 2, 3], [4]]},
                headers=h.tenant_headers()).status_code == 200
    # A chat request without a limit may fill the window; with the cap below the window, the cap is its limit.
    chat = {"model": "banyan-demo", "messages": [{"role": "user", "content": "hello"}]}
    assert post("/v1/chat/completions", json=chat, headers=h.tenant_headers()).status_code == 200
    state.settings.max_tokens_per_request = 50
    assert post("/v1/chat/completions", json=chat, headers=h.tenant_headers()).status_code == 200
    assert json.loads(h.engine_requests[-1].content)["max_tokens"] == 50
    prompt = 5 + 8 * 2  # the text plus what the chat template adds per message
    assert h.quotas.reserved == [(10 + 8) + 2 * 5, (3 + 16) + (1 + 16), window, prompt + 50]


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
    assert json.loads(h.engine_requests[-1].content)["stream_options"] == {"include_usage": True,
                                                                           "continuous_usage_stats": True}
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


async def test_usage_refused_by_redis_is_recorded_once_it_is_back(
        make_harness: Callable[[Handler], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "USAGE_RETRY_DELAYS_S", (0.01, 0.01, 0.01, 0.01))
    h = make_harness(_echo_engine)
    h.usage.unreachable_for = 3  # the call with the answer and two retries
    request = CompletionRequest(model="banyan-demo", prompt="x")
    response = await CompletionService(h.state).handle(tenant="acme", request=request)
    assert response.status_code == 200 and h.usage.records == []  # answered without waiting for Redis
    for _ in range(100):
        if h.usage.records:
            break
        await asyncio.sleep(0.01)
    assert h.usage.records == [("acme", "banyan-demo", 3, 2)]
    assert len(h.usage.tries) == 4 and len(set(h.usage.tries)) == 1 and h.usage.tries[0]  # one id: counted once
    h.usage.unreachable_for = 10  # longer than the retries: given up, not retried forever
    await CompletionService(h.state).handle(tenant="acme", request=request)
    await asyncio.sleep(0.2)
    assert h.usage.records == [("acme", "banyan-demo", 3, 2)] and h.usage.unreachable_for == 5


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


class _EndlessStream(httpx.AsyncByteStream):
    """An engine stream with vLLM's continuous usage stats on every event, that only ends when closed."""

    def __init__(self, model: str, prompt_tokens: int = 7) -> None:
        self.model, self.prompt_tokens, self.closed = model, prompt_tokens, False

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(1, 100_000):
            event = {"id": "c", "object": "text_completion", "model": self.model,
                     "choices": [{"index": 0, "text": "t", "logprobs": None, "finish_reason": None}],
                     "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + i,
                               "completion_tokens": i}}
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self.closed = True


async def _serve_until_the_client_leaves(response: Response, *, after_events: int) -> bytes:
    """Run a streaming response the way an ASGI server does, with a client that hangs up after some events."""
    received: list[bytes] = []
    left = asyncio.Event()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if b"".join(received).count(b"\n\n") >= after_events:
                left.set()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return b"".join(received)


async def test_a_stream_the_client_leaves_is_still_charged(make_harness: Callable[[Handler], Harness]) -> None:
    streams: list[_EndlessStream] = []

    def engine(request: httpx.Request) -> httpx.Response:
        streams.append(_EndlessStream(json.loads(request.content)["model"]))
        return httpx.Response(200, stream=streams[-1], headers={"content-type": "text/event-stream"})

    h = make_harness(engine)
    state, quotas = h.state, h.quotas
    request = CompletionRequest(model="banyan-demo", prompt="x", max_tokens=4000, stream=True)
    response = await CompletionService(state).handle(tenant="acme", request=request)
    relayed = await _serve_until_the_client_leaves(response, after_events=5)
    events = [e for e in relayed.split(b"\n\n") if e]
    assert len(events) >= 5 and b"usage" not in relayed  # the client did not ask for usage
    [(tenant, model, prompt, completion)] = h.usage.records
    assert (tenant, model, prompt) == ("acme", "banyan-demo", 7) and completion >= len(events)
    assert streams[0].closed and quotas.admissions[0].released
    assert 'banyan_client_disconnects_total{kind="stream"} 1.0' in h.client.get("/metrics").text


def test_continuous_usage_is_summed_over_choices_and_kept_when_asked() -> None:
    resolved = ResolvedModel(public="m", engine="m", adapter=None)

    def event(index: int, prompt: int, completion: int) -> bytes:
        return (b'data: {"id":"c","choices":[{"index":%d,"text":"t"}],"usage":{"prompt_tokens":%d,'
                b'"completion_tokens":%d,"prompt_tokens_details":null}}\n\n' % (index, prompt, completion))

    # Two prompts of 3 and 5 tokens, two choices each: choice i belongs to prompt i // 2.
    no_usage = b'data: {"id":"c","choices":[{"index":1,"text":"t","logprobs":{"tokens":["x"]}}]}\n\n'
    raw = event(0, 3, 1) + event(2, 5, 1) + no_usage + event(1, 3, 2) + event(0, 3, 2) + event(3, 5, 4)
    hidden = _EventRewriter(resolved, show_usage=False, show_continuous_usage=False, choices_per_prompt=2)
    out = hidden.feed(raw)
    assert b"usage" not in out and out.count(b"\n\n") == 6
    assert all(json.loads(e[6:])["choices"][0]["text"] == "t" for e in out.split(b"\n\n") if e)
    assert hidden.usage() == {"prompt_tokens": 8, "completion_tokens": 2 + 2 + 1 + 4}
    shown = _EventRewriter(resolved, show_usage=True, show_continuous_usage=True, choices_per_prompt=2)
    assert shown.feed(raw) == raw
    final = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":10}}\n\n'
    assert hidden.feed(final) == b"" and hidden.usage() == {"prompt_tokens": 8, "completion_tokens": 10}


@pytest.mark.parametrize("hangs", ["before_the_headers", "in_the_body"])
async def test_a_json_client_that_leaves_ends_the_engine_call(make_harness: Callable[[Handler], Harness],
                                                              hangs: str) -> None:
    reading, closed = asyncio.Event(), asyncio.Event()

    class Hanging(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            reading.set()
            await asyncio.Event().wait()  # the engine is still generating
            yield b""

        async def aclose(self) -> None:
            closed.set()

    async def engine(request: httpx.Request) -> httpx.Response:
        if hangs == "before_the_headers":  # vLLM answers a JSON request only once it is done
            reading.set()
            try:
                await asyncio.Event().wait()
            finally:
                closed.set()
        return httpx.Response(200, stream=Hanging())

    h = make_harness(engine)
    state, quotas = h.state, h.quotas
    gone = asyncio.Event()
    answer = asyncio.ensure_future(CompletionService(state).handle(
        tenant="acme", request=CompletionRequest(model="banyan-demo", prompt="x"), disconnected=gone.wait))
    await asyncio.wait_for(reading.wait(), timeout=10)  # the gateway waits for the engine's answer
    assert not answer.done()
    gone.set()  # the client hangs up
    response = await asyncio.wait_for(answer, timeout=10)
    assert response.status_code == 499
    assert closed.is_set() and h.usage.records == []
    assert quotas.admissions[0].released and quotas.admissions[0].kept
    assert 'banyan_client_disconnects_total{kind="json"} 1.0' in h.client.get("/metrics").text


async def test_end_of_request_work_finishes_though_its_caller_is_cancelled() -> None:
    gate, finished = asyncio.Event(), asyncio.Event()

    async def work() -> None:  # accounting that waits on Redis
        await gate.wait()
        finished.set()

    before = set(serving._detached)
    caller = asyncio.ensure_future(serving._finish_whatever_happens(work()))
    await asyncio.sleep(0.01)
    caller.cancel()  # the request's task is cancelled (a shutdown, a client gone)
    with pytest.raises(asyncio.CancelledError):
        await caller  # the caller stops waiting at once ...
    (held,) = serving._detached - before
    assert not finished.is_set() and not held.done()
    gate.set()
    await asyncio.wait_for(finished.wait(), 1)  # ... and the work goes on to its end, referenced until done
    await asyncio.sleep(0)
    assert held.done() and held not in serving._detached


async def test_end_of_request_work_that_fails_raises_in_its_caller() -> None:
    async def work() -> None:
        await asyncio.sleep(0)
        raise ValueError("the usage store refused it")

    with pytest.raises(ValueError, match="refused"):
        await serving._finish_whatever_happens(work())


async def test_unless_left_answers_none_when_the_client_leaves_and_cancels_the_work() -> None:
    gone, cancelled = asyncio.Event(), asyncio.Event()

    async def engine_call() -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    async def disconnected() -> None:
        await gone.wait()

    waiting = asyncio.ensure_future(serving._unless_left(engine_call(), disconnected))
    await asyncio.sleep(0.01)
    gone.set()
    assert await asyncio.wait_for(waiting, 1) is None and cancelled.is_set()
    assert waiting.cancelling() == 0  # the client's cancellation taken back: none left on the request's task


async def test_unless_left_passes_the_answer_an_error_and_the_callers_own_cancellation() -> None:
    async def never_leaves() -> None:
        await asyncio.sleep(10)

    async def answer() -> bytes:
        await asyncio.sleep(0)
        return b"{}"

    async def fails() -> bytes:
        await asyncio.sleep(0)
        raise httpx.ReadError("engine gone")

    assert await serving._unless_left(answer(), never_leaves) == b"{}"
    with pytest.raises(httpx.ReadError):
        await serving._unless_left(fails(), never_leaves)
    caller = asyncio.ensure_future(serving._unless_left(asyncio.sleep(10, b""), never_leaves))
    await asyncio.sleep(0.01)
    caller.cancel()  # the request's task cancelled: not mistaken for the client leaving
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_stream_is_settled_before_the_client_sees_its_end(make_harness: Callable[[Handler], Harness]) -> None:
    """A client that reads a stream to `[DONE]` and at once asks for its usage, or sends its next request under a
    concurrency cap, finds the stream counted and its admission released."""
    events = [b'data: {"id":"c","choices":[{"index":0,"text":"t"}],"usage":{"prompt_tokens":7,'
              b'"completion_tokens":%d}}\n\n' % i for i in (1, 2)]

    def engine(request: httpx.Request) -> httpx.Response:
        body = [*events, b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
                b"data: [DO", b"NE]\n\n"]  # the end split across reads
        return httpx.Response(200, stream=ChunkStream(body), headers={"content-type": "text/event-stream"})

    h = make_harness(engine)
    request = CompletionRequest(model="banyan-demo", prompt="x", max_tokens=2, stream=True)
    response = await CompletionService(h.state).handle(tenant="acme", request=request)
    seen_at_done: list[tuple[int, bool]] = []
    received: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if b"[DONE]" in received[-1]:
                seen_at_done.append((len(h.usage.records), h.quotas.admissions[0].released))

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    relayed = b"".join(received)
    assert seen_at_done == [(1, True)]  # recorded and released when [DONE] went out, not after
    assert relayed.endswith(b"data: [DONE]\n\n") and relayed.count(b"data: {") == 2
    assert h.usage.records == [("acme", "banyan-demo", 7, 2)]
    assert 'banyan_client_disconnects_total{kind="stream"}' not in h.client.get("/metrics").text
