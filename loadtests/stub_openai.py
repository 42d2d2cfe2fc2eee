"""A minimal, fast stand-in for a vLLM OpenAI server, to measure the gateway alone.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or SSE with
``stream: true``; ``stream_options.include_usage`` honored) with ``max_tokens`` canned one-character
tokens (immediately, or one event every ``--event-gap-ms`` like an engine generating; with
``stream_options.continuous_usage_stats`` every event carries its usage so far, as vLLM's do), plus
``GET /health``, ``GET /v1/models`` and ``GET /metrics`` (empty). It is a
hand-written HTTP/1.1 server on asyncio (keep-alive, chunked responses for streams) so that it costs
as little CPU as possible: whatever the gateway spends shows up next to it.

    python -m loadtests.stub_openai --port 8300 --model banyan-demo [--event-gap-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

_TOKEN = "a"
_DEFAULT_TOKENS = 16  # tokens per answer when the request sets no max_tokens
HOST = "127.0.0.1"  # loopback only


def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json(status: str, payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _head(status, [("content-type", "application/json"), ("content-length", str(len(body)))]) + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass(frozen=True, slots=True)
class StubRequest:
    method: str
    path: str
    """Without its query string."""
    body: bytes
    close: bool
    """The client asked to close the connection after the answer."""


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           answer: Callable[[StubRequest], Awaitable[list[bytes]]], *, part_gap_s: float = 0.0) -> None:
    """Answer the requests of one keep-alive connection in turn (each answer's parts written as they come, with
    ``part_gap_s`` between two parts of one answer), until the client closes it or asks to."""
    try:
        while (request := await read_request(reader)) is not None:
            for i, part in enumerate(await answer(request)):
                if i and part_gap_s > 0:
                    await asyncio.sleep(part_gap_s)
                writer.write(part)
                await writer.drain()
            if request.close:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> StubRequest | None:
    """The next HTTP/1.1 request on a keep-alive connection (Content-Length bodies only), or None at its end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in header_lines if ":" in line)}
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return StubRequest(method=method, path=path.split("?", 1)[0], body=body,
                       close=headers.get("connection", "").lower() == "close")


class _Stub:
    def __init__(self, model: str, *, event_gap_s: float = 0.0) -> None:
        self.model = model
        self.counter = 0
        self.event_gap_s = event_gap_s
        """Between two parts of a streamed answer (its head, each event, its end); 0: all written at once."""

    def models(self) -> bytes:
        return _json("200 OK", {"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "stub", "root": self.model}]})

    def complete(self, path: str, body: dict[str, Any]) -> list[bytes]:
        chat = path.endswith("/chat/completions")
        tokens = int(body.get("max_tokens") or _DEFAULT_TOKENS)
        prompt = body.get("messages") if chat else body.get("prompt")
        prompt_tokens = len(json.dumps(prompt)) if prompt is not None else 0
        self.counter += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-stub{self.counter}"
        created = int(time.time())
        model = body.get("model", self.model)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        if not body.get("stream"):
            text = _TOKEN * tokens
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "length"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
                obj = "text_completion"
            return [_json("200 OK", {"id": rid, "object": obj, "created": created, "model": model,
                                     "choices": [choice], "usage": usage})]
        obj = "chat.completion.chunk" if chat else "text_completion"
        prefix = json.dumps({"id": rid, "object": obj, "created": created, "model": model},
                            separators=(",", ":"))[:-1]
        continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        events: list[bytes] = []
        if chat:
            events.append(f'data: {prefix},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                          f'"finish_reason":null}}]}}\n\n'.encode())
        for i in range(tokens):
            finish = '"length"' if i == tokens - 1 else "null"
            piece = f'"delta":{{"content":"{_TOKEN}"}}' if chat else f'"text":"{_TOKEN}"'
            so_far = (f',"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens + i + 1},'
                      f'"completion_tokens":{i + 1}}}') if continuous else ""
            events.append(f'data: {prefix},"choices":[{{"index":0,{piece},"logprobs":null,"finish_reason":{finish}}}]'
                          f'{so_far}}}\n\n'.encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_json = json.dumps(usage, separators=(",", ":"))
            events.append(f'data: {prefix},"choices":[],"usage":{usage_json}}}\n\n'.encode())
        events.append(b"data: [DONE]\n\n")
        head = _head("200 OK", [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                                ("transfer-encoding", "chunked")])
        return [head, *(_chunk(e) for e in events), b"0\r\n\r\n"]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(request: StubRequest) -> list[bytes]:
            return self.route(request.method, request.path, request.body)

        await serve_connection(reader, writer, answer, part_gap_s=self.event_gap_s)

    def route(self, method: str, path: str, raw: bytes) -> list[bytes]:
        if method == "GET" and path in ("/health", "/ping"):
            return [_head("200 OK", [("content-length", "0")])]
        if method == "GET" and path == "/v1/models":
            return [self.models()]
        if method == "GET" and path == "/metrics":
            return [_head("200 OK", [("content-type", "text/plain"), ("content-length", "0")])]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            try:
                body = json.loads(raw)
            except ValueError:
                return [_json("400 Bad Request", {"error": {"message": "bad json", "type": "BadRequestError",
                                                            "param": None, "code": 400}})]
            return self.complete(path, body)
        if method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return [_json("200 OK", {"status": "ok"})]
        return [_json("404 Not Found", {"error": {"message": "not found", "type": "NotFoundError", "param": None,
                                                  "code": 404}})]


async def _main(port: int, model: str, event_gap_s: float = 0.0) -> None:
    stub = _Stub(model, event_gap_s=event_gap_s)
    server = await asyncio.start_server(stub.serve, HOST, port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"stub OpenAI server on http://{HOST}:{port} (model {model})", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--model", default="banyan-demo")
    parser.add_argument("--event-gap-ms", type=float, default=0.0,
                        help="pause between two events of a stream (0: the whole stream at once)")
    args = parser.parse_args()
    coro = _main(args.port, args.model, args.event_gap_ms / 1000)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
