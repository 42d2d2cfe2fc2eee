"""The gateway's edge on the real stack: keys checked before a body is read, slow bodies cut, the engine's own API
key, and the SIGTERM drain (unready at once, open streams ended with an error event and ``[DONE]``).

The tests that need short time limits run a second gateway (``banyan serve``, as in production) on the session
stack's Valkey, S3 and engine."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.dev.launcher import clean_env
from gateway.dev.processes import free_port
from tests.integration.conftest import RunningStack, TenantHandle

MIB = 1024 * 1024


def _send_headers(url: str, request: bytes) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=15)
    sock.sendall(request)
    return sock


def _answer_before_the_body(sock: socket.socket, *, body_bytes: int) -> tuple[bytes, int]:
    """Send the body a chunk at a time while reading; return what the server answered and how much of the body
    had been sent when the answer came (the server closes the connection after its answer)."""
    sock.setblocking(False)
    sent, answer, chunk = 0, b"", b"x" * (64 * 1024)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        except BlockingIOError:
            pass
        if b"\r\n\r\n" in answer:
            break
        if sent < body_bytes:
            try:
                sent += sock.send(chunk[:body_bytes - sent])
            except BlockingIOError:
                time.sleep(0.01)
        else:
            time.sleep(0.01)
    return answer, sent


@pytest.mark.parametrize(("path", "content_type", "size"), [
    ("/admin/tenants/acme/adapters", "multipart/form-data; boundary=banyan", 60 * MIB),
    ("/v1/chat/completions", "application/json", 4 * MIB - 1),
])
def test_a_keyless_body_is_refused_before_it_is_sent(stack: RunningStack, path: str, content_type: str,
                                                     size: int) -> None:
    request = (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {size}\r\n\r\n").encode()
    with _send_headers(stack.url, request) as sock:
        answer, sent = _answer_before_the_body(sock, body_bytes=size)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"connection: close" in head.lower()
        assert sent < size, "the server answered only once the whole body was sent"
        sock.setblocking(True)
        sock.settimeout(10)
        closed = False
        try:  # then it closes the connection (a reset: the body it never read is still in its buffer)
            while data := sock.recv(65536):
                rest += data
            closed = True
        except ConnectionResetError:
            closed = True
        assert closed
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        assert json.loads(rest[:length])["error"]["code"] == "invalid_api_key"


def test_the_engine_refuses_its_api_without_the_key_and_the_gateway_has_it(stack: RunningStack,
                                                                           tenant: TenantHandle) -> None:
    engine = stack.engine_url
    assert httpx.get(engine + "/v1/models", timeout=10).status_code == 401
    assert httpx.post(engine + "/v1/completions", timeout=10,
                      json={"model": stack.info["base_model"], "prompt": "hi", "max_tokens": 1}).status_code == 401
    assert httpx.post(engine + "/v1/load_lora_adapter", timeout=10,
                      json={"lora_name": "x", "lora_path": "/etc"}).status_code == 401
    assert httpx.get(engine + "/v1/models", headers=stack.engine_headers, timeout=10).status_code == 200
    # What vLLM 0.32 leaves open without the key: its probes (the NetworkPolicy admits the scraper for /metrics).
    assert httpx.get(engine + "/health", timeout=10).status_code == 200
    assert "vllm:" in httpx.get(engine + "/metrics", timeout=10).text
    with tenant.http() as http:  # the gateway (and through it the engine's resolver) uses the key
        response = http.post("/v1/completions", json={"model": stack.info["base_model"], "prompt": "hi",
                                                      "max_tokens": 2})
    assert response.status_code == 200, response.text


@dataclass
class EdgeGateway:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture
def edge_gateway(stack: RunningStack, tmp_path: Path) -> Iterator[EdgeGateway]:
    """``banyan serve`` on the session stack's services, with short body and drain times."""
    port = free_port()
    env = clean_env({
        "BANYAN_MODE": "prod", "BANYAN_ADMIN_KEY": secrets.token_hex(24), "BANYAN_HOST": "127.0.0.1",
        "BANYAN_PORT": str(port), "BANYAN_DATA_DIR": str(tmp_path), "BANYAN_REDIS_URL": stack.info["redis_url"],
        **stack.s3_settings().s3_env(), "BANYAN_ENGINE_URLS": stack.engine_url,
        "BANYAN_ENGINE_API_KEY": stack.info["engine_api_key"], "BANYAN_BASE_MODEL": stack.info["base_model"],
        "BANYAN_BASE_MODEL_CONFIG": str(stack.model_path / "config.json"), "BANYAN_LOG_LEVEL": "warning",
        "BANYAN_BODY_READ_TIMEOUT_S": "2", "BANYAN_SHUTDOWN_DRAIN_S": "3", "BANYAN_READINESS_CACHE_S": "0",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "banyan"), "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    gateway = EdgeGateway(process=process, url=f"http://127.0.0.1:{port}", log=log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(gateway.url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the edge gateway did not become ready: " + log.read_text(errors="replace")[-3000:])
        yield gateway
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_a_trickling_body_is_cut_after_the_body_timeout(edge_gateway: EdgeGateway, tenant: TenantHandle) -> None:
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {tenant.key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    started = time.monotonic()
    with _send_headers(edge_gateway.url, request) as sock:
        sock.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < 20 and b"\r\n\r\n" not in answer:
            try:
                sock.send(b" ")  # one byte every 0.2 s: a slow-loris body
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 2 <= elapsed < 8


def test_sigterm_goes_unready_then_ends_open_streams_with_an_error_event(edge_gateway: EdgeGateway,
                                                                          stack: RunningStack,
                                                                          tenant: TenantHandle) -> None:
    body = {"model": stack.info["base_model"], "prompt": "x", "max_tokens": 3500, "ignore_eos": True, "n": 4,
            "stream": True}
    events: list[str] = []
    with httpx.Client(base_url=edge_gateway.url, headers={"Authorization": f"Bearer {tenant.key}"},
                      timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not events:
            line = next(lines)
            if line.startswith("data: "):
                events.append(line)
        edge_gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = httpx.get(edge_gateway.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"  # unready, still answering
        events.extend(line for line in lines if line.startswith("data: "))
        ended = time.monotonic() - signalled
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    # The drain time (3 s): not at once, and not never (the bound is loose: on a shared 2-core machine with a busy
    # engine, the gateway's timer was seen firing 11 s late).
    assert 2.5 <= ended < 30, ended
    edge_gateway.process.wait(timeout=30)
