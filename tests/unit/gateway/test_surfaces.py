"""Where each surface's ``rag`` query is, how long its prompt is and where the context goes."""

from __future__ import annotations

import json

import pytest

from gateway.errors import InvalidRequest
from gateway.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.openai_api.surfaces import CHAT, COMPLETIONS, ChatGrounder, PromptGrounder


class CharTokens:
    def count(self, text: str) -> int:
        return len(text)


def test_each_request_class_names_its_surface() -> None:
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}], max_completion_tokens=7,
                                 max_tokens=9)
    assert chat.surface is CHAT and CHAT.path == "/v1/chat/completions" and CHAT.label == "chat"
    assert chat.output_tokens() == 7
    completion = CompletionRequest(model="m", prompt="p", max_tokens=5)
    assert completion.surface is COMPLETIONS and COMPLETIONS.label == "completions"
    assert completion.output_tokens() == 5
    assert CompletionRequest(model="m", prompt="p").output_tokens() is None


def test_chat_query_is_the_last_user_message() -> None:
    grounder = ChatGrounder()
    body = {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": [{"type": "text", "text": "new"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert grounder.query(body) == "new"
    for messages in ([{"role": "system", "content": "s"}], [{"role": "user", "content": "  "}],
                     [{"role": "user", "content": "q"}, {"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(InvalidRequest):
            grounder.query({"messages": messages})


def test_prompt_tokens_count_every_message_and_the_template() -> None:
    body = {"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "de"}]}
    # "abc\nde" and 8 a message plus 8 for the reply's header
    assert ChatGrounder().prompt_tokens(body, CharTokens()) == 6 + 8 * 3
    assert PromptGrounder().prompt_tokens({"prompt": "hello"}, CharTokens()) == 5 + 8


def test_prompt_tokens_count_tools_and_tool_calls() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    body = {"tools": tools, "messages": [{"role": "user", "content": "de"},
                                         {"role": "assistant", "content": None, "tool_calls": calls},
                                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    text = "\n".join(["de", "", "sunny", json.dumps(calls), json.dumps(tools)])
    assert ChatGrounder().prompt_tokens(body, CharTokens()) == len(text) + 8 * 4


def test_chat_context_goes_into_the_system_message() -> None:
    grounder = ChatGrounder()
    body = {"messages": [{"role": "user", "content": "q"}]}
    grounder.apply(body, "CTX")
    assert body["messages"] == [{"role": "system", "content": "CTX"}, {"role": "user", "content": "q"}]
    body = {"messages": [{"role": "system", "content": "Be kind. "}, {"role": "user", "content": "q"}]}
    grounder.apply(body, "CTX")
    assert body["messages"][0] == {"role": "system", "content": "Be kind.\n\nCTX"}
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "S"}]}]}
    grounder.apply(body, "CTX")
    assert body["messages"][0]["content"] == [{"type": "text", "text": "S"}, {"type": "text", "text": "CTX"}]


def test_prompt_grounder() -> None:
    grounder = PromptGrounder()
    body = {"prompt": "Continue"}
    assert grounder.query(body) == "Continue"
    grounder.apply(body, "CTX")
    assert body["prompt"] == "CTX\n\nContinue"
    for prompt in ([1, 2], ["a"], "   "):
        with pytest.raises(InvalidRequest):
            grounder.query({"prompt": prompt})
