"""Hybrid ranking: RRF, the relevance and recency weights, near-duplicates, supersession."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.ranking import STAGES, Candidate, Ranked, RankingConfig, RankingContext, rank

DAY = 86400.0


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def _item(key: str, vector: np.ndarray, *, day: float = 0.0, terms: tuple[str, ...] = ()) -> Ranked:
    return Ranked(key=key, timestamp=day * DAY, vector=vector, terms=frozenset(terms), payload=key)


QUERY = _unit(1, 0, 0, 0)
ONLY_RRF = RankingConfig(stages=("rrf",))


def _keys(candidates: list[Candidate]) -> list[str]:
    return [c.key for c in candidates]


def test_rrf_rewards_agreement_between_lists() -> None:
    a, b, c = _item("a", _unit(1, 1, 0, 0)), _item("b", _unit(1, 0, 1, 0)), _item("c", _unit(1, 0, 0, 1))
    ranked = rank({"vector": [a, b, c], "bm25": [c]}, QUERY, ONLY_RRF, top_k=3)
    assert _keys(ranked) == ["c", "a", "b"]  # c: 1/63 + 1/61 > a: 1/61 > b: 1/62
    assert ranked[0].score == pytest.approx(1 / 63 + 1 / 61)
    assert rank({"vector": [], "bm25": []}, QUERY, RankingConfig(), top_k=3) == []


def test_list_weights() -> None:
    a, b = _item("a", _unit(1, 1, 0, 0)), _item("b", _unit(1, 0, 1, 0))
    config = RankingConfig(stages=("rrf",), list_weights={"vector": 1.0, "bm25": 3.0})
    assert _keys(rank({"vector": [a, b], "bm25": [b]}, QUERY, config, top_k=2)) == ["b", "a"]


def test_floor_drops_unrelated_vector_only_neighbours_but_keeps_bm25_hits() -> None:
    related, unrelated = _item("related", _unit(1, 0.5, 0, 0)), _item("unrelated", _unit(0, 1, 0, 0))
    exact = _item("exact", _unit(0, 0, 1, 0))
    config = RankingConfig(stages=("rrf", "floor"))
    ranked = rank({"vector": [related, unrelated], "bm25": [exact]}, QUERY, config, top_k=5)
    assert set(_keys(ranked)) == {"related", "exact"}


def test_relevance_demotes_lexical_matches_the_dense_model_finds_far_off() -> None:
    best = _item("best", _unit(1, 0.2, 0, 0))  # only the vector list found it
    noisy = _item("noisy", _unit(0.3, 1, 0, 0))  # shares a common word: both lists, mediocre ranks
    lists = {"vector": [best, noisy], "bm25": [noisy]}
    assert _keys(rank(lists, QUERY, ONLY_RRF, top_k=2))[0] == "noisy"
    assert _keys(rank(lists, QUERY, RankingConfig(stages=("rrf", "relevance")), top_k=2))[0] == "best"


def test_recency_breaks_near_ties_but_does_not_bury_relevance() -> None:
    config = RankingConfig(stages=("rrf", "recency"))
    old, new = _item("old", _unit(1, 0, 0, 0), day=0), _item("new", _unit(1, 0.1, 0, 0), day=400)
    assert _keys(rank({"vector": [old, new]}, QUERY, config, top_k=2)) == ["new", "old"]
    fillers = [_item(f"x{i}", _unit(0, 1, i, 0), day=0) for i in range(1, 14)]
    ranked = rank({"vector": [old, *fillers, new]}, QUERY, config, top_k=1)  # new is 15th
    assert _keys(ranked) == ["old"]
    assert ranked[0].score >= config.recency_floor / 61  # the penalty is bounded, whatever the age


def test_near_duplicates_collapse_to_the_newest_with_the_best_score() -> None:
    v = _unit(1, 0.3, 0, 0)
    first, copy, other = _item("first", v, day=1), _item("copy", v, day=5), _item("other", _unit(1, 0, 1, 0))
    config = RankingConfig(stages=("rrf", "collapse"))
    ranked = rank({"vector": [first, other, copy]}, QUERY, config, top_k=5)
    assert _keys(ranked) == ["copy", "other"]
    assert ranked[0].score == pytest.approx(1 / 61)


def test_a_newer_passage_on_the_same_subject_supersedes_the_older_one() -> None:
    older = _item("older", _unit(1, 0.6, 0.2, 0), day=0)
    newer = _item("newer", _unit(1, 0.3, 0.5, 0), day=1)  # cosine to older ~0.9: same subject
    elsewhere = _item("elsewhere", _unit(1, 0, 0, 0.9), day=2)
    lists = {"vector": [older, elsewhere, newer], "bm25": [older]}
    assert _keys(rank(lists, QUERY, ONLY_RRF, top_k=3)) == ["older", "elsewhere", "newer"]
    ranked = rank(lists, QUERY, RankingConfig(stages=("rrf", "supersede")), top_k=3)
    assert _keys(ranked) == ["newer", "older", "elsewhere"]
    assert [c.superseded for c in ranked] == [False, True, False]


def test_a_shared_distinctive_word_lowers_the_bar_for_same_subject() -> None:
    older = _item("older", _unit(1, 1, 0, 0), day=0, terms=("zephyr", "office"))
    newer = _item("newer", _unit(1, 0, 1, 0), day=9, terms=("zephyr", "moved"))  # cosine 0.5 to older
    fillers = [_item(f"f{i}", _unit(1, 0, 0, 0.2 * i), terms=("office",)) for i in range(1, 30)]
    lists = {"vector": [older, *fillers, newer]}
    lexical = RankingConfig(stages=("rrf", "supersede"), shared_term_similarity=0.45)
    assert _keys(rank(lists, QUERY, lexical, top_k=2)) == ["newer", "older"]
    strict = RankingConfig(stages=("rrf", "supersede"), shared_term_similarity=0.6)
    assert _keys(rank(lists, QUERY, strict, top_k=1)) == ["older"]
    common = {"vector": [_item("older", older.vector, day=0, terms=("office",)), *fillers,
                         _item("newer", newer.vector, day=9, terms=("office",))]}
    assert _keys(rank(common, QUERY, lexical, top_k=1)) == ["older"]  # "office" is everywhere: not distinctive


def test_a_chain_of_updates_ends_with_the_latest_first() -> None:
    versions = [_item(f"v{i}", _unit(1, 0.5, 0.05 * i, 0), day=i) for i in range(4)]
    ranked = rank({"vector": versions}, QUERY, RankingConfig(stages=("rrf", "supersede")), top_k=4)
    assert _keys(ranked) == ["v3", "v2", "v1", "v0"]
    assert [c.superseded for c in ranked] == [False, True, True, True]


def test_stages_are_a_registry() -> None:
    with pytest.raises(ValueError):
        RankingConfig(stages=("rrf", "nope"))

    def reverse(candidates: list[Candidate], ctx: RankingContext) -> list[Candidate]:
        for c in candidates:
            c.score = -c.score
        return candidates

    STAGES["test-reverse"] = reverse
    try:
        a, b = _item("a", _unit(1, 1, 0, 0)), _item("b", _unit(1, 0, 1, 0))
        config = RankingConfig(stages=("rrf", "test-reverse"))
        assert _keys(rank({"vector": [a, b]}, QUERY, config, top_k=2)) == ["b", "a"]
    finally:
        del STAGES["test-reverse"]
