"""Tool calls through the gateway with the stock ``openai`` SDK, on the session stack (the tiny model, served by
``banyan dev`` with its hermes-style chat template and vLLM's ``hermes`` parser).

The tiny model has random weights: it never chooses a tool by itself. A ``tool_choice`` naming a function (or
``"required"``) makes vLLM constrain its output to a hermes ``<tool_call>`` (the parser's structural tag), and a
``strict`` function's arguments to its JSON schema, so the answer carries a parsed call whatever the weights;
the schema's ``enum`` keeps the arguments short. ``"auto"`` is checked to be
accepted (the engine refuses it without ``--enable-auto-tool-choice`` and a parser)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.conftest import RunningStack, TenantHandle, upload

CITIES = ["Oslo", "Bergen", "Tromso"]
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK: Any = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def tenant_with_adapter(tenant: TenantHandle, admin: httpx.Client, peft_adapters: dict) -> TenantHandle:
    response = upload(admin, tenant.id, "helper", peft_adapters["alpha"])
    assert response.status_code == 201, response.text
    return tenant


@pytest.mark.parametrize("model", ["base", "helper"])
def test_a_named_tool_call_round_trip(tenant_with_adapter: TenantHandle, stack: RunningStack, model: str) -> None:
    name = stack.info["base_model"] if model == "base" else model
    client = tenant_with_adapter.client()
    first = client.chat.completions.create(model=name, messages=QUESTION, tools=[WEATHER, CLOCK],
                                           tool_choice=NAMED, parallel_tool_calls=False, max_tokens=256,
                                           temperature=0)
    assert first.model == name
    message = first.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and arguments["city"] in CITIES

    answer = client.chat.completions.create(model=name, max_tokens=8, temperature=0, tools=[WEATHER, CLOCK],
                                            messages=[*QUESTION, message.model_dump(exclude_none=True),
                                                      {"role": "tool", "tool_call_id": call.id,
                                                       "content": json.dumps({"temp_c": 3, "sky": "clear"})}])
    assert answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls
    assert answer.usage is not None and answer.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_required_calls_one_of_the_tools(tenant: TenantHandle, stack: RunningStack) -> None:
    completion = tenant.client().chat.completions.create(
        model=stack.info["base_model"], messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, max_tokens=256, temperature=0)
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1, completion.choices[0].message
    arguments = json.loads(calls[0].function.arguments)
    assert (calls[0].function.name, sorted(arguments)) in [("get_weather", ["city"]), ("get_time", ["zone"])]


def test_auto_is_accepted(tenant: TenantHandle, stack: RunningStack) -> None:
    completion = tenant.client().chat.completions.create(
        model=stack.info["base_model"], messages=QUESTION, tools=[WEATHER], tool_choice="auto", max_tokens=8,
        temperature=0)
    choice = completion.choices[0]
    assert choice.message.content or choice.message.tool_calls
    assert choice.finish_reason in {"stop", "length", "tool_calls"}


@pytest.mark.parametrize("model", ["base", "helper"])
def test_a_streamed_tool_call_is_relayed(tenant_with_adapter: TenantHandle, stack: RunningStack, model: str) -> None:
    name = stack.info["base_model"] if model == "base" else model
    stream = tenant_with_adapter.client().chat.completions.create(
        model=name, messages=QUESTION, tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False, max_tokens=256,
        temperature=0, stream=True, stream_options={"include_usage": True})
    names, arguments, models, usage = [], "", set(), None
    for chunk in stream:
        models.add(chunk.model)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                if delta.function and delta.function.arguments:
                    arguments += delta.function.arguments
    assert models == {name}
    assert names == ["get_weather"]
    assert json.loads(arguments)["city"] in CITIES
    assert usage is not None and usage.completion_tokens > 0
