"""Chunking at paragraph and sentence boundaries, with overlap and bounded sizes."""

from __future__ import annotations

import itertools

import pytest

from retrieval.chunking import ChunkingConfig, chunk_text, count_tokens


def _sentence(i: int, words: int = 12) -> str:
    return f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + " ends."


def test_blank_text_has_no_chunks() -> None:
    assert chunk_text("   \n\n  ") == []


def test_short_text_is_one_chunk_with_whitespace_normalised() -> None:
    assert chunk_text("Hello   there.\nSecond  line here.") == ["Hello there. Second line here."]


def test_long_text_chunks_stay_within_bounds_and_cover_every_sentence() -> None:
    config = ChunkingConfig()
    sentences = [_sentence(i) for i in range(200)]
    paragraphs = ["  ".join(sentences[i:i + 7]) for i in range(0, 200, 7)]
    chunks = chunk_text("\n\n".join(paragraphs), config)
    assert len(chunks) > 5
    for chunk in chunks:
        assert count_tokens(chunk) <= config.max_tokens
    for chunk in chunks[:-1]:
        assert count_tokens(chunk) >= config.min_tokens
    joined = "\n".join(chunks)
    assert all(s in joined for s in sentences)


def test_consecutive_chunks_overlap_by_whole_sentences() -> None:
    config = ChunkingConfig()
    sentences = [_sentence(i) for i in range(120)]
    chunks = chunk_text(" ".join(sentences), config)
    assert len(chunks) > 2
    for previous, current in itertools.pairwise(chunks):
        carried = [s for s in sentences if s in previous and s in current]
        assert carried, "no overlap"
        assert current.startswith(carried[0]) and previous.endswith(carried[-1])  # whole sentences, in order
        assert 0 < count_tokens(" ".join(carried)) <= config.overlap_tokens


def test_a_chunk_prefers_to_end_at_a_paragraph() -> None:
    config = ChunkingConfig(min_tokens=20, target_tokens=60, max_tokens=80, overlap_tokens=0)
    first = " ".join(_sentence(i) for i in range(2))   # about 30 tokens: past min_tokens
    second = " ".join(_sentence(i) for i in range(2, 4))
    chunks = chunk_text(first + "\n\n" + second, config)
    assert chunks == [first, second]


def test_a_sentence_longer_than_the_target_is_split_into_windows() -> None:
    config = ChunkingConfig(min_tokens=20, target_tokens=50, max_tokens=60, overlap_tokens=10)
    text = " ".join(f"word{i}" for i in range(400))  # no punctuation at all
    chunks = chunk_text(text, config)
    assert all(count_tokens(c) <= 60 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # windows, no overlap needed inside one sentence


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ChunkingConfig(min_tokens=300, target_tokens=200)
    with pytest.raises(ValueError):
        ChunkingConfig(overlap_tokens=250)
