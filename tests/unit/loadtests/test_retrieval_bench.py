"""The retrieval benchmark's synthetic filler text: the fast paragraph keeps the shape of the slow one."""

from __future__ import annotations

from collections import Counter

from loadtests.retrieval_bench import Text


def test_filler_paragraphs_have_the_sentences_and_vocabulary_of_real_ones() -> None:
    text = Text(seed=3, vocabulary=2000)
    paragraph = text.filler_paragraph(9)
    sentences = [s for s in paragraph.split(". ") if s]
    assert len(sentences) == 9 and paragraph.endswith(".")
    for sentence in sentences:
        words = sentence.rstrip(".").split()
        assert 8 <= len(words) <= 22
        assert sentence[0].isupper()
    vocabulary = set(text.words)
    words = [w.strip(".").lower() for _ in range(50) for w in text.filler_paragraph(6).split()]
    assert set(words) <= vocabulary
    # Zipf-distributed like Text.paragraph: the commonest word is far commoner than the median one.
    counts = Counter(words).most_common()
    assert counts[0][0] == text.words[0] and counts[0][1] > 20 * counts[len(counts) // 2][1]
