"""Structured access logs: one JSON line per request with ids and timings, never keys or prompts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx
import pytest

from gateway.logs import JsonFormatter
from tests.unit.gateway.conftest import TENANT_KEY, Handler, Harness


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": body["model"],
                                     "choices": [{"index": 0, "text": "ok"}],
                                     "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}})


def test_access_log_line(make_harness: Callable[[Handler], Harness], caplog: pytest.LogCaptureFixture) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    with caplog.at_level(logging.INFO, logger="banyan.access"):
        response = h.client.post("/v1/completions", json={"model": "helper", "prompt": "my secret prompt"},
                                 headers={**h.tenant_headers(), "x-request-id": "trace-1"})
    assert response.status_code == 200
    record = next(r for r in caplog.records if r.name == "banyan.access")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-1" and line["tenant"] == "acme" and line["adapter"] == "helper"
    assert line["adapter_version"] == 1 and line["status"] == 200 and line["route"] == "/v1/completions"
    assert line["prompt_tokens"] == 4 and line["completion_tokens"] == 1 and line["duration_ms"] >= 0
    text = json.dumps(line)
    assert TENANT_KEY not in text and "secret prompt" not in text
