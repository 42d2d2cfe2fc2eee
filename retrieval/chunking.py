"""Split a document into overlapping chunks that the embedder reads whole.

The embedder reads at most ``EmbeddingTokenizer.max_tokens`` tokens of its own tokenizer (special tokens
included) and silently drops the rest, and it reads the title in front of every chunk
(``title + "\\n" + chunk``). So the sizes here are counted with that tokenizer, and each chunk's
limit is what the embedder leaves after its special tokens and the document's title (a title longer
than ``max_title_tokens`` is clipped in the embedded text only; the stored title stays whole).

The text is cut into units (sentences, each marked when it starts a paragraph; a sentence longer
than the target is split into word windows, a "word" longer than that by characters). Units are
packed greedily into chunks of about ``target_tokens``: a chunk ends before a unit that would push it
past the limit, before a new paragraph once it holds ``min_tokens``, and after any sentence once it
holds ``target_tokens``. Each new chunk starts with the last sentences of the previous one (up to
``overlap_tokens``, fewer when the next unit would not fit), so a fact that straddles a boundary is
whole in at least one chunk.

Counts of units add up to the count of their join (a WordPiece tokenizer splits at whitespace first),
and every unit fits in the limit, so packing keeps each chunk within it by construction; a last check
counts every embedded text as a whole and splits any chunk that a tokenizer with other habits would
still cut. Blocking (the tokenizer runs here): callers run it off the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")


class EmbeddingTokenizer(Protocol):
    """The reader's tokenizer, as far as chunking needs it (the :class:`retrieval.embedding.Embedder`)."""

    @property
    def max_tokens(self) -> int:
        """The most tokens the reader reads, special tokens included; it drops the rest."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the reader makes of each text, special tokens included, nothing cut. Blocking."""
        ...


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    """Sizes in tokens of the embedder's tokenizer. ``max_tokens`` is an upper bound: the real limit of a
    document's chunks is the smaller of it and what the embedder leaves after the title."""

    min_tokens: int = 128
    target_tokens: int = 192
    max_tokens: int = 256
    overlap_tokens: int = 32
    max_title_tokens: int = 48

    def __post_init__(self) -> None:
        if not 0 < self.min_tokens <= self.target_tokens <= self.max_tokens:
            raise ValueError("chunking needs 0 < min_tokens <= target_tokens <= max_tokens")
        if not 0 <= self.overlap_tokens < self.min_tokens:
            raise ValueError("chunking needs 0 <= overlap_tokens < min_tokens")
        if self.max_title_tokens < 0:
            raise ValueError("chunking needs max_title_tokens >= 0")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    """The chunk as stored, retrieved and shown (without the title)."""
    embedded: str
    """What the embedder reads: the (clipped) title, a newline, the text; never more than it reads."""


@dataclass(frozen=True, slots=True)
class _Sizes:
    min: int
    target: int
    max: int
    overlap: int


@dataclass(frozen=True, slots=True)
class _Unit:
    text: str
    tokens: int
    paragraph_start: bool


