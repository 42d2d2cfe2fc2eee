"""The engine client's own CPU cost: the gateway's three ways to call a replica, side by side in one run.

    .venv/bin/python -m loadtests.engine_client_bench            # 3,000 calls each, 64 in flight, 3 rounds
    .venv/bin/python -m loadtests.engine_client_bench --stream --pin 1

Starts the local OpenAI stub (``loadtests.stub_openai``, loopback) and sends the same chat completions through
each caller of :mod:`gateway.engine_http`, taking turns round by round: ``httpx`` (httpx's client on its own
pool, httpcore), ``httpx+aiohttp`` (httpx's client on :class:`~gateway.engine_http.AiohttpTransport`) and
``aiohttp`` (:class:`~gateway.engine_http.AiohttpCaller`, the gateway's completion path). For each: this process's
CPU time per call (user + system, all of it the client's: the stub runs in its own process) and calls per second.
``--pin CPU`` runs this process on one CPU and the stub on the others (``taskset``). Prints a table and, last,
``RESULT {json}``. Stops the stub by process id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gateway.dev.processes import free_port
from gateway.engine_http import AiohttpCaller, AiohttpTransport, EngineCaller, HttpxCaller

BODY: dict[str, Any] = {"model": "banyan-demo", "messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 16}


def _callers(url: str) -> dict[str, tuple[EngineCaller, Callable[[], Awaitable[None]]]]:
    timeout = httpx.Timeout(60.0, connect=5.0)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512, keepalive_expiry=3.0)
    plain = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)
    pooled = AiohttpTransport()
    over_aiohttp = httpx.AsyncClient(base_url=url, timeout=timeout, transport=pooled)
    direct = AiohttpTransport()
    return {"httpx": (HttpxCaller(plain), plain.aclose),
            "httpx+aiohttp": (HttpxCaller(over_aiohttp), over_aiohttp.aclose),
            "aiohttp": (AiohttpCaller(direct, base_url=url, headers={}, timeout=timeout), direct.aclose)}


async def _call(caller: EngineCaller, *, stream: bool) -> None:
    response = await caller.open("/v1/chat/completions", {**BODY, "stream": stream}, headers={})
    try:
        if response.status_code != 200:
            raise RuntimeError(f"the stub answered {response.status_code}")
        if stream:
            async for _ in response.aiter_raw():
                pass
        else:
            await response.aread()
    finally:
        await response.aclose()


async def _round(caller: EngineCaller, *, calls: int, concurrency: int, stream: bool) -> tuple[float, float]:
    """CPU seconds of this process and wall seconds for ``calls`` calls, ``concurrency`` in flight."""
    left = iter(range(calls))

    async def worker() -> None:
        for _ in left:
            await _call(caller, stream=stream)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def _bench(url: str, *, calls: int, concurrency: int, rounds: int, stream: bool) -> dict[str, Any]:
    callers = _callers(url)
    totals = {name: [0.0, 0.0] for name in callers}
    try:
        for caller, _ in callers.values():  # warm-up: connections opened, code paths hot
            await _round(caller, calls=concurrency * 2, concurrency=concurrency, stream=stream)
        for r in range(rounds):
            names = list(callers) if r % 2 == 0 else list(reversed(callers))
            for name in names:
                cpu, wall = await _round(callers[name][0], calls=calls, concurrency=concurrency, stream=stream)
                totals[name][0] += cpu
                totals[name][1] += wall
                print(f"[engine-client] round {r + 1}/{rounds} {name:14s} {1e6 * cpu / calls:7.1f} us CPU/call "
                      f"{calls / wall:8.1f} calls/s", file=sys.stderr, flush=True)
    finally:
        for _, close in callers.values():
            await close()
    n = calls * rounds
    return {name: {"cpu_us_per_call": round(1e6 * cpu / n, 1), "calls_per_s": round(n / wall, 1)}
            for name, (cpu, wall) in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.engine_client_bench",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="calls per caller per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="streamed completions (else JSON)")
    parser.add_argument("--pin", default="", metavar="CPU", help="run this process on CPU, the stub on the others")
    args = parser.parse_args(argv)
    port = free_port()
    stub_cmd = [sys.executable, "-m", "loadtests.stub_openai", "--port", str(port)]
    if args.pin:
        others = sorted(os.sched_getaffinity(0) - {int(args.pin)})
        stub_cmd = ["taskset", "-c", ",".join(map(str, others)), *stub_cmd] if others else stub_cmd
        os.sched_setaffinity(0, {int(args.pin)})
    stub = subprocess.Popen(stub_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or stub.poll() is not None:
                    raise RuntimeError("the stub did not start") from None
                time.sleep(0.1)
        try:
            import uvloop
            figures = uvloop.run(_bench(url, calls=args.calls, concurrency=args.concurrency, rounds=args.rounds,
                                        stream=args.stream))
        except ImportError:
            figures = asyncio.run(_bench(url, calls=args.calls, concurrency=args.concurrency, rounds=args.rounds,
                                         stream=args.stream))
    finally:
        stub.terminate()
        stub.wait(timeout=30)
    mode = "stream" if args.stream else "json"
    print(f"\nEngine callers, {mode}, {args.concurrency} in flight, {args.rounds} x {args.calls} calls each")
    print(f"{'caller':14s} {'CPU us/call':>12s} {'calls/s':>9s}")
    for name, row in figures.items():
        print(f"{name:14s} {row['cpu_us_per_call']:12.1f} {row['calls_per_s']:9.1f}")
    result = {"mode": mode, "concurrency": args.concurrency, "calls": args.calls, "rounds": args.rounds,
              "pinned": args.pin or None, "callers": figures,
              "httpx_over_aiohttp_cpu": round(figures["httpx"]["cpu_us_per_call"]
                                              / figures["aiohttp"]["cpu_us_per_call"], 2),
              "loadavg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
              "seconds": round(time.monotonic() - started, 1)}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
