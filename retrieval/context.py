"""The context a model reads: retrieved passages, numbered so that it can cite them, within a token budget.

The context is a short instruction (cite ``[n]``, prefer newer sources when they disagree) and then the
numbered sources, each ``[n] title (date)`` and its text. It is budgeted in tokens of the base model's
tokenizer (a :class:`TokenCounter`), instruction included: passages go in best first until one does not
fit, which is cut at a sentence (else word) boundary when a useful part of it fits (else left out) and
ends the context. The passages that made it in are the ``sources`` (``[n]`` is ``sources[n-1]``). Fewer,
better passages beat a long context.

Where the context goes in a request (a chat's system message, in front of a prompt) is the gateway's
business; this module knows nothing of any request format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from retrieval.documents import Passage

INSTRUCTIONS = ("Use the numbered sources below to answer. Cite every source you use as [n]. When sources "
                "disagree, prefer the newer one (dates in parentheses). If they do not contain the answer, "
                "say so.")
MIN_PART_TOKENS = 32
"""A cut passage shorter than this is left out: a fragment confuses more than it helps."""
_SEPARATOR = "\n\n"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class TokenCounter(Protocol):
    """Counts tokens of the base model's tokenizer (no special tokens)."""

    def count(self, text: str) -> int: ...


class CharEstimate:
    """A :class:`TokenCounter` for when the base model's tokenizer is not at hand: about four characters
    a token for English text with a BPE tokenizer, rounded up so that the estimate errs on the short side."""

    def count(self, text: str) -> int:
        return (len(text) + 3) // 4


@dataclass(frozen=True, slots=True)
class Context:
    text: str
    passages: list[Passage]


def build_context(passages: Sequence[Passage], *, budget_tokens: int, tokens: TokenCounter) -> Context:
    """The instruction and the numbered sources that fit in ``budget_tokens`` (empty when none fits).

    A passage that ranking found superseded (newer text about the same subject is among the results,
    ranked above it) is left out: a small model shown both an old and a new value picks either."""
    passages = [p for p in passages if not p.superseded]
    remaining = budget_tokens - tokens.count(INSTRUCTIONS + _SEPARATOR)
    blocks: list[str] = []
    used: list[Passage] = []
    for passage in passages:
        header = f"[{len(used) + 1}] " + (f"{passage.title} " if passage.title else "") + f"({_date(passage)})\n"
        room = remaining - tokens.count(header + _SEPARATOR)
        cost = tokens.count(passage.text)
        fits = cost <= room
        text = passage.text if fits else _clip(passage.text, room, tokens)
        if not text:
            break
        blocks.append(header + text)
        used.append(passage)
        if not fits:  # a cut passage spends the budget: nothing less relevant squeezes in after it
            break
        remaining = room - cost
    if not used:
        return Context(text="", passages=[])
    return Context(text=INSTRUCTIONS + _SEPARATOR + _SEPARATOR.join(blocks), passages=used)


def _date(passage: Passage) -> str:
    return datetime.fromtimestamp(passage.timestamp, UTC).strftime("%Y-%m-%d")


def _clip(text: str, room: int, tokens: TokenCounter) -> str:
    """The longest head of ``text`` that ends at a sentence (else a word) boundary and, with an ellipsis,
    fits in ``room`` tokens; empty when that would be shorter than :data:`MIN_PART_TOKENS`."""
    if room < MIN_PART_TOKENS:
        return ""
    for cuts in ([m.start() for m in _SENTENCE_END.finditer(text)], [m.start() for m in re.finditer(r"\s+", text)]):
        head = _longest_head(text, cuts, room, tokens)
        if head and tokens.count(head) >= MIN_PART_TOKENS:
            return head
    return ""


def _longest_head(text: str, cuts: list[int], room: int, tokens: TokenCounter) -> str:
    """Binary search over the cut points for the longest ``text[:cut] + "…"`` within ``room`` tokens."""
    best, low, high = "", 0, len(cuts) - 1
    while low <= high:
        middle = (low + high) // 2
        head = text[:cuts[middle]].rstrip() + "…"
        if tokens.count(head) <= room:
            best, low = head, middle + 1
        else:
            high = middle - 1
    return best
