"""What the search queries look like: escaping, scope in every alternative, reply parsing."""

from __future__ import annotations

import pytest

from retrieval.index import (
    QueryPlan,
    bm25_query,
    escape,
    is_document_id,
    parse_search_reply,
    query_terms,
    scope_filter,
)

HOSTILE = ['@tenant:{other}', '*', 'a | b', '"quoted phrase"', '{braces}', '-@tenant:{acme}', '(x)=>[KNN 5 @e $v]',
           "%fuzzy%", "back\\slash", "$param", "@text:foo*", "tenant}|@tenant:{evil"]


def test_escape_backslashes_every_ascii_non_alphanumeric() -> None:
    assert escape("acme-corp") == "acme\\-corp"
    assert escape("a b{c}|*") == "a\\ b\\{c\\}\\|\\*"
    assert escape("café") == "café"


def test_query_terms_are_words_only_without_stopwords_or_repeats() -> None:
    assert query_terms("Where is THE office? The office!") == ["where", "office"]
    assert query_terms("the a of") == []
    assert len(query_terms(" ".join(f"w{i}" for i in range(100)))) == 32
    for text in [*HOSTILE, "tab\there\x00nul\x1bescape", "naïve—dash “quotes”"]:
        for term in query_terms(text):
            assert all(ch.isalnum() or ch == "_" or ord(ch) > 127 for ch in term), term
    assert query_terms("naïve café\x00x") == ["naïve", "café", "x"]


def test_scope_filter() -> None:
    assert scope_filter("acme-1", None) == "@tenant:{acme\\-1}"
    assert scope_filter("acme", "faq_2") == "@tenant:{acme} @collection:{faq\\_2}"
    with pytest.raises(ValueError):
        scope_filter("acme} | @tenant:{other", None)


def test_every_bm25_alternative_is_scoped_to_the_tenant() -> None:
    for text in HOSTILE:
        terms = query_terms(text)
        if not terms:
            continue
        query = bm25_query("acme", terms, "docs")
        alternatives = query.split(" | ")
        assert len(alternatives) == len(terms)
        for alternative, term in zip(alternatives, terms, strict=True):
            assert alternative == f"(@tenant:{{acme}} @collection:{{docs}} {escape(term)})"


def test_document_ids() -> None:
    assert is_document_id("doc_" + "0a" * 12)
    assert not is_document_id("doc_" + "0A" * 12)
    assert not is_document_id("../doc_x")


def test_reply_parsing_accepts_both_shapes() -> None:
    resp2 = [2, b"k1", [b"text", b"hello", b"embedding", b"\x00\x01"], b"k2", [b"text", b"bye"]]
    resp3 = {b"total_results": 2, b"results": [
        {b"id": b"k1", b"extra_attributes": {b"text": b"hello", b"embedding": b"\x00\x01"}, b"values": []},
        {b"id": b"k2", b"extra_attributes": {b"text": b"bye"}, b"values": []}]}
    expected = [("k1", {"text": b"hello", "embedding": b"\x00\x01"}), ("k2", {"text": b"bye"})]
    assert parse_search_reply(resp2) == expected
    assert parse_search_reply(resp3) == expected
    assert parse_search_reply([0]) == []


def test_knn_policy_follows_the_size_of_the_scope() -> None:
    plan = QueryPlan(adhoc_max_chunks=10_000)
    assert plan.knn_policy(None) is None  # unknown: the search module decides
    assert plan.knn_policy(0) == "ADHOC_BF"
    assert plan.knn_policy(10_000) == "ADHOC_BF"
    assert plan.knn_policy(10_001) == "BATCHES"


def test_bm25_leaves_out_words_common_in_a_large_scope_only() -> None:
    plan = QueryPlan(common_term_share=0.1, common_term_min_chunks=1_000, max_postings=15_000)
    terms = ["rare", "common", "unseen", "medium"]
    frequencies = {"rare": 12, "common": 95_000, "medium": 9_000}
    assert plan.bm25_terms(terms, frequencies, 100_000) == ["rare", "unseen", "medium"]
    assert plan.bm25_terms(terms, {"rare": 1, "common": 5}, 5) == terms  # a small tenant keeps every word
    assert plan.bm25_terms(terms, frequencies, None) == terms


def test_bm25_keeps_the_rarest_words_within_a_budget_of_chunks_to_score() -> None:
    plan = QueryPlan(common_term_share=0.5, max_postings=10_000)
    terms = ["a", "b", "c", "d", "e"]
    frequencies = {"a": 6_000, "b": 3_000, "c": 50, "d": 4_000, "e": 900}
    assert plan.bm25_terms(terms, frequencies, 100_000) == ["b", "c", "d", "e"]  # 7,950 chunks; "a" would pass 10k
