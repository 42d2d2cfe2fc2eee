"""What tracing adds to one request on the gateway's request path, off (the default) and on.

Runs, per simulated request, exactly the tracing calls the gateway makes for a streamed chat request with ``rag``
(the request span begun and ended, the ``auth``, ``admission``, ``model_resolution``, ``retrieval`` and
``engine_call`` stages, the engine call's headers, the ``stream`` span), with the stages' own work left out: the
difference to a gateway without tracing code, which made none of these calls. Three ways: off (no SDK), on with an
SDK that samples nothing (``ALWAYS_OFF``: the cost of the span plumbing), and on, exporting to memory. Nothing is
started and no network is used.

    .venv/bin/python -m loadtests.tracing_overhead [--requests 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from gateway.tracing import Tracing

_HEADERS = {b"authorization": b"Bearer bk_x", b"content-type": b"application/json",
            b"traceparent": b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def _one_request(tracing: Tracing) -> None:
    span = tracing.begin_request(method="POST", path="/v1/chat/completions", headers=_HEADERS, request_id="req_1")
    with tracing.stage("auth"):
        pass
    with tracing.stage("admission"):
        pass
    with tracing.stage("model_resolution", **{"banyan.model": "demo-pirate"}):
        pass
    with tracing.stage("retrieval"):
        pass
    with tracing.stage("engine_call", **{"banyan.stream": True}):
        tracing.engine_headers()
    stream = tracing.start("stream")
    if stream is not None:
        stream.set_attribute("banyan.client_left", False)
        stream.end()
    tracing.end_request(span, route="/v1/chat/completions", status=200, method="POST")


def _per_request_us(tracing: Tracing, requests: int) -> float:
    for _ in range(min(1000, requests)):  # warm up
        _one_request(tracing)
    gc.collect()
    best = float("inf")
    for _ in range(5):  # the best of five rounds: the machine is shared
        started = time.perf_counter()
        for _ in range(requests):
            _one_request(tracing)
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    exporter = InMemorySpanExporter()
    exporting = TracerProvider()
    exporting.add_span_processor(SimpleSpanProcessor(exporter))
    results = {
        "off_us": _per_request_us(Tracing(), args.requests),
        "on_not_sampled_us": _per_request_us(Tracing(TracerProvider(sampler=ALWAYS_OFF)), args.requests),
        "on_exported_to_memory_us": _per_request_us(Tracing(exporting), args.requests // 10),
    }
    for name, value in results.items():
        print(f"{name:>26}: {value:8.2f} us per request")
    print("RESULT " + json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
