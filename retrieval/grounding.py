"""Put retrieved passages in front of the model, numbered, so that it can cite them.

The context is a block of numbered sources (``[n] title (date)`` then the text) after a short
instruction to cite ``[n]`` and to prefer newer sources when they disagree. It is budgeted in
characters (``budget_chars``): passages go in best first until one does not fit, which is cut at a
sentence or word boundary when a useful part of it fits (else left out) and ends the context. The
passages that made it in are the ``sources`` (``[n]`` is ``sources[n-1]``). Fewer, better passages
beat a long context.

Each request surface has a :class:`Grounder` that knows where its query is and where the context
goes: chat puts it in the system message, a completion in front of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from retrieval.documents import Passage
from retrieval.errors import InvalidQuery

INSTRUCTIONS = ("Use the numbered sources below to answer. Cite every source you use as [n]. When sources "
                "disagree, prefer the newer one (dates in parentheses). If they do not contain the answer, "
                "say so.")
MIN_PART_CHARS = 160


@dataclass(frozen=True, slots=True)
class Context:
    text: str
    passages: list[Passage]


def build_context(passages: Sequence[Passage], *, budget_chars: int) -> Context:
    """The numbered sources that fit in ``budget_chars`` (the instruction line not counted)."""
    blocks: list[str] = []
    used: list[Passage] = []
    remaining = budget_chars
    for passage in passages:
        header = f"[{len(used) + 1}] " + (f"{passage.title} " if passage.title else "") + f"({_date(passage)})\n"
        room = remaining - len(header)
        fits = len(passage.text) <= room
        text = passage.text if fits else _clip(passage.text, room)
        if not text:
            break
        blocks.append(header + text)
        used.append(passage)
        if not fits:  # a cut passage spends the budget: nothing less relevant squeezes in after it
            break
        remaining -= len(header) + len(text) + 2
    if not used:
        return Context(text="", passages=[])
    return Context(text=INSTRUCTIONS + "\n\n" + "\n\n".join(blocks), passages=used)


def _date(passage: Passage) -> str:
    return datetime.fromtimestamp(passage.timestamp, UTC).strftime("%Y-%m-%d")


def _clip(text: str, room: int) -> str:
    """The longest head of ``text`` within ``room`` characters that ends at a sentence (else a word)
    boundary, marked with an ellipsis; empty when that would be too short to be useful."""
    if room < MIN_PART_CHARS:
        return ""
    head = text[:room - 1]
    for cut in (max(head.rfind(". "), head.rfind("! "), head.rfind("? ")) + 1, head.rfind(" ")):
        if cut >= MIN_PART_CHARS:
            return head[:cut].rstrip() + "…"
    return head.rstrip() + "…"


class Grounder(Protocol):
    def query(self, body: dict[str, Any]) -> str:
        """The text to retrieve for; :class:`InvalidQuery` when the request has none."""
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
        raise InvalidQuery("`rag` needs a last user message with text to retrieve for.", param="messages")

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
            raise InvalidQuery("`rag` needs `prompt` to be one string (not token ids or a list).", param="prompt")
        if not prompt.strip():
            raise InvalidQuery("`rag` needs a non-empty `prompt` to retrieve for.", param="prompt")
        return prompt

    def apply(self, body: dict[str, Any], context: str) -> None:
        body["prompt"] = context + "\n\n" + body["prompt"]


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return ""
