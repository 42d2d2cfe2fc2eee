"""Numbered context within a token budget."""

from __future__ import annotations

from retrieval.context import INSTRUCTIONS, MIN_PART_TOKENS, CharEstimate, build_context
from retrieval.documents import Passage


class Words:
    """One token a whitespace-separated word: budgets read as word counts."""

    def count(self, text: str) -> int:
        return len(text.split())


def _p(n: int, text: str, title: str | None = "T", *, superseded: bool = False) -> Passage:
    return Passage(document_id=f"d{n}", chunk_id=f"d{n}:0", title=title, text=text, score=1.0,
                   timestamp=1714555800.0 + n * 86400, superseded=superseded)


def test_context_is_numbered_with_title_and_date() -> None:
    context = build_context([_p(1, "Alpha."), _p(2, "Beta.", title=None)], budget_tokens=1000, tokens=Words())
    assert context.text == INSTRUCTIONS + "\n\n[1] T (2024-05-02)\nAlpha.\n\n[2] (2024-05-03)\nBeta."
    assert [p.document_id for p in context.passages] == ["d1", "d2"]


def test_empty_context() -> None:
    assert build_context([], budget_tokens=1000, tokens=Words()).text == ""


def test_the_budget_counts_everything_and_cuts_at_a_sentence() -> None:
    long = " ".join(f"Sentence number {i} is here." for i in range(40))  # 200 words
    budget = 120
    context = build_context([_p(1, "Short one."), _p(2, long), _p(3, "Never.")], budget_tokens=budget,
                            tokens=Words())
    assert Words().count(context.text) <= budget
    assert [p.document_id for p in context.passages] == ["d1", "d2"]
    assert context.text.endswith("is here.…")
    assert "Never." not in context.text
    # the cut is the longest that fits: one more sentence would not
    assert Words().count(context.text) + 5 > budget


def test_a_first_passage_larger_than_the_budget_is_cut_not_dropped() -> None:
    context = build_context([_p(1, "word " * 500)], budget_tokens=300, tokens=Words())
    assert len(context.passages) == 1
    assert 300 - 10 < Words().count(context.text) <= 300


def test_a_fragment_too_short_to_help_is_left_out() -> None:
    room = Words().count(INSTRUCTIONS) + MIN_PART_TOKENS // 2
    context = build_context([_p(1, "word " * 500)], budget_tokens=room, tokens=Words())
    assert context.text == "" and context.passages == []


def test_char_estimate_errs_towards_more_tokens() -> None:
    assert CharEstimate().count("") == 0
    assert CharEstimate().count("abcd") == 1
    assert CharEstimate().count("abcde") == 2


def test_superseded_passages_are_left_out() -> None:
    context = build_context([_p(2, "Opens at 8."), _p(1, "Opens at 9.", superseded=True), _p(3, "Parking.")],
                            budget_tokens=1000, tokens=Words())
    assert [p.document_id for p in context.passages] == ["d2", "d3"]
    assert "Opens at 9." not in context.text and "[2] T (2024-05-04)\nParking." in context.text
