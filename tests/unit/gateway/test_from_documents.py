"""Training examples from a tenant's documents: the newest version of each fact only, several question wordings,
examples grounded in the gateway's own ``rag`` context (newer source cited), deterministic, bounded."""

from __future__ import annotations

import json
import re

import pytest

from adapters.training.lora import parse_chat_jsonl
from gateway.fine_tuning import from_documents
from gateway.fine_tuning.from_documents import examples_from_documents, newest_facts
from retrieval.context import INSTRUCTIONS, CharEstimate
from retrieval.documents import SourceDocument

DAY = 86400.0


def _doc(number: int, text: str, *, title: str = "Notes", day: float = 0.0) -> SourceDocument:
    return SourceDocument(id=f"doc_{number:024x}", title=title, text=text, timestamp=1.7e9 + day * DAY,
                          collection="default")


FERRY = [
    _doc(1, "The morning ferry to Pellworth leaves at 7:15 from the north pier. A return ticket costs 14 florins.\n\n"
            "Pellworth is a small island in the Gull Sea. Its harbourmaster is Idris Vell.", title="Ferry timetable",
         day=0),
    _doc(2, "From spring, the morning ferry to Pellworth now leaves at 6:50 from the north pier.",
         title="Ferry timetable, spring", day=40),
    _doc(3, "The Salt Lantern inn has 11 rooms. The inn's cook is Wilma Orr.", title="The Salt Lantern", day=10),
]


def _examples(documents: list[SourceDocument], seed: int = 7) -> list[list[dict[str, str]]]:
    return examples_from_documents(documents, tokens=CharEstimate(), seed=seed)


def _answers(examples: list[list[dict[str, str]]], *, grounded: bool) -> list[str]:
    return [m["content"] for e in examples if (e[0]["role"] == "system") == grounded
            for m in e if m["role"] == "assistant"]


def test_only_the_newest_version_of_a_fact_is_taught() -> None:
    examples = _examples(FERRY)
    plain = _answers(examples, grounded=False)
    assert any("6:50" in a for a in plain)
    assert not any("7:15" in a for a in _answers(examples, grounded=False) + _answers(examples, grounded=True))
    # the older passage is shown next to the newer one, and the answer cites the newer
    conflicts = [e for e in examples if e[0]["role"] == "system" and "7:15" in e[0]["content"]
                 and "ferry" in e[-1]["content"]]
    assert conflicts
    for example in conflicts:
        answer = example[-1]["content"]
        cited = int(re.findall(r"\[(\d+)\]$", answer)[0])
        block = example[0]["content"].split(f"[{cited}] ", 1)[1].split("\n\n[", 1)[0]
        assert "6:50" in block and "6:50" in answer


def test_facts_are_read_and_keyed_by_subject() -> None:
    facts = {f.sentence for f in newest_facts(FERRY)}
    assert "The harbourmaster of Pellworth is Idris Vell." in facts  # "Its" resolved
    assert "The Salt Lantern inn has 11 rooms." in facts
    assert "The inn's cook is Wilma Orr." in facts  # a different subject with the same relation is kept
    assert sum("morning ferry" in f for f in facts) == 1
    # a bare subject ("the price") is one thing only within documents about the same topic
    unrelated = [_doc(1, "The price is 12 crowns.", title="Kettle"),
                 _doc(2, "The price is 30 crowns.", title="Lamp", day=1)]
    assert len(newest_facts(unrelated)) == 2
    related = [_doc(1, "The price is 12 crowns.", title="Kettle sheet"),
               _doc(2, "The price is now 15 crowns.", title="Kettle sheet, update", day=1)]
    assert [f.sentence for f in newest_facts(related)] == ["The price is now 15 crowns."]


def test_each_fact_is_asked_in_several_wordings() -> None:
    examples = _examples(FERRY)
    questions = {e[-2]["content"] for e in examples if "11 rooms" in e[-1]["content"]}
    assert "How many rooms does the Salt Lantern inn have?" in questions
    assert len(questions) >= 3
    times = {e[-2]["content"] for e in examples if e[-1]["content"].startswith("From spring") or "6:50" in
             e[-1]["content"]}
    assert "When does the morning ferry to Pellworth leave?" in times


def test_grounded_examples_use_the_gateways_context_and_cite_it() -> None:
    examples = _examples(FERRY)
    grounded = [e for e in examples if e[0]["role"] == "system"]
    assert len(grounded) >= len(newest_facts(FERRY))
    for example in grounded:
        system, user, assistant = example
        assert system["content"].startswith(INSTRUCTIONS + "\n\n[1] ")
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert re.search(r" \[\d\]$", assistant["content"])
    # a change after training is simulated: a later dated passage with another value wins over the taught one
    later = [e for e in grounded if "14 florins" in e[0]["content"] and "florins" in e[-1]["content"]
             and "14 florins" not in e[-1]["content"]]
    assert later


def test_the_same_documents_and_seed_give_the_same_examples() -> None:
    first = _examples(FERRY, seed=3)
    assert first == _examples(FERRY, seed=3)
    assert first == _examples(list(reversed(FERRY)), seed=3)  # the timestamps order them, not the list
    assert first != _examples(FERRY, seed=4)


def test_examples_are_valid_training_lines() -> None:
    text = "\n".join(json.dumps({"messages": e}) for e in _examples(FERRY))
    assert len(parse_chat_jsonl(text)) == len(_examples(FERRY))


def test_documents_without_facts_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="no statements"):
        _examples([_doc(1, "Hello! Thanks for reading.\n\nSee you soon?")])
    with pytest.raises(ValueError):
        _examples([])


def test_the_output_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(from_documents, "MAX_EXAMPLES", 25)
    many = [_doc(n, f"The Tower {n} gate opens at {n % 12 + 1}:15. The Tower {n} guard is Ada Voss{n}.",
                 title=f"Tower {n}", day=n) for n in range(30)]
    examples = _examples(many)
    assert len(examples) == 25
    assert len({e[-1]["content"].split(" [")[0] for e in examples}) >= 20  # spread over facts, not one fact's all
