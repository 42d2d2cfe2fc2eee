"""The dev models' tool-call chat templates (what ``banyan dev`` gives the engine with ``--chat-template``),
rendered the way vLLM renders them (``apply_chat_template``): conversations without tools come out exactly as
the models' own templates make them (the demo adapters were trained on those), and tools, tool calls and tool
results come out in the hermes style that vLLM's ``hermes`` parser reads back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.dev.demo_model import CHAT_TEMPLATE as TINY_TEMPLATE
from gateway.dev.demo_model import _build_tokenizer
from gateway.dev.models import DEV_MODELS, TEMPLATES_DIR

SMOLLM2_TEMPLATE = (  # the template SmolLM2-135M-Instruct's GGUF carries (what gateway/dev/smollm2.py writes)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
OWN_TEMPLATES = {"tiny": TINY_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye\nnow"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return _build_tokenizer()


def _render(tokenizer: Any, template: str, messages: list[dict[str, Any]], *, tools: list[Any] | None = None,
            generation: bool = True) -> str:
    rendered: str = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation)
    return rendered


def _template(name: str) -> str:
    model = DEV_MODELS[name]
    assert model.chat_template is not None
    return (TEMPLATES_DIR / model.chat_template).read_text()


@pytest.mark.parametrize("name", sorted(DEV_MODELS))
def test_every_dev_model_serves_tool_calls_with_the_hermes_parser(name: str) -> None:
    args = DEV_MODELS[name].engine_args()
    assert args[:2] == ["--chat-template", str(TEMPLATES_DIR / DEV_MODELS[name].chat_template)]  # type: ignore[operator]
    assert args[2:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


@pytest.mark.parametrize("name", sorted(OWN_TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation", [True, False])
def test_without_tools_it_renders_as_the_models_own_template(tokenizer: Any, name: str,
                                                             messages: list[dict[str, Any]], generation: bool) -> None:
    assert (_render(tokenizer, _template(name), messages, generation=generation)
            == _render(tokenizer, OWN_TEMPLATES[name], messages, generation=generation))


ROUND_TRIP = [
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 5}'},
]


@pytest.mark.parametrize("name", sorted(OWN_TEMPLATES))
def test_tools_calls_and_results_render_in_the_hermes_style(tokenizer: Any, name: str) -> None:
    text = _render(tokenizer, _template(name), ROUND_TRIP, tools=[WEATHER])
    tools = text[text.index("<tools>\n") + len("<tools>\n"):text.index("\n</tools>")]
    assert json.loads(tools) == WEATHER
    assert "You help with travel." in text
    calls = [json.loads(chunk.split("\n</tool_call>")[0]) for chunk in text.split("<tool_call>\n")[2:]]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                     {"name": "get_weather", "arguments": {"city": "Bergen"}}]
    assert text.count("<tool_response>\n") == 2 and '{"temp_c": 5}\n</tool_response>' in text
    assert "None" not in text  # a call without text content renders no "None"
    assert text.endswith("<|assistant|>\n" if name == "tiny" else "<|im_start|>assistant\n")


def test_smollm2_keeps_one_system_message_with_the_tools(tokenizer: Any) -> None:
    text = _render(tokenizer, _template("smollm2"), ROUND_TRIP, tools=[WEATHER])
    assert text.count("<|im_start|>system\n") == 1
    assert text.startswith("<|im_start|>system\nYou help with travel.\n\n# Tools\n")
    default = _render(tokenizer, _template("smollm2"), ROUND_TRIP[1:2], tools=[WEATHER])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
