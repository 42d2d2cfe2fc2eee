"""The two generation surfaces, chat and completions: where the engine serves each, the label its metrics
carry, and how ``rag`` grounds it (where its query is, how long its prompt is, where the context goes).

Each request class of :mod:`gateway.openai_api.protocol` names its surface, so the service picks it from
the request, not from a URL. The grounders read and rewrite the engine request body (a plain dict, the
OpenAI shape); retrieval itself never sees a request body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import InvalidRequest
from retrieval.context import TokenCounter

_TOKENS_PER_MESSAGE = 8
"""What a chat template adds around one message (role markers, separators), rounded up."""


class Grounder(Protocol):
    def query(self, body: dict[str, Any]) -> str:
        """The text to retrieve for; :class:`InvalidRequest` when the request has none."""
        ...

    def prompt_tokens(self, body: dict[str, Any], tokens: TokenCounter) -> int:
        """About how many tokens the prompt takes before any context is added (rounded up)."""
        ...

    def apply(self, body: dict[str, Any], context: str) -> None:
        """Rewrite the engine request body in place so that the model sees ``context`` first."""
        ...


class ChatGrounder:
    """Retrieves for the last user message; the context goes into the (first) system message."""

    def query(self, body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                text = _message_text(message.get("content"))
                if text.strip():
                    return text
                break
        raise InvalidRequest("`rag` needs a last user message with text to retrieve for.", param="messages")

    def prompt_tokens(self, body: dict[str, Any], tokens: TokenCounter) -> int:
        """The messages' text, and the JSON of the ``tools`` and of the assistants' ``tool_calls`` (a tool-calling
        chat template writes both into the prompt)."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        parts = [_message_text(m.get("content")) for m in messages]
        parts += [json.dumps(m["tool_calls"]) for m in messages if m.get("tool_calls")]
        if body.get("tools"):
            parts.append(json.dumps(body["tools"]))
        return tokens.count("\n".join(parts)) + _TOKENS_PER_MESSAGE * (len(messages) + 1)

    def apply(self, body: dict[str, Any], context: str) -> None:
        messages = list(body["messages"])
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
            messages[0] = {**first, "content": first["content"].rstrip() + "\n\n" + context}
        elif isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), list):
            messages[0] = {**first, "content": [*first["content"], {"type": "text", "text": context}]}
        else:
            messages.insert(0, {"role": "system", "content": context})
        body["messages"] = messages


class PromptGrounder:
    """Retrieves for the prompt (one string); the context goes in front of it."""

    def query(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequest("`rag` needs `prompt` to be one string (not token ids or a list).", param="prompt")
        if not prompt.strip():
            raise InvalidRequest("`rag` needs a non-empty `prompt` to retrieve for.", param="prompt")
        return prompt

    def prompt_tokens(self, body: dict[str, Any], tokens: TokenCounter) -> int:
        prompt = body.get("prompt")
        return tokens.count(prompt if isinstance(prompt, str) else "") + _TOKENS_PER_MESSAGE

    def apply(self, body: dict[str, Any], context: str) -> None:
        body["prompt"] = context + "\n\n" + body["prompt"]


@dataclass(frozen=True, slots=True)
class Surface:
    path: str
    """The engine's route for it (the same path as the gateway's)."""
    label: str
    """The ``endpoint`` label of its metrics."""
    grounder: Grounder


CHAT = Surface(path="/v1/chat/completions", label="chat", grounder=ChatGrounder())
COMPLETIONS = Surface(path="/v1/completions", label="completions", grounder=PromptGrounder())


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return ""
