"""Errors of the retrieval package. The gateway translates them (by type) into HTTP errors.

::

    RetrievalError
     +-- InvalidDocument      a document the caller sent is not acceptable (400)
     |    +-- DocumentTooLarge   its text is above the size limit (413)
     +-- InvalidQuery         a retrieval query or grounding request is not acceptable (400)
     +-- DocumentNotFound     no such document for this tenant (404)
     +-- QuotaExceeded        the tenant's documents are at its document or chunk quota (429 quota_exceeded)
     +-- WriteRefused         the tenant stopped being live while its document was prepared (being deleted)
     +-- RetrievalUnavailable the embedding model or the search index cannot serve (503)

Redis errors are not wrapped: the gateway already translates ``redis.exceptions.RedisError``.
"""

from __future__ import annotations


class RetrievalError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidDocument(RetrievalError):
    pass


class DocumentTooLarge(InvalidDocument):
    pass


class InvalidQuery(RetrievalError):
    pass


class DocumentNotFound(RetrievalError):
    pass


class QuotaExceeded(RetrievalError):
    pass


class WriteRefused(RetrievalError):
    pass


class RetrievalUnavailable(RetrievalError):
    pass
