"""Numbered context within a character budget, and where each surface puts it."""

from __future__ import annotations

import pytest

from retrieval.documents import Passage
from retrieval.errors import InvalidQuery
from retrieval.grounding import INSTRUCTIONS, ChatGrounder, PromptGrounder, build_context


def _p(n: int, text: str, title: str | None = "T") -> Passage:
    return Passage(document_id=f"d{n}", chunk_id=f"d{n}:0", title=title, text=text, score=1.0,
                   timestamp=1714555800.0 + n * 86400)


def test_context_is_numbered_with_title_and_date() -> None:
    context = build_context([_p(1, "Alpha."), _p(2, "Beta.", title=None)], budget_chars=1000)
    assert context.text == INSTRUCTIONS + "\n\n[1] T (2024-05-02)\nAlpha.\n\n[2] (2024-05-03)\nBeta."
    assert [p.document_id for p in context.passages] == ["d1", "d2"]


def test_empty_context() -> None:
    assert build_context([], budget_chars=1000).text == ""


def test_budget_cuts_at_a_sentence_and_drops_what_does_not_fit() -> None:
    long = " ".join(f"Sentence number {i} is here." for i in range(40))  # ~1100 chars
    context = build_context([_p(1, "Short one."), _p(2, long), _p(3, "Never.")], budget_chars=600)
    body = context.text[len(INSTRUCTIONS) + 2:]
    assert len(body) <= 600
    assert [p.document_id for p in context.passages] == ["d1", "d2"]
    assert body.endswith("is here.…")
    assert "Never." not in body


def test_a_first_passage_larger_than_the_budget_is_cut_not_dropped() -> None:
    context = build_context([_p(1, "word " * 500)], budget_chars=300)
    assert len(context.passages) == 1
    assert len(context.text) - len(INSTRUCTIONS) - 2 <= 300


def test_chat_query_is_the_last_user_message() -> None:
    grounder = ChatGrounder()
    body = {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": [{"type": "text", "text": "new"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert grounder.query(body) == "new"
    for messages in ([{"role": "system", "content": "s"}], [{"role": "user", "content": "  "}],
                     [{"role": "user", "content": "q"}, {"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(InvalidQuery):
            grounder.query({"messages": messages})


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
        with pytest.raises(InvalidQuery):
            grounder.query({"prompt": prompt})
