"""Structured logs: one JSON object per line, with the request id and the fields passed in ``extra``.
Keys, prompts and document text are never passed to a logger."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("banyan_request_fields", default=None)


def start_request_fields(**fields: Any) -> dict[str, Any]:
    """Begin the log fields of one request (the access log line is written from them at its end)."""
    current: dict[str, Any] = dict(fields)
    _request_fields.set(current)
    return current


def annotate(**fields: Any) -> None:
    """Add fields (tenant, adapter, version...) to the current request's access log line."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncio warns "socket.send() raised exception." for every write to a client that hung up mid-stream:
    # dozens of lines per disconnect, and the access log already records the disconnect.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
