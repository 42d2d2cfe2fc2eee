"""Chunking at paragraph and sentence boundaries, with overlap, sized so that the embedder reads every
chunk whole (title included): with a word-counting fake for the packing rules, and with the real
all-MiniLM-L6-v2 tokenizer on long prose, Markdown and text without spaces."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence

import pytest

from retrieval.chunking import Chunk, ChunkingConfig, EmbeddingTokenizer, chunk_document
from retrieval.embedding import SentenceTransformerEmbedder
from tests.unit.retrieval.conftest import WordTokenizer


def _sentence(i: int, words: int = 12) -> str:
    return f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + " ends."


def _chunks(text: str, config: ChunkingConfig | None = None, *, title: str | None = None,
            tokenizer: EmbeddingTokenizer | None = None) -> list[Chunk]:
    return chunk_document(text, title=title, tokenizer=tokenizer or WordTokenizer(), config=config)


def _texts(text: str, config: ChunkingConfig | None = None) -> list[str]:
    return [c.text for c in _chunks(text, config)]


def _tokens(text: str) -> int:
    """Tokens without the special ones, as the fake counts them."""
    return WordTokenizer().count_tokens([text])[0] - 2


# -- the packing rules (word-counting fake) ------------------------------------------------------


def test_blank_text_has_no_chunks() -> None:
    assert _chunks("   \n\n  ", title="A title") == []


def test_short_text_is_one_chunk_with_whitespace_normalised() -> None:
    assert _chunks("Hello   there.\nSecond  line here.") == [Chunk("Hello there. Second line here.",
                                                                    "Hello there. Second line here.")]
    assert _chunks("Hello there.", title="  Greetings \n") == [Chunk("Hello there.", "Greetings\nHello there.")]


def test_long_text_chunks_stay_within_bounds_and_cover_every_sentence() -> None:
    config = ChunkingConfig()
    sentences = [_sentence(i) for i in range(200)]
    paragraphs = ["  ".join(sentences[i:i + 7]) for i in range(0, 200, 7)]
    chunks = _chunks("\n\n".join(paragraphs), config, title="Minutes")
    assert len(chunks) > 5
    assert all(WordTokenizer().count_tokens([c.embedded])[0] <= 256 for c in chunks)
    for chunk in chunks[:-1]:
        assert _tokens(chunk.text) >= config.min_tokens
    joined = "\n".join(c.text for c in chunks)
    assert all(s in joined for s in sentences)


def test_consecutive_chunks_overlap_by_whole_sentences() -> None:
    config = ChunkingConfig()
    sentences = [_sentence(i) for i in range(120)]
    chunks = _texts(" ".join(sentences), config)
    assert len(chunks) > 2
    for previous, current in itertools.pairwise(chunks):
        carried = [s for s in sentences if s in previous and s in current]
        assert carried, "no overlap"
        assert current.startswith(carried[0]) and previous.endswith(carried[-1])  # whole sentences, in order
        assert 0 < _tokens(" ".join(carried)) <= config.overlap_tokens


def test_a_chunk_prefers_to_end_at_a_paragraph() -> None:
    config = ChunkingConfig(min_tokens=20, target_tokens=60, max_tokens=80, overlap_tokens=0)
    first = " ".join(_sentence(i) for i in range(2))   # about 30 tokens: past min_tokens
    second = " ".join(_sentence(i) for i in range(2, 4))
    assert _texts(first + "\n\n" + second, config) == [first, second]


def test_a_sentence_longer_than_the_target_is_split_into_windows() -> None:
    config = ChunkingConfig(min_tokens=20, target_tokens=50, max_tokens=60, overlap_tokens=10)
    text = " ".join(f"word{i}" for i in range(400))  # no punctuation at all
    chunks = _texts(text, config)
    assert all(_tokens(c) <= 60 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # windows, no overlap needed inside one sentence


def test_the_overlap_gives_way_when_the_next_sentence_would_not_fit() -> None:
    config = ChunkingConfig(min_tokens=20, target_tokens=50, max_tokens=60, overlap_tokens=15)
    long_one = "Long " + " ".join(f"l{j}" for j in range(47)) + " end."  # 50 tokens: the target
    text = " ".join([_sentence(0), _sentence(1), _sentence(2), _sentence(3), long_one, _sentence(4)])
    chunks = _texts(text, config)
    assert all(_tokens(c) <= 60 for c in chunks)
    assert any(c.startswith(long_one) for c in chunks)  # the 12-token overlap before it was dropped
    assert all(s in " ".join(chunks) for s in (long_one, _sentence(4)))


def test_the_title_takes_its_room_from_every_chunk() -> None:
    tokenizer = WordTokenizer(max_tokens=128)
    config = ChunkingConfig(min_tokens=40, target_tokens=100, max_tokens=200, overlap_tokens=10)
    title = " ".join(f"t{i}" for i in range(30))
    chunks = _chunks(" ".join(_sentence(i) for i in range(60)), config, title=title, tokenizer=tokenizer)
    counts = tokenizer.count_tokens([c.embedded for c in chunks])
    assert all(c.embedded == title + "\n" + c.text for c in chunks)
    assert max(counts) <= 128 and max(counts) > 120  # 2 special + 30 title + up to 96 of text, and used


def test_a_long_title_is_clipped_in_the_embedded_text_only() -> None:
    config = ChunkingConfig()
    title = " ".join(f"title{i}" for i in range(500))
    chunks = _chunks(" ".join(_sentence(i) for i in range(60)), config, title=title)
    head = " ".join(f"title{i}" for i in range(config.max_title_tokens)) + "\n"
    assert chunks and all(c.embedded == head + c.text for c in chunks)
    assert all(WordTokenizer().count_tokens([c.embedded])[0] <= 256 for c in chunks)


class _SpacesCountTokenizer(WordTokenizer):
    """A tokenizer whose counts do not add up: every space is a token too, so a join costs more than
    its parts."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [n + text.count(" ") for n, text in zip(super().count_tokens(texts), texts, strict=True)]


