"""The gateway's access log on the real stack (the session stack runs with ``BANYAN_LOG_LEVEL=info``): one
JSON line per request with the request id, tenant, adapter, status and timings; never a key, a prompt, a
query or a document's text."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import RunningStack, make_tenant, upload


def _access_lines(stack: RunningStack) -> list[dict[str, Any]]:
    lines = []
    for raw in (stack.data_dir / "banyan-dev.out").read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            entry = json.loads(raw)
            if entry.get("logger") == "banyan.access":
                lines.append(entry)
    return lines


def _line(stack: RunningStack, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        found = [e for e in _access_lines(stack) if e.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (request_id, found)
            return found[0]
        time.sleep(0.2)


def test_one_access_line_per_request_without_secrets(stack: RunningStack, admin: httpx.Client,
                                                     peft_adapters: dict[str, Path]) -> None:
    tenant = make_tenant(stack, admin, "logs")
    assert upload(admin, tenant.id, "logged", peft_adapters["alpha"]).status_code == 201
    prompt, text = "zebra " + secrets.token_hex(8), "okapi " + secrets.token_hex(8)
    ids = {kind: f"req-{kind}-{secrets.token_hex(6)}" for kind in ("stream", "json", "document", "retrieve", "404")}
    with tenant.http() as http:
        with http.stream("POST", "/v1/completions", headers={"x-request-id": ids["stream"]}, json={
                "model": "logged", "prompt": prompt, "max_tokens": 3, "stream": True}) as response:
            assert response.status_code == 200
            response.read()
        assert http.post("/v1/chat/completions", headers={"x-request-id": ids["json"]}, json={
            "model": "logged", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2,
            "rag": True}).status_code == 200
        assert http.post("/v1/documents", headers={"x-request-id": ids["document"]},
                         json={"text": text, "title": text}).status_code == 201
        assert http.post("/v1/retrieve", headers={"x-request-id": ids["retrieve"]},
                         json={"query": text}).status_code == 200
        assert http.post("/v1/completions", headers={"x-request-id": ids["404"]},
                         json={"model": "no-such-model", "prompt": prompt}).status_code == 404

    streamed = _line(stack, ids["stream"])
    assert streamed["tenant"] == tenant.id and streamed["adapter"] == "logged" and streamed["adapter_version"] == 1
    assert streamed["status"] == 200 and streamed["route"] == "/v1/completions" and streamed["method"] == "POST"
    assert streamed["duration_ms"] >= streamed["ttft_ms"] > 0
    assert streamed["prompt_tokens"] > 0 and streamed["completion_tokens"] == 3
    chat = _line(stack, ids["json"])
    assert chat["route"] == "/v1/chat/completions" and chat["adapter"] == "logged" and chat["status"] == 200
    assert _line(stack, ids["document"])["route"] == "/v1/documents"
    assert _line(stack, ids["retrieve"])["tenant"] == tenant.id
    missing = _line(stack, ids["404"])
    assert missing["status"] == 404 and missing["tenant"] == tenant.id

    everything = (stack.data_dir / "banyan-dev.out").read_text(errors="replace")
    for secret in (tenant.key, stack.admin_key, prompt, text):
        assert secret not in everything