class _Counts:
    """``EmbeddingTokenizer`` counts without the special tokens, so that the parts of a text add up."""

    def __init__(self, tokenizer: EmbeddingTokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = tokenizer.count_tokens([""])[0]

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return [n - self.special for n in self.tokenizer.count_tokens(texts)] if texts else []

    def one(self, text: str) -> int:
        return self([text])[0]


def chunk_document(text: str, *, title: str | None, tokenizer: EmbeddingTokenizer,
                   config: ChunkingConfig | None = None) -> list[Chunk]:
    """The chunks of ``text`` in order (empty for blank text); each ``embedded`` text, title included,
    is at most ``tokenizer.max_tokens`` tokens."""
    config = config or ChunkingConfig()
    counts = _Counts(tokenizer)
    head = ""
    if title:
        head = _head_within(title, config.max_title_tokens, counts) + "\n"
    limit = min(config.max_tokens, tokenizer.max_tokens - counts.special - counts.one(head))
    if limit < 1:
        raise ValueError(f"the embedder reads {tokenizer.max_tokens} tokens: no room for any text")
    target = min(config.target_tokens, limit)
    minimum = min(config.min_tokens, target)
    sizes = _Sizes(min=minimum, target=target, max=limit, overlap=min(config.overlap_tokens, minimum - 1))
    texts = _pack(_units(text, sizes, counts), sizes)
    fitted = _fit_all(texts, head, tokenizer)
    return [Chunk(text=t, embedded=head + t) for t in fitted]


def _pack(units: list[_Unit], sizes: _Sizes) -> list[str]:
    chunks: list[str] = []
    current: list[_Unit] = []
    size = 0
    fresh = 0  # units in ``current`` that are not overlap carried over from the previous chunk
    for unit in units:
        if fresh and _ends_before(unit, size, sizes):
            chunks.append(_join(current))
            current = _overlap(current, sizes.overlap)
            size = sum(u.tokens for u in current)
            fresh = 0
        while current and not fresh and size + unit.tokens > sizes.max:  # the overlap leaves no room
            size -= current.pop(0).tokens
        current.append(unit)
        size += unit.tokens
        fresh += 1
    if fresh:
        chunks.append(_join(current))
    return chunks


def _ends_before(unit: _Unit, size: int, sizes: _Sizes) -> bool:
    return (size + unit.tokens > sizes.max or size >= sizes.target
            or (unit.paragraph_start and size >= sizes.min))


def _units(text: str, sizes: _Sizes, counts: _Counts) -> list[_Unit]:
    sentences: list[tuple[str, bool]] = []
    for paragraph in _PARAGRAPH_RE.split(text.replace("\r\n", "\n")):
        first = True
        for sentence in _SENTENCE_END_RE.split(paragraph.strip()):
            sentence = " ".join(sentence.split())
            if sentence:
                sentences.append((sentence, first))
                first = False
    units: list[_Unit] = []
    for (sentence, first), tokens in zip(sentences, counts([s for s, _ in sentences]), strict=True):
        if tokens <= sizes.target:
            units.append(_Unit(sentence, tokens, first))
            continue
        for piece, piece_tokens in _split_long(sentence, sizes.target, counts):
            units.append(_Unit(piece, piece_tokens, first))
            first = False
    return units


def _split_long(sentence: str, limit: int, counts: _Counts) -> list[tuple[str, int]]:
    """A sentence above ``limit`` tokens, as word windows of at most ``limit`` tokens each."""
    pieces: list[tuple[str, int]] = []
    words: list[str] = []
    size = 0
    split = sentence.split(" ")
    for word, tokens in zip(split, counts(split), strict=True):
        if words and size + tokens > limit:
            pieces.append((" ".join(words), size))
            words, size = [], 0
        if tokens > limit:  # one enormous "word" (a URL, a base64 blob, text without spaces): cut it
            cut = _halve(word, lambda piece: counts.one(piece) <= limit)
            pieces.extend(zip(cut, counts(cut), strict=True))
            continue
        words.append(word)
        size += tokens
    if words:
        pieces.append((" ".join(words), size))
    return pieces


def _head_within(text: str, budget: int, counts: _Counts) -> str:
    """The longest head of ``text`` (whole words if possible) of at most ``budget`` tokens."""
    text = " ".join(text.split())
    if counts.one(text) <= budget:
        return text
    words = text.split(" ")
    low, high = 0, len(words) - 1  # the most words that fit: at least ``low``, fewer than ``high + 1``
    while low < high:
        mid = (low + high + 1) // 2
        if counts.one(" ".join(words[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    if low:
        return " ".join(words[:low])
    first = words[0]
    low, high = 0, len(first) - 1
    while low < high:
        mid = (low + high + 1) // 2
        if counts.one(first[:mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    return first[:low]


def _fit_all(texts: list[str], head: str, tokenizer: EmbeddingTokenizer) -> list[str]:
    """The check on the whole embedded texts: a chunk over the limit (a tokenizer whose counts do not
    add up at whitespace) is split in two, at the space nearest its middle, until each part fits."""
    if not texts:
        return texts
    fitted: list[str] = []
    for text, tokens in zip(texts, tokenizer.count_tokens([head + t for t in texts]), strict=True):
        if tokens <= tokenizer.max_tokens:
            fitted.append(text)
        else:
            fitted.extend(_halve(text, lambda piece: tokenizer.count_tokens([head + piece])[0] <= tokenizer.max_tokens))
    return fitted


def _halve(text: str, fits: Callable[[str], bool]) -> list[str]:
    """``text`` if it fits, else its halves (cut at the last space before the middle, else at the
    middle), each halved again until it fits (a single character is kept as it is)."""
    if len(text) < 2 or fits(text):
        return [text]
    middle = len(text) // 2
    space = text.rfind(" ", 0, middle)
    cut = space if space > 0 else middle
    return [piece for part in (text[:cut].rstrip(), text[cut:].lstrip()) if part for piece in _halve(part, fits)]


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