def test_chunks_still_fit_when_counts_do_not_add_up() -> None:
    tokenizer = _SpacesCountTokenizer(max_tokens=64)
    config = ChunkingConfig(min_tokens=20, target_tokens=40, max_tokens=64, overlap_tokens=5)
    text = "\n\n".join(" ".join(_sentence(i + 3 * p, words=5) for i in range(3)) for p in range(30))
    chunks = _chunks(text, config, title="Notes", tokenizer=tokenizer)
    assert max(tokenizer.count_tokens([c.embedded for c in chunks])) <= 64
    assert set(text.split()) <= set(" ".join(c.text for c in chunks).split())


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ChunkingConfig(min_tokens=300, target_tokens=200)
    with pytest.raises(ValueError):
        ChunkingConfig(overlap_tokens=250)
    with pytest.raises(ValueError):
        ChunkingConfig(max_title_tokens=-1)


# -- the real tokenizer of all-MiniLM-L6-v2 -------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()  # counting reads only tokenizer.json: the model is not loaded


_COMMON = ["the", "a", "of", "to", "and", "in", "for", "on", "with", "by", "from", "at", "as", "is", "was",
           "were", "will", "be", "has", "have", "had", "this", "that", "which", "after", "before", "during",
           "under", "over", "between", "report", "team", "budget", "office", "schedule", "review", "release",
           "plan", "customer", "support", "contract", "supplier", "warehouse", "shipment", "invoice",
           "quarterly", "committee", "approved"]


def _invented(rng: random.Random) -> str:
    """A made-up name: several word pieces each, as in the documents tenants really upload."""
    syllables = ["thr", "ael", "vik", "oss", "ua", "rel", "zyn", "qu", "orb", "ix", "kel", "dra", "mun", "ph"]
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize()


def _prose(seed: int, paragraphs: int = 40) -> str:
    rng = random.Random(seed)

    def sentence() -> str:
        words = []
        for _ in range(rng.randint(10, 30)):
            roll = rng.random()
            if roll < 0.25:
                words.append(_invented(rng))
            elif roll < 0.32:
                words.append(f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}")
            elif roll < 0.36:
                words.append(f"{_invented(rng).lower()}-{rng.choice(_COMMON)}")
            else:
                words.append(rng.choice(_COMMON))
        return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ";"])

    return "\n\n".join(" ".join(sentence() for _ in range(rng.randint(3, 12))) for _ in range(paragraphs))


