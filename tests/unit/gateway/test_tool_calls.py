"""Tool calls through the chat path against a fake engine: ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
``role: "tool"`` messages reach the engine as sent, and the engine's ``tool_calls`` come back in JSON and in
streams, with the adapter's internal name replaced."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.unit.gateway.conftest import ChunkStream, Handler, Harness

TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "chatcmpl-tool-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": '{"temp_c": 3}'},
]


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    message = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    if not body.get("stream"):
        return httpx.Response(200, json={"id": "c", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}})
    usage = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
    events = [
        {"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": CALL["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}}],
         "usage": usage},
        {"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]}, "finish_reason": "tool_calls"}],
         "usage": usage},
        {"id": "c", "model": body["model"], "choices": [], "usage": usage},
    ]
    stream = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n"
    raw = stream.encode()
    return httpx.Response(200, stream=ChunkStream([raw[:40], raw[40:200], raw[200:]]),
                          headers={"content-type": "text/event-stream"})


def _request(**extra: Any) -> dict[str, Any]:
    return {"model": "helper", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto",
            "parallel_tool_calls": False, **extra}


def test_tool_fields_and_tool_messages_reach_the_engine_as_sent(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("auto", "required", "none", named):
        response = h.client.post("/v1/chat/completions", json=_request(tool_choice=choice), headers=h.tenant_headers())
        assert response.status_code == 200, response.text
        sent = json.loads(h.engine_requests[-1].content)
        assert sent["tools"] == TOOLS and sent["tool_choice"] == choice and sent["parallel_tool_calls"] is False
        assert sent["messages"] == MESSAGES


def test_tool_calls_come_back_in_json(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/chat/completions", json=_request(), headers=h.tenant_headers())
    body = response.json()
    assert body["model"] == "helper"
    assert body["choices"][0]["message"]["tool_calls"] == [CALL]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert h.usage.records == [("acme", "helper", 30, 12)]


def test_tool_calls_are_relayed_in_streams(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/chat/completions", json=_request(stream=True), headers=h.tenant_headers())
    assert response.status_code == 200
    assert "banyan." not in response.text
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n")
              if line.startswith("data: {")]
    deltas = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"] == CALL["id"]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert {e["model"] for e in events} == {"helper"}
    assert all("usage" not in e for e in events)  # the client did not ask for it
    assert response.text.endswith("data: [DONE]\n\n")
    assert h.usage.records == [("acme", "helper", 30, 12)]
