"""Unloaded time to first token through two gateways side by side: the same engine, one setting apart.

    .venv/bin/python -m loadtests.ttft_ab --compare-env BANYAN_ENGINE_FIRST=false

Self-contained: it starts ``banyan dev --empty`` (the tiny demo model on vLLM, Valkey, S3), then two more gateways
(``banyan serve``, same Redis, S3 and engine): A with the default settings, B with ``--compare-env``. It sends one
streamed chat completion at a time, in rotation, straight to the engine and through A and B (the same prompts and
lengths for each), and prints the time to the first token of each (p50, p90) and the overhead of A and B over the
engine's, then ``RESULT {json}``. One request at a time is what the time to first token a gateway adds is made of
(its own work and its round trips, not a queue); ``loadtests.bench`` measures the same for the dev gateway
(``unloaded_ttft_p50_overhead_ms``). ``engine_first_granted``: how many requests each gateway started on the engine
while their admission was decided. Everything it started is stopped at the end, by process id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.dev.launcher import launch_dev
from gateway.dev.processes import Children
from loadtests._stack import metric_sum, scrape
from loadtests._stats import percentile
from loadtests.bench import _TOKEN_RE, PROMPT, _tenant_key, compare_env_of, start_serve_gateway

REPO = Path(__file__).resolve().parents[1]


async def _ttft(session: aiohttp.ClientSession, url: str, key: str, model: str, tag: str, max_tokens: int) -> float:
    """Seconds from sending one streamed chat completion to the first event with text."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(tag=tag)}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    tail = b""
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for chunk in response.content.iter_any():
            if first is None and _TOKEN_RE.search(tail + chunk):  # an event with text (not the role's)
                first = time.perf_counter() - started
            tail = chunk[-64:]
    if first is None:
        raise RuntimeError(f"{url}: a stream without text")
    return first


async def _measure(targets: dict[str, tuple[str, str]], model: str, *, requests: int, max_tokens: int,
                   warmup: int = 3) -> dict[str, list[float]]:
    """``requests`` rounds; each round one request to every target, the order rotating from round to round."""
    names = list(targets)
    seen: dict[str, list[float]] = {name: [] for name in names}
    async with aiohttp.ClientSession() as session:
        for name, (url, key) in targets.items():
            for i in range(warmup):
                await _ttft(session, url, key, model, f"warm-{name}-{i}", max_tokens)
        for i in range(requests):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                url, key = targets[name]
                seen[name].append(await _ttft(session, url, key, model, f"r{i}", max_tokens))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ttft_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE", required=True,
                        help="gateway B's setting (repeatable), e.g. BANYAN_ENGINE_FIRST=false")
    parser.add_argument("--requests", type=int, default=60, help="requests to each target")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=REPO / ".banyan" / "bench",
                        help="banyan dev's data dir (the demo model is built there once)")
    args = parser.parse_args(argv)
    compare_env = compare_env_of(parser, args.compare_env)
    data_dir = args.data_dir.resolve()
    (data_dir / "stack.json").unlink(missing_ok=True)
    children = Children(data_dir / "logs")
    stack = launch_dev(data_dir, admin_key="adm_bench_" + secrets.token_hex(16))
    load_start = os.getloadavg()[0]
    try:
        print(f"[ttft_ab] starting banyan dev --empty (data in {data_dir}) ...", file=sys.stderr, flush=True)
        stack.wait_ready()
        info = stack.info
        key = _tenant_key(stack.url, stack.admin_key)
        engine = {"engine_url": info["engine_url"], "engine_api_key": info["engine_api_key"]}
        _, a_url = start_serve_gateway(children, stack, name="ttft-gateway-a", **engine)
        _, b_url = start_serve_gateway(children, stack, name="ttft-gateway-b", extra_env=compare_env, **engine)
        targets = {"engine": (info["engine_url"], info["engine_api_key"]), "A": (a_url, key), "B": (b_url, key)}
        print(f"[ttft_ab] {args.requests} streams to each of the engine, A and B, one at a time ...", file=sys.stderr,
              flush=True)
        seen = asyncio.run(_measure(targets, info["base_model"], requests=args.requests, max_tokens=args.max_tokens))
        early = {name: metric_sum(scrape(url), "banyan_engine_first_total", outcome="granted")
                 for name, url in (("A", a_url), ("B", b_url))}
    finally:
        children.stop_all()
        stack.stop()
    ms = {name: {p: round(1000 * percentile(values, p), 2) for p in (50, 90)} for name, values in seen.items()}
    result: dict[str, Any] = {
        "compare_env": compare_env, "requests_each": args.requests, "ttft_ms": ms,
        "a_overhead_p50_ms": round(ms["A"][50] - ms["engine"][50], 2),
        "b_overhead_p50_ms": round(ms["B"][50] - ms["engine"][50], 2),
        "engine_first_granted": early,
        "loadavg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}
    print(f"time to first token, p50 / p90 ms: engine {ms['engine'][50]} / {ms['engine'][90]}, "
          f"A {ms['A'][50]} / {ms['A'][90]} (+{result['a_overhead_p50_ms']}), "
          f"B ({' '.join(f'{k}={v}' for k, v in compare_env.items())}) {ms['B'][50]} / {ms['B'][90]} "
          f"(+{result['b_overhead_p50_ms']})")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
