"""Split a document into overlapping chunks at paragraph and sentence boundaries.

The text is cut into units (sentences, each marked when it starts a paragraph; a sentence longer
than the target is split into word windows). Units are packed greedily into chunks of about
``target_tokens``: a chunk ends before a unit that would push it past ``max_tokens``, before a new
paragraph once it holds ``min_tokens``, and after any sentence once it holds ``target_tokens``.
Each new chunk starts with the last sentences of the previous one (up to ``overlap_tokens``), so a
fact that straddles a boundary is whole in at least one chunk.

Tokens are counted approximately (words and punctuation marks), which is close to a WordPiece count
for ordinary prose and needs no tokenizer. The title is not part of the chunk text: the caller keeps
it beside every chunk (it is embedded and indexed with each one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    min_tokens: int = 200
    target_tokens: int = 256
    max_tokens: int = 384
    overlap_tokens: int = 48

    def __post_init__(self) -> None:
        if not 0 < self.min_tokens <= self.target_tokens <= self.max_tokens:
            raise ValueError("chunking needs 0 < min_tokens <= target_tokens <= max_tokens")
        if not 0 <= self.overlap_tokens < self.min_tokens:
            raise ValueError("chunking needs 0 <= overlap_tokens < min_tokens")


@dataclass(frozen=True, slots=True)
class _Unit:
    text: str
    tokens: int
    paragraph_start: bool


def count_tokens(text: str) -> int:
    """An approximate token count: words and punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def chunk_text(text: str, config: ChunkingConfig | None = None) -> list[str]:
    """The chunks of ``text`` in order; empty for blank text."""
    config = config or ChunkingConfig()
    chunks: list[str] = []
    current: list[_Unit] = []
    size = 0
    fresh = 0  # units in ``current`` that are not overlap carried over from the previous chunk
    for unit in _units(text, config):
        if current and fresh and _ends_before(unit, size, config):
            chunks.append(_join(current))
            current = _overlap(current, config.overlap_tokens)
            size = sum(u.tokens for u in current)
            fresh = 0
        current.append(unit)
        size += unit.tokens
        fresh += 1
    if fresh:
        chunks.append(_join(current))
    return chunks


def _ends_before(unit: _Unit, size: int, config: ChunkingConfig) -> bool:
    return (size + unit.tokens > config.max_tokens or size >= config.target_tokens
            or (unit.paragraph_start and size >= config.min_tokens))


def _units(text: str, config: ChunkingConfig) -> list[_Unit]:
    units: list[_Unit] = []
    for paragraph in _PARAGRAPH_RE.split(text.replace("\r\n", "\n")):
        first = True
        for sentence in _SENTENCE_END_RE.split(paragraph.strip()):
            sentence = " ".join(sentence.split())
            if not sentence:
                continue
            for piece in _split_long(sentence, config.target_tokens):
                units.append(_Unit(piece, count_tokens(piece), first))
                first = False
    return units


def _split_long(sentence: str, limit: int) -> list[str]:
    """A sentence above ``limit`` tokens, as word windows of at most ``limit`` tokens each."""
    if count_tokens(sentence) <= limit:
        return [sentence]
    pieces: list[str] = []
    words: list[str] = []
    size = 0
    for word in sentence.split(" "):
        tokens = count_tokens(word)
        if words and size + tokens > limit:
            pieces.append(" ".join(words))
            words, size = [], 0
        if tokens > limit:  # one enormous "word" (a URL, a base64 blob): cut it by characters
            pieces.extend(word[i:i + limit] for i in range(0, len(word), limit))
            continue
        words.append(word)
        size += tokens
    if words:
        pieces.append(" ".join(words))
    return pieces


def _overlap(units: list[_Unit], budget: int) -> list[_Unit]:
    tail: list[_Unit] = []
    size = 0
    for unit in reversed(units):
        if size + unit.tokens > budget:
            break
        tail.append(unit)
        size += unit.tokens
    if len(tail) == len(units):  # never carry a whole chunk over
        tail = tail[:-1]
    return [_Unit(u.text, u.tokens, False) for u in reversed(tail)]


def _join(units: list[_Unit]) -> str:
    parts: list[str] = []
    for i, unit in enumerate(units):
        if i:
            parts.append("\n\n" if unit.paragraph_start else " ")
        parts.append(unit.text)
    return "".join(parts)
