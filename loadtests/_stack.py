"""What the load scripts share about a local stack: where ``banyan dev`` keeps the demo model, and its Prometheus
text. The stack itself is started, awaited and stopped by :mod:`gateway.dev.launcher` (the integration tests use
the same launcher)."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from gateway.dev.launcher import READY_TIMEOUT_S, launch_dev
from gateway.dev.processes import Children, free_port, redis_ok
from gateway.dev.stack import search_module, valkey_binary

BASE_MODEL = "banyan-demo"


def model_dir(data_dir: Path) -> Path:
    """Where ``banyan dev`` keeps (and reuses) the demo base model under ``data_dir``."""
    return data_dir / "models" / BASE_MODEL


Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition as ``(name, labels, value)``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of one metric's samples whose labels include ``labels``."""
    return sum(value for n, lab, value in samples
               if n == name and all(lab.get(k) == v for k, v in labels.items()))


def metric_by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """One metric's samples summed per value of one label."""
    out: dict[str, float] = {}
    for n, lab, value in samples:
        if n == name:
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + value
    return out


def scrape(url: str) -> list[Sample]:
    return parse_metrics(httpx.get(url.rstrip("/") + "/metrics", timeout=30).text)


def run_on_stack(script: str, *, url: str | None, admin_key: str | None, data_dir: Path, model: str,
                 work: Callable[[str, str], Coroutine[Any, Any, dict[str, Any]]],
                 ready_timeout: float = READY_TIMEOUT_S) -> int:
    """Run ``work(gateway URL, admin key)`` against the running stack at ``url``, or against a ``banyan dev
    --empty`` of ``model`` started in ``data_dir`` (the converted model is kept there and reused) and stopped
    afterwards; print its result as the ``RESULT {json}`` line last."""
    stack = None
    try:
        if url and admin_key:
            result = asyncio.run(work(url, admin_key))
        else:
            (data_dir / "stack.json").unlink(missing_ok=True)
            stack = launch_dev(data_dir, model=model, admin_key=f"adm_{script}_" + secrets.token_hex(16))
            print(f"[{script}] starting banyan dev --empty (model {model}) on 127.0.0.1:{stack.port}, "
                  f"data in {data_dir} ...", file=sys.stderr, flush=True)
            stack.wait_ready(timeout=ready_timeout)
            result = asyncio.run(work(stack.url, stack.admin_key))
    finally:
        if stack is not None:
            stack.stop()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def start_search_valkey(children: Children) -> str:
    """A throwaway Valkey with the search module on a free loopback port (no persistence), started under
    ``children`` (the caller stops it with ``children.stop_all()``); its ``redis://`` URL."""
    port = free_port()
    valkey = children.spawn("valkey", [valkey_binary(), "--bind", "127.0.0.1", "--port", str(port),
                                       "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                                       "--loadmodule", str(search_module())])
    children.wait_ready(valkey, redis_ok(port), timeout=30)
    print(f"Valkey with the search module on 127.0.0.1:{port} (pid {valkey.process.pid})")
    return f"redis://127.0.0.1:{port}/0"