def _markdown(seed: int) -> str:
    rng = random.Random(seed)
    parts = []
    for section in range(15):
        parts.append(f"## {section}. {_invented(rng)} {rng.choice(_COMMON)} `{_invented(rng).lower()}_id`")
        parts.append("\n".join(f"- **{_invented(rng)}**: see [{_invented(rng)}](https://example.com/"
                               f"{_invented(rng).lower()}/{rng.randint(1, 10**6)}?ref=a&b=c#x) (v{rng.randint(1, 9)}"
                               f".{rng.randint(0, 20)})" for _ in range(rng.randint(3, 9))))
        parts.append("| name | id | price | notes |\n|---|---|---|---|\n" + "\n".join(
            f"| {_invented(rng)} | `{rng.getrandbits(64):x}` | ${rng.randint(1, 999)}.{rng.randint(0, 99):02d} "
            f"| {_invented(rng)}/{_invented(rng)} |" for _ in range(rng.randint(5, 25))))
        parts.append("```python\n" + "\n".join(
            f"{_invented(rng).lower()}_{i} = fetch({{'key': '{_invented(rng)}', 'n': {rng.randint(0, 99)}}})[{i}]"
            for i in range(rng.randint(4, 20))) + "\n```")
        parts.append(_prose(seed * 100 + section, paragraphs=2))
    return "\n\n".join(parts)


def _assert_read_whole(chunks: list[Chunk], minilm: SentenceTransformerEmbedder) -> list[int]:
    counts = minilm.count_tokens([c.embedded for c in chunks])
    assert max(counts) <= minilm.max_tokens == 256
    return counts


@pytest.mark.parametrize("kind", ["prose", "markdown"])
def test_no_chunk_is_cut_by_the_embedder(minilm: SentenceTransformerEmbedder, kind: str) -> None:
    text = _prose(3) if kind == "prose" else _markdown(5)
    title = "Quarterly operations handbook of the Thraelvik and Ossuarel subsidiaries (revised)"
    chunks = chunk_document(text, title=title, tokenizer=minilm)
    assert len(chunks) > 10
    counts = _assert_read_whole(chunks, minilm)
    assert sum(counts) / len(counts) > 160  # the room is used, not wasted on tiny chunks
    assert set(text.split()) <= set(" ".join(c.text for c in chunks).split())  # every word is in a chunk


def test_the_old_estimate_would_have_cut_these_texts(minilm: SentenceTransformerEmbedder) -> None:
    """The positive control: counting words and punctuation marks (the old estimate) is far from what
    the embedder reads on such text, so the limit above holds because of the real tokenizer."""
    for text in (_prose(3), _markdown(5)):
        words = [w for w in re.split(r"\s+", text) if w]
        estimate = sum(len(re.findall(r"\w+|[^\w\s]", w)) for w in words)
        real = sum(n - 2 for n in minilm.count_tokens(words))
        assert real > 1.25 * estimate


def test_text_without_spaces_and_enormous_words_are_cut_to_fit(minilm: SentenceTransformerEmbedder) -> None:
    cjk = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(3000))  # one "sentence", one char a token
    blob = "".join(random.Random(1).choice("abcdefABCDEF0123456789+/=.") for _ in range(6000))
    for text in (cjk, blob, f"See {blob} and then {cjk} at the end."):
        chunks = chunk_document(text, title="Appendix", tokenizer=minilm)
        _assert_read_whole(chunks, minilm)
        assert "".join("".join(c.text.split()) for c in chunks) == "".join(text.split())


def test_a_title_longer_than_the_embedder_reads_leaves_room_for_text(minilm: SentenceTransformerEmbedder) -> None:
    title = ". ".join(_invented(random.Random(i)) for i in range(300))[:1024]  # the longest title allowed
    chunks = chunk_document(_prose(8, paragraphs=6), title=title, tokenizer=minilm)
    _assert_read_whole(chunks, minilm)
    head = chunks[0].embedded[:-len(chunks[0].text)]
    assert title.startswith(head.rstrip("\n")) and minilm.count_tokens([head])[0] - 2 <= 48
