"""Wire models of the documents routes. No I/O here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from retrieval.documents import NewDocument, Passage, format_rfc3339
from retrieval.index import DocumentRecord
from retrieval.service import MAX_QUERY_CHARS, MAX_TOP_K


class DocumentCreate(BaseModel):
    """The body of ``POST /v1/documents``; the retrieval service validates the values."""

    model_config = ConfigDict(extra="forbid")
    text: str
    title: str | None = None
    timestamp: str | None = None
    collection: str | None = None
    metadata: dict[str, Any] | None = None

    def to_new(self) -> NewDocument:
        return NewDocument(text=self.text, title=self.title, timestamp=self.timestamp, collection=self.collection,
                           metadata=self.metadata)


class DocumentSummary(BaseModel):
    id: str
    title: str | None
    timestamp: str
    collection: str
    chunks: int

    @classmethod
    def of(cls, record: DocumentRecord) -> DocumentSummary:
        return cls(id=record.id, title=record.title, timestamp=format_rfc3339(record.timestamp),
                   collection=record.collection, chunks=record.chunks)


class DocumentOut(DocumentSummary):
    object: str = "document"
    created: int
    metadata: dict[str, Any]

    @classmethod
    def of(cls, record: DocumentRecord) -> DocumentOut:
        return cls(id=record.id, title=record.title, timestamp=format_rfc3339(record.timestamp),
                   collection=record.collection, chunks=record.chunks, created=int(record.created),
                   metadata=record.metadata)


class DocumentList(BaseModel):
    object: str = "list"
    data: list[DocumentSummary]
    has_more: bool


class DocumentDeleted(BaseModel):
    id: str
    object: str = "document"
    deleted: bool = True


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(max_length=MAX_QUERY_CHARS)
    top_k: int = Field(default=4, ge=1, le=MAX_TOP_K)
    collection: str | None = None


class PassageOut(BaseModel):
    document_id: str
    chunk_id: str
    title: str | None
    text: str
    score: float
    timestamp: str

    @classmethod
    def of(cls, passage: Passage) -> PassageOut:
        return cls(**passage.source())


class PassageList(BaseModel):
    object: str = "list"
    data: list[PassageOut]
