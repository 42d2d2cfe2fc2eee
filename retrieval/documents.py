"""What a caller sends and gets back: a new document (validated here), a retrieved passage, a whole stored
document as an export reads it back (:class:`SourceDocument`), and RFC 3339 timestamps in and out."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from retrieval.errors import DocumentTooLarge, InvalidDocument, InvalidQuery

DEFAULT_COLLECTION = "default"
MAX_TITLE_CHARS = 1024
MAX_METADATA_BYTES = 8192
# Where a sentence ends (as :mod:`retrieval.chunking` cuts them): the places a chunk's overlap may end.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(value: str) -> float:
    """An RFC 3339 date-time (``2024-05-01T09:30:00Z``, ``...+02:00``) -> epoch seconds (ms precision).

    Stricter than ``datetime.fromisoformat``: the time and the offset are required."""
    match = _RFC3339_RE.match(value)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7), match.group(8)
    if offset in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if offset[0] == "+" else -1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("offset out of range")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    moment = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=tz)  # 60: a leap second
    return round(moment.timestamp() + (float(fraction) if fraction else 0.0), 3)


def format_rfc3339(timestamp: float) -> str:
    """Epoch seconds -> RFC 3339 in UTC (``Z``), with milliseconds only when there are some."""
    moment = datetime.fromtimestamp(round(timestamp, 3), UTC)
    millis = moment.microsecond // 1000
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{millis:03d}" if millis else "") + "Z"


def check_collection(value: str | None, *, param: str = "collection") -> str | None:
    if value is not None and not _COLLECTION_RE.match(value):
        raise InvalidQuery("`collection` must be 1-64 letters, digits, `_` or `-`, starting with a letter or "
                           "digit.", param=param)
    return value


@dataclass(frozen=True, slots=True)
class NewDocument:
    text: str
    title: str | None = None
    timestamp: str | None = None
    collection: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ValidDocument:
    text: str
    title: str | None
    timestamp: float
    collection: str
    metadata: dict[str, Any] = field(default_factory=dict)


def validate(document: NewDocument, *, max_bytes: int, now: float) -> ValidDocument:
    if not isinstance(document.text, str) or not document.text.strip():
        raise InvalidDocument("`text` must be a non-empty string.", param="text")
    size = len(document.text.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise DocumentTooLarge(f"`text` is {size} bytes; the limit is {max_bytes} bytes.", param="text")
    title = (document.title or "").strip() or None
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise InvalidDocument(f"`title` is longer than {MAX_TITLE_CHARS} characters.", param="title")
    timestamp = now
    if document.timestamp is not None:
        try:
            timestamp = parse_rfc3339(document.timestamp)
        except (ValueError, OverflowError) as e:
            raise InvalidDocument("`timestamp` must be an RFC 3339 date-time such as 2024-05-01T09:30:00Z.",
                                  param="timestamp") from e
    try:
        collection = check_collection(document.collection) or DEFAULT_COLLECTION
    except InvalidQuery as e:
        raise InvalidDocument(e.message, param="collection") from e
    metadata = document.metadata or {}
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidDocument("`metadata` must be a JSON object.", param="metadata") from e
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidDocument(f"`metadata` is larger than {MAX_METADATA_BYTES} bytes as JSON.", param="metadata")
    return ValidDocument(text=document.text, title=title, timestamp=timestamp, collection=collection,
                         metadata=metadata)


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved chunk, as it goes into a prompt and back to the client as a source."""

    document_id: str
    chunk_id: str
    title: str | None
    text: str
    score: float
    timestamp: float
    superseded: bool = False
    """Ranking found newer text about the same subject among the results (not part of the wire form)."""

    def source(self) -> dict[str, Any]:
        """The wire form (``sources`` items and ``/v1/retrieve`` rows)."""
        return {"document_id": self.document_id, "chunk_id": self.chunk_id, "title": self.title, "text": self.text,
                "score": round(self.score, 6) if math.isfinite(self.score) else 0.0,
                "timestamp": format_rfc3339(self.timestamp)}


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """A stored document read back whole (:meth:`retrieval.service.DocumentService.export`): what a training set
    is made from. ``text`` is its chunks joined in order, each chunk's overlap with the one before left out."""

    id: str
    title: str | None
    text: str
    timestamp: float
    """Epoch seconds: the document's own time (which of two disagreeing documents is newer)."""
    collection: str


def join_chunks(chunks: list[str]) -> str:
    """The text of a document from its chunks, in order. :mod:`retrieval.chunking` starts each chunk with the last
    sentences of the previous one (its overlap, joined by single spaces): the longest head of a chunk, ending at a
    sentence end, that is the previous chunk's tail (whitespace aside) is dropped. Chunks are joined by a blank
    line (a chunk often ends at a paragraph; where not, a paragraph break changes no sentence)."""
    parts: list[str] = []
    previous = ""
    for chunk in chunks:
        text = chunk.strip()
        if not text:
            continue
        parts.append(text[_overlap_end(previous, text):].lstrip() if previous else text)
        previous = text
    return "\n\n".join(p for p in parts if p)


def _overlap_end(previous: str, chunk: str) -> int:
    """Where the overlap carried over from ``previous`` ends in ``chunk`` (0: none). Never the whole chunk."""
    tail = " " + " ".join(previous.split())
    best = 0
    for match in _SENTENCE_END_RE.finditer(chunk):
        head = " " + " ".join(chunk[:match.end()].split())
        if len(head) >= len(tail):
            break
        if tail.endswith(head):
            best = match.end()
    return best
