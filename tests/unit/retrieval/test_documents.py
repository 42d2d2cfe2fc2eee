"""Validation of a new document and RFC 3339 timestamps."""

from __future__ import annotations

import pytest

from retrieval.documents import (
    DEFAULT_COLLECTION,
    NewDocument,
    Passage,
    format_rfc3339,
    parse_rfc3339,
    validate,
)
from retrieval.errors import DocumentTooLarge, InvalidDocument

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("text", "epoch"), [
    ("2024-05-01T09:30:00Z", 1714555800.0),
    ("2024-05-01t09:30:00z", 1714555800.0),
    ("2024-05-01T11:30:00+02:00", 1714555800.0),
    ("2024-05-01T04:00:00-05:30", 1714555800.0),
    ("2024-05-01T09:30:00.25Z", 1714555800.25),
    ("1969-12-31T23:59:59Z", -1.0),
])
def test_rfc3339_is_parsed(text: str, epoch: float) -> None:
    assert parse_rfc3339(text) == epoch


@pytest.mark.parametrize("text", ["2024-05-01", "2024-05-01T09:30:00", "2024-05-01 09:30:00Z", "yesterday",
                                  "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z", "2024-05-01T25:00:00Z",
                                  "2024-05-01T09:30:00+24:00", "1714555800", " 2024-05-01T09:30:00Z", ""])
def test_non_rfc3339_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_format_round_trips_in_utc() -> None:
    assert format_rfc3339(1714555800.0) == "2024-05-01T09:30:00Z"
    assert format_rfc3339(1714555800.25) == "2024-05-01T09:30:00.250Z"
    assert parse_rfc3339(format_rfc3339(1714555800.123)) == 1714555800.123


def test_defaults() -> None:
    valid = validate(NewDocument(text="hello", title="  "), max_bytes=100, now=NOW)
    assert (valid.title, valid.timestamp, valid.collection, valid.metadata) == (None, NOW, DEFAULT_COLLECTION, {})


@pytest.mark.parametrize(("document", "param"), [
    (NewDocument(text=""), "text"),
    (NewDocument(text=" \n\t "), "text"),
    (NewDocument(text="x", timestamp="2024-05-01"), "timestamp"),
    (NewDocument(text="x", collection="has space"), "collection"),
    (NewDocument(text="x", collection="-leading"), "collection"),
    (NewDocument(text="x", collection="a" * 65), "collection"),
    (NewDocument(text="x", collection="tenant}|*"), "collection"),
    (NewDocument(text="x", title="t" * 1025), "title"),
    (NewDocument(text="x", metadata={"v": float("nan")}), "metadata"),
    (NewDocument(text="x", metadata={"v": "m" * 9000}), "metadata"),
])
def test_invalid_documents(document: NewDocument, param: str) -> None:
    with pytest.raises(InvalidDocument) as info:
        validate(document, max_bytes=1000, now=NOW)
    assert info.value.param == param
    assert not isinstance(info.value, DocumentTooLarge)


def test_size_limit_counts_utf8_bytes() -> None:
    validate(NewDocument(text="é" * 50), max_bytes=100, now=NOW)
    with pytest.raises(DocumentTooLarge):
        validate(NewDocument(text="é" * 51), max_bytes=100, now=NOW)


def test_passage_wire_form() -> None:
    passage = Passage(document_id="doc_1", chunk_id="doc_1:0", title=None, text="t", score=0.1234567891,
                      timestamp=1714555800.0)
    assert passage.source() == {"document_id": "doc_1", "chunk_id": "doc_1:0", "title": None, "text": "t",
                                "score": 0.123457, "timestamp": "2024-05-01T09:30:00Z"}
