"""Gateway overhead, measured side by side in one run.

    .venv/bin/python -m loadtests.bench --quick

Self-contained: it starts ``banyan dev --empty`` (Valkey + search, moto S3, the vLLM engine on the
CPU, the gateway), creates a tenant and a key, and sends the same workload (64 concurrent chat
completions of the base model, streaming and not) in alternating rounds directly to the vLLM server
and through the gateway in front of that same server. Then it measures the gateway alone: a second
gateway process (``banyan serve``, same Redis and S3) in front of a minimal local OpenAI stub
(``loadtests.stub_openai``), driven as hard as this machine allows, with the CPU time of the
gateway process per request (``gateway_alone_ratio``: gateway+stub req/s over stub-direct req/s, same
concurrency, same run). ``--pin-stub 0 --pin-gateway 1`` runs the two on disjoint CPUs (``taskset -c``) so the
ratio measures the gateway, not two processes queueing for one core; ``--alone-only`` skips the engine rounds;
``--event-gap-ms`` paces the stub's stream events (the gateway then relays them one by one, as from an engine:
``gateway_alone_cpu_us_per_token`` beside ``floor_cpu_us_per_token`` is the relay's cost per streamed token;
``--proto-floor`` adds ``proto_floor_cpu_us_per_token``, the same through a relay at the protocol level).
Everything it started is stopped at the end, by process id.

It prints a table and, last, one line ``RESULT {json}`` with (gateway / direct) throughput ratios,
the gateway's TTFT and latency overheads, and ``gateway_cpu_per_token_ratio``: the gateway's CPU over the CPU of
vLLM's API server process for the same streamed tokens (both measured over the gateway's streamed rounds).
Goals (GitHub issue #13): ``gateway_alone_ratio`` >= 0.7 in both modes, ``gateway_cpu_per_token_ratio`` <= 0.5,
``unloaded_ttft_p50_overhead_ms`` <= 2.
Client, gateway and engine share this machine's cores, so the gateway's CPU is taken from the
engine: the ratios include that cost, which is the honest number for a single box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from gateway.dev.launcher import DevProcess, launch_dev, pinned, serve_env, start_serve
from gateway.dev.processes import Child, Children, free_port, http_ok
from gateway.engine_http import AiohttpTransport
from loadtests._stats import percentile

REPO = Path(__file__).resolve().parents[1]
GATEWAY, GATEWAY_B, FLOOR, PROTO_FLOOR = "gateway+stub", "gw B+stub", "floor+stub", "proto+stub"
UNLOADED_PAIRS = 3
UNLOADED_REQUESTS = 12
PROMPT = "Request {tag}: write a short poem about the sea, the wind and the old lighthouse keeper."


@dataclass
class Options:
    rounds: int
    requests: int
    concurrency: int
    max_tokens: int
    stub_seconds: float
    stub_concurrency: list[int]
    data_dir: Path
    skip_stub: bool
    alone_only: bool = False
    # `taskset -c` CPU lists ("0", "1", "0-1"); empty: not pinned. Disjoint CPUs for the stub and the gateway make
    # gateway_alone_ratio measure the gateway's own cost, not the wait of two processes for one core.
    pin_stub: str = ""
    pin_gateway: str = ""
    compare_env: dict[str, str] = field(default_factory=dict)
    """Settings of a second gateway ("gateway B") measured in the same run, in front of the same stub: an A/B
    of one change (e.g. ``BANYAN_KEY_CACHE_TTL_S=0``); empty: no second gateway."""
    proto_floor: bool = False
    """Also measure :mod:`loadtests.proto_proxy` (a relay at the protocol level) beside the bare proxy."""
    event_gap_ms: float = 0.0
    """The stub's pause between two events of a stream (``--event-gap-ms``): 0 sends a whole stream at once (the
    gateway relays it in one read); a gap makes it relay event by event, as it does from an engine, so its CPU per
    streamed token (``gateway_alone_cpu_us_per_token``) is the relay's."""
    client: str = "aiohttp"
    """The connection pool under the bench's httpx client: ``aiohttp`` (:class:`gateway.engine_http.AiohttpTransport`,
    constant time per request) or ``httpx`` (httpcore's, which walks every connection per request: at 64 in flight
    it costs the client several ms a request and caps what it can send through a gateway at ~100 req/s here)."""


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class Series:
    """All samples of one (target, mode) across rounds, and the wall time they took."""
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    rounds: list[float] = field(default_factory=list)  # requests/s of each round
    round_ttft_p50: list[float] = field(default_factory=list)
    round_latency_p50: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds of the watched process during these rounds
    engine_cpu: float = 0.0  # CPU seconds of vLLM's API server process during these rounds

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall if self.wall else 0.0

    @property
    def tps(self) -> float:
        return sum(s.tokens for s in self.ok) / self.wall if self.wall else 0.0

    def pct(self, p: float, attr: str = "latency") -> float:
        """The ``p``-th percentile (0-100, :func:`loadtests._stats.percentile`) of one timing of the good samples."""
        return percentile((v for s in self.ok if (v := getattr(s, attr)) is not None), p)


# -- requests ------------------------------------------------------------------------------------------


def _tokens(i: int, mean: int) -> int:
    """Request ``i``'s output length: spread over [mean/2, 3 mean/2], the same sequence for both targets.
    Equal lengths would keep a closed loop of workers in lockstep (the whole batch prefills, decodes and
    finishes together, then comes back at once), and which regime a round falls into swamps the
    difference being measured."""
    return mean // 2 + (i * 37) % (mean + 1)


def _body(model: str, tag: str, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(tag=tag)}],
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# The client must cost little CPU (it shares the cores with what it measures): streams are scanned as
# raw bytes (vLLM, the gateway and the stub all send compact JSON), not split into lines and parsed.
_TOKEN_RE = re.compile(rb'"(?:content|text)":"[^"]')  # a chunk with generated text (not the role chunk)
_USAGE_RE = re.compile(rb'"completion_tokens":(\d+)')


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    started = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post("/v1/chat/completions", json=body)
            found = _USAGE_RE.search(response.content)
            if response.status_code != 200 or not found:
                return Sample(ok=False, latency=time.perf_counter() - started, error=_error(response))
            return Sample(ok=True, latency=time.perf_counter() - started, tokens=int(found[1]))
        ttft: float | None = None
        tail = b""
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(ok=False, latency=time.perf_counter() - started, error=_error(response))
            async for chunk in response.aiter_raw():
                if ttft is None and _TOKEN_RE.search(tail[-64:] + chunk):
                    ttft = time.perf_counter() - started
                tail = (tail + chunk)[-2048:]
        latency = time.perf_counter() - started
        usage = _USAGE_RE.findall(tail)
        error = ""
        if b'data: {"error"' in tail:
            error = "error event: " + tail[tail.find(b'data: {"error"'):][:160].decode(errors="replace")
        elif not tail.endswith(b"data: [DONE]\n\n") or not usage:
            error = "stream ended early"
        return Sample(ok=not error, latency=latency, ttft=ttft, tokens=int(usage[-1]) if usage else 0, error=error)
    except httpx.HTTPError as e:
        return Sample(ok=False, latency=time.perf_counter() - started, error=type(e).__name__)


def _error(response: httpx.Response) -> str:
    return f"{response.status_code}: {response.text[:160]}"


async def _run_count(client: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int) -> tuple[
        list[Sample], float]:
    """Send ``bodies`` with ``concurrency`` requests in flight; the samples and the wall time."""
    samples: list[Sample] = []
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            samples.append(await _one(client, body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


async def _run_for(client: httpx.AsyncClient, make: Callable[[int], dict[str, Any]], concurrency: int,
                   seconds: float) -> tuple[list[Sample], float]:
    """Closed loop for ``seconds``: as many requests as ``concurrency`` workers can complete."""
    samples: list[Sample] = []
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            samples.append(await _one(client, make(next(counter))))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def _client(url: str, key: str | None, concurrency: int, pool: str = "aiohttp") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # Idle connections are dropped after 3 s, before the servers' 5 s keep-alive timeout (uvicorn's default,
    # also vLLM's): reusing one the server is closing at that moment fails the request (ReadError), and a
    # target sits idle while the other one runs its round.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=3.0)
    transport = AiohttpTransport(max_connections=concurrency, keepalive_expiry=3.0) if pool == "aiohttp" else None
    return httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(600, connect=10),
                             transport=transport)


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


# -- the stack -----------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _start_dev(options: Options) -> DevProcess:
    """``banyan dev --empty`` (the tiny demo model) on a free loopback port, data in ``options.data_dir`` (the
    model is built there once and reused); returns at once: call ``DevProcess.wait_ready`` (then its ``info``
    holds its stack.json)."""
    (options.data_dir / "stack.json").unlink(missing_ok=True)
    stack = launch_dev(options.data_dir, admin_key="adm_bench_" + secrets.token_hex(16))
    _say(f"[bench] starting banyan dev --empty on 127.0.0.1:{stack.port} (data in {options.data_dir}) ...")
    return stack


def _start_stub(children: Children, stack: DevProcess, options: Options) -> tuple[Child, str]:
    """A local OpenAI stub serving the dev stack's base model."""
    info = stack.info
    stub_port = free_port()
    stub = children.spawn("bench-stub", [*pinned(options.pin_stub), sys.executable, "-m", "loadtests.stub_openai",
                                         "--port", str(stub_port), "--model", info["base_model"],
                                         "--event-gap-ms", str(options.event_gap_ms)], cwd=REPO)
    stub_url = f"http://127.0.0.1:{stub_port}"
    children.wait_ready(stub, http_ok(stub_url + "/health"), timeout=30)
    return stub, stub_url


def start_serve_gateway(children: Children, stack: DevProcess, *, name: str, engine_url: str,
                        engine_api_key: str | None = None, pin: str = "",
                        extra_env: dict[str, str] | None = None) -> tuple[Child, str]:
    """Another gateway (``banyan serve``) on the dev stack's Redis and S3, in front of ``engine_url`` (the stack's
    engine, or a stub), on the CPUs ``pin`` (a ``taskset -c`` list; empty: any)."""
    info = stack.info
    env = serve_env(port=free_port(), admin_key=stack.admin_key, data_dir=stack.data_dir,
                    redis_url=info["redis_url"], s3=stack.s3_settings(), engine_urls=engine_url,
                    base_model=info["base_model"], model_config=Path(info["model_path"]) / "config.json",
                    engine_api_key=engine_api_key, extra=extra_env)
    return start_serve(children, name, env, cwd=REPO, timeout=120, cpus=pin)


def compare_env_of(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """``--compare-env NAME=VALUE`` items as a mapping (a usage error otherwise)."""
    if any("=" not in item for item in items):
        parser.error("--compare-env takes NAME=VALUE")
    return dict(item.split("=", 1) for item in items)


def _start_floor(children: Children, options: Options, stub_url: str, *,
                 module: str = "loadtests.minimal_proxy") -> tuple[Child, str]:
    """A bare proxy (:mod:`loadtests.minimal_proxy`, or ``module``) in front of the stub, on the gateway's CPUs."""
    port = free_port()
    cmd = [*pinned(options.pin_gateway), sys.executable, "-m", module, "--port", str(port), "--upstream", stub_url]
    proxy = children.spawn("bench-" + module.rsplit(".", 1)[-1], cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    children.wait_ready(proxy, http_ok(url + "/health"), timeout=30)
    return proxy, url


def _tenant_key(gateway_url: str, admin_key: str) -> str:
    tenant = f"bench-{secrets.token_hex(3)}"
    with httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60) as admin:
        admin.post("/admin/tenants", json={"id": tenant, "name": "benchmark"}).raise_for_status()
        response = admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "bench"})
        response.raise_for_status()
        key: str = response.json()["key"]
        return key


# -- the benchmark -------------------------------------------------------------------------------------


Measured = dict[tuple[str, str], Series]


def _api_server(dev: psutil.Process) -> psutil.Process | None:
    """vLLM's API server among the dev stack's processes (its engine core is a child of it, not counted)."""
    for child in dev.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                return child
    return None


async def _side_by_side(options: Options, info: dict[str, Any], gateway_url: str, key: str,
                        gateway_process: psutil.Process) -> tuple[Measured, Measured]:
    """The loaded rounds (``options.concurrency`` in flight) and a few unloaded ones (one at a time)."""
    model = info["base_model"]
    api_server = _api_server(gateway_process)
    clients = {"direct": _client(info["engine_url"], info["engine_api_key"], options.concurrency, options.client),
               "gateway": _client(gateway_url, key, options.concurrency, options.client)}
    series = {(t, m): Series() for t in clients for m in ("nonstream", "stream")}
    unloaded = {(t, m): Series() for t in clients for m in ("nonstream", "stream")}
    try:
        _say("[bench] warm-up (not measured)")
        for target, client in clients.items():
            for stream in (False, True):
                bodies = [_body(model, f"warm-{target}-{stream}-{i}", stream=stream, max_tokens=options.max_tokens)
                          for i in range(options.concurrency)]
                samples, _ = await _run_count(client, bodies, options.concurrency)
                if not all(s.ok for s in samples):
                    raise RuntimeError(f"warm-up requests to {target} failed: {[s.error for s in samples if s.error]}")
        _say("[bench] unloaded: one request at a time")
        for r in range(UNLOADED_PAIRS):
            for mode in ("nonstream", "stream"):
                for target in (["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]):
                    bodies = [_body(model, f"u{r}-{mode}-{target}-{i:03d}", stream=mode == "stream",
                                    max_tokens=options.max_tokens) for i in range(UNLOADED_REQUESTS)]
                    samples, wall = await _run_count(clients[target], bodies, 1)
                    unloaded[(target, mode)].samples.extend(samples)
                    unloaded[(target, mode)].wall += wall
        for r in range(options.rounds):
            order = ["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]
            for mode in ("nonstream", "stream"):
                for target in order:
                    bodies = [_body(model, f"{r}-{mode}-{target}-{i:04d}", stream=mode == "stream",
                                    max_tokens=_tokens(i, options.max_tokens)) for i in range(options.requests)]
                    cpu_before, engine_before = _cpu(gateway_process), _cpu(api_server)
                    samples, wall = await _run_count(clients[target], bodies, options.concurrency)
                    s = series[(target, mode)]
                    s.cpu += _cpu(gateway_process) - cpu_before
                    s.engine_cpu += _cpu(api_server) - engine_before
                    s.samples.extend(samples)
                    s.wall += wall
                    s.rounds.append(sum(1 for x in samples if x.ok) / wall)
                    one = Series(samples=samples, wall=wall)
                    s.round_ttft_p50.append(one.pct(50, "ttft"))
                    s.round_latency_p50.append(one.pct(50))
                    _say(f"[bench] round {r + 1}/{options.rounds} {mode:9s} {target:7s} "
                         f"{s.rounds[-1]:7.1f} req/s  errors {sum(1 for x in samples if not x.ok)}")
    finally:
        for client in clients.values():
            await client.aclose()
    return series, unloaded


async def _gateway_alone(options: Options, stub_url: str, gateways: dict[str, tuple[str, psutil.Process]], key: str,
                         model: str) -> dict[str, Any]:
    """``gateways``: target name -> (url, process), each measured right after the stub, in the same order."""
    out: dict[str, Any] = {}
    me = psutil.Process()
    targets: list[tuple[str, str, str | None, psutil.Process | None]] = [("stub direct", stub_url, None, None)]
    targets += [(name, url, key, process) for name, (url, process) in gateways.items()]
    for mode in ("nonstream", "stream"):
        for concurrency in options.stub_concurrency:
            for target, url, auth, gateway_process in targets:
                def make(i: int, _mode: str = mode, _target: str = target) -> dict[str, Any]:
                    return _body(model, f"stub-{_target}-{i}", stream=_mode == "stream",
                                 max_tokens=_tokens(i, options.max_tokens))

                async with _client(url, auth, concurrency, options.client) as client:
                    await _run_for(client, make, concurrency, 1.0)  # warm the connections
                    gw_before, me_before = _cpu(gateway_process), _cpu(me)
                    samples, wall = await _run_for(client, make, concurrency, options.stub_seconds)
                    gw_cpu, me_cpu = _cpu(gateway_process) - gw_before, _cpu(me) - me_before
                ok = [s for s in samples if s.ok]
                tokens = sum(s.tokens for s in ok)
                entry: dict[str, Any] = {
                    "mode": mode, "target": target, "concurrency": concurrency, "requests": len(ok), "tokens": tokens,
                    "errors": len(samples) - len(ok), "rps": len(ok) / wall,
                    "p50_ms": _pct_ms(ok, 50), "p99_ms": _pct_ms(ok, 99),
                    "client_cpu_ms_per_request": 1000 * me_cpu / max(1, len(ok))}
                if len(ok) < len(samples):
                    entry["error_reasons"] = _reasons(samples)
                if gateway_process is not None:
                    entry["gateway_cpu_ms_per_request"] = 1000 * gw_cpu / max(1, len(ok))
                    entry["gateway_cpu_cores"] = gw_cpu / wall
                    entry["gateway_cpu_us_per_token"] = 1e6 * gw_cpu / max(1, tokens)
                out[f"{mode}/{target}/c{concurrency}"] = entry
                _say(f"[bench] alone {mode:9s} {target:12s} c={concurrency:<3d} {entry['rps']:8.1f} req/s")
    return out


def _reasons(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples:
        if sample.error:
            counts[sample.error] = counts.get(sample.error, 0) + 1
    return counts


def _pct_ms(samples: list[Sample], p: float) -> float:
    return 1000 * percentile((s.latency for s in samples), p)


def _machine() -> dict[str, Any]:
    memory = psutil.virtual_memory().total / 1024**3
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": psutil.cpu_count(), "cpu_model": model, "memory_gib": round(memory, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}


def _report(series: Measured, unloaded: Measured, alone: dict[str, Any], options: Options) -> dict[str, Any]:
    result = _report_side_by_side(series, unloaded, options) if series else {}
    if alone:
        result.update(_report_alone(alone, options))
    result["client"] = options.client
    result["machine"] = _machine()
    # The goals of GitHub issue #13, item 1, each judged when this run measured it.
    goals: dict[str, bool] = {}
    if "gateway_alone_ratio" in result and not options.event_gap_ms:  # a paced stub is not the stub at full speed
        goals["gateway_alone_ratio >= 0.7"] = min(result["gateway_alone_ratio"].values()) >= 0.7
    if result.get("gateway_cpu_per_token_ratio") is not None:
        goals["gateway_cpu_per_token_ratio <= 0.5"] = result["gateway_cpu_per_token_ratio"] <= 0.5
    if "unloaded_ttft_p50_overhead_ms" in result:
        goals["unloaded_ttft_p50_overhead_ms <= 2"] = result["unloaded_ttft_p50_overhead_ms"] <= 2
    result["goals"] = goals
    result["goals_met"] = bool(goals) and all(goals.values())
    return result


def _report_side_by_side(series: Measured, unloaded: Measured, options: Options) -> dict[str, Any]:
    ms = 1000.0
    print()
    print(f"Side by side: {options.rounds} paired rounds (order alternating) x {options.requests} requests, "
          f"{options.concurrency} concurrent, chat, {options.max_tokens // 2}-{options.max_tokens * 3 // 2} "
          f"tokens each (mean {options.max_tokens}), base model")
    header = (f"{'target':8s} {'mode':9s} {'ok':>6s} {'err':>4s} {'req/s':>8s} {'tok/s':>8s} {'ttft p50':>9s} "
              f"{'ttft p99':>9s} {'lat p50':>8s} {'lat p90':>8s} {'lat p99':>8s} {'gw cpu ms/req':>13s}")
    print(header)
    print("-" * len(header))
    for (target, mode), s in series.items():
        ttft50 = f"{s.pct(50, 'ttft') * ms:9.1f}" if mode == "stream" else f"{'-':>9s}"
        ttft99 = f"{s.pct(99, 'ttft') * ms:9.1f}" if mode == "stream" else f"{'-':>9s}"
        cpu = f"{1000 * s.cpu / max(1, len(s.ok)):13.2f}" if target == "gateway" else f"{'-':>13s}"
        print(f"{target:8s} {mode:9s} {len(s.ok):6d} {len(s.samples) - len(s.ok):4d} {s.rps:8.1f} {s.tps:8.0f} "
              f"{ttft50} {ttft99} {s.pct(50) * ms:8.1f} {s.pct(90) * ms:8.1f} {s.pct(99) * ms:8.1f} {cpu}")
    d_ns, g_ns = series[("direct", "nonstream")], series[("gateway", "nonstream")]
    d_s, g_s = series[("direct", "stream")], series[("gateway", "stream")]
    result: dict[str, Any] = {
        "stream_throughput_ratio": round(g_s.rps / d_s.rps, 4) if d_s.rps else None,
        "nonstream_throughput_ratio": round(g_ns.rps / d_ns.rps, 4) if d_ns.rps else None,
        "ttft_p50_overhead_ms": round((g_s.pct(50, "ttft") - d_s.pct(50, "ttft")) * ms, 2),
        "ttft_p99_overhead_ms": round((g_s.pct(99, "ttft") - d_s.pct(99, "ttft")) * ms, 2),
        "latency_p50_overhead_ms": round((g_ns.pct(50) - d_ns.pct(50)) * ms, 2),
        "latency_p99_overhead_ms": round((g_ns.pct(99) - d_ns.pct(99)) * ms, 2),
        "stream_latency_p50_overhead_ms": round((g_s.pct(50) - d_s.pct(50)) * ms, 2),
        # Rounds are paired (the two targets back to back, order alternating), so per-pair figures cancel
        # slow drift of the machine; their medians are less sensitive to a noisy round than pooled ones.
        "stream_round_ratios": [round(g / d, 3) for g, d in zip(g_s.rounds, d_s.rounds, strict=True)],
        "nonstream_round_ratios": [round(g / d, 3) for g, d in zip(g_ns.rounds, d_ns.rounds, strict=True)],
        "stream_throughput_ratio_median_of_rounds": round(percentile(
            [g / d for g, d in zip(g_s.rounds, d_s.rounds, strict=True)], 50), 4),
        "nonstream_throughput_ratio_median_of_rounds": round(percentile(
            [g / d for g, d in zip(g_ns.rounds, d_ns.rounds, strict=True)], 50), 4),
        "ttft_p50_overhead_ms_median_of_rounds": round(ms * percentile(
            [g - d for g, d in zip(g_s.round_ttft_p50, d_s.round_ttft_p50, strict=True)], 50), 2),
        "latency_p50_overhead_ms_median_of_rounds": round(ms * percentile(
            [g - d for g, d in zip(g_ns.round_latency_p50, d_ns.round_latency_p50, strict=True)], 50), 2),
        "direct_rps": {"stream": round(d_s.rps, 1), "nonstream": round(d_ns.rps, 1)},
        "gateway_rps": {"stream": round(g_s.rps, 1), "nonstream": round(g_ns.rps, 1)},
        "gateway_cpu_ms_per_request": {
            "stream": round(1000 * g_s.cpu / max(1, len(g_s.ok)), 2),
            "nonstream": round(1000 * g_ns.cpu / max(1, len(g_ns.ok)), 2)},
        # The same streamed tokens cost the gateway this much CPU against vLLM's API server (HTTP, detokenising,
        # SSE): measured over the same rounds, so the ratio is per token too (goal: at most 0.5).
        "gateway_cpu_per_token_ratio": round(g_s.cpu / g_s.engine_cpu, 4) if g_s.engine_cpu else None,
        "cpu_us_per_streamed_token": {
            "gateway": round(1e6 * g_s.cpu / max(1, sum(x.tokens for x in g_s.ok)), 1),
            "engine_api_server": round(1e6 * g_s.engine_cpu / max(1, sum(x.tokens for x in g_s.ok)), 1),
            "engine_api_server_direct": round(1e6 * d_s.engine_cpu / max(1, sum(x.tokens for x in d_s.ok)), 1)},
        "unloaded_ttft_p50_overhead_ms": round(ms * (
            unloaded[("gateway", "stream")].pct(50, "ttft") - unloaded[("direct", "stream")].pct(50, "ttft")), 2),
        "unloaded_latency_p50_overhead_ms": round(
            (unloaded[("gateway", "nonstream")].pct(50) - unloaded[("direct", "nonstream")].pct(50)) * ms, 2),
        "errors": sum(len(s.samples) - len(s.ok) for s in series.values()),
        "error_reasons": _reasons([x for s in series.values() for x in s.samples]),
        "concurrency": options.concurrency, "max_tokens": options.max_tokens, "rounds": options.rounds,
        "requests_per_round": options.requests,
    }
    per_token = result["cpu_us_per_streamed_token"]
    print(f"CPU per streamed token through the gateway: gateway {per_token['gateway']} us, vLLM API server "
          f"{per_token['engine_api_server']} us (ratio {result['gateway_cpu_per_token_ratio']}; goal <= 0.5)")
    print()
    print(f"Unloaded ({UNLOADED_PAIRS} alternating pairs x {UNLOADED_REQUESTS} requests, one at a time, "
          f"{options.max_tokens} tokens): p50 in ms")
    for mode in ("nonstream", "stream"):
        d, g = unloaded[("direct", mode)], unloaded[("gateway", mode)]
        what = "ttft" if mode == "stream" else "latency"
        print(f"  {mode:9s} {what:7s} direct {d.pct(50, what) * ms:7.1f}  gateway {g.pct(50, what) * ms:7.1f}  "
              f"overhead {(g.pct(50, what) - d.pct(50, what)) * ms:6.1f}")
    return result


def _report_alone(alone: dict[str, Any], options: Options) -> dict[str, Any]:
    result: dict[str, Any] = {}
    print()
    print(f"Gateway alone in front of a local OpenAI stub ({options.stub_seconds:.0f} s closed loop each)")
    header = (f"{'mode':9s} {'target':12s} {'conc':>4s} {'ok':>7s} {'err':>4s} {'req/s':>8s} {'p50 ms':>7s} "
              f"{'p99 ms':>7s} {'gw cpu ms/req':>13s} {'gw us/token':>11s} {'gw cores':>8s} {'client cpu ms/req':>17s}")
    print(header)
    print("-" * len(header))
    for e in alone.values():
        gw = (f"{e['gateway_cpu_ms_per_request']:13.2f} {e['gateway_cpu_us_per_token']:11.1f} "
              f"{e['gateway_cpu_cores']:8.2f}" if "gateway_cpu_ms_per_request" in e
              else f"{'-':>13s} {'-':>11s} {'-':>8s}")
        print(f"{e['mode']:9s} {e['target']:12s} {e['concurrency']:4d} {e['requests']:7d} {e['errors']:4d} "
              f"{e['rps']:8.1f} {e['p50_ms']:7.1f} {e['p99_ms']:7.1f} {gw} {e['client_cpu_ms_per_request']:17.2f}")
    for mode in ("nonstream", "stream"):
        entries = [e for e in alone.values() if e["mode"] == mode and e["target"] == GATEWAY]
        best = max(entries, key=lambda e: e["rps"])
        result[f"gateway_alone_{mode}_max_rps"] = round(best["rps"], 1)
        result[f"gateway_alone_{mode}_cpu_ms_per_request"] = round(best["gateway_cpu_ms_per_request"], 3)
        stub = [e for e in alone.values() if e["mode"] == mode and e["target"] == "stub direct"]
        result[f"stub_direct_{mode}_max_rps"] = round(max(e["rps"] for e in stub), 1)
    # Same run, same concurrency (the main one), target pairs measured back to back.
    c = options.concurrency if options.concurrency in options.stub_concurrency else options.stub_concurrency[0]

    def ratio(top: str, bottom: str) -> dict[str, float | None]:
        """``top``'s req/s over ``bottom``'s, per mode, at the main concurrency."""
        return {mode: round(alone[f"{mode}/{top}/c{c}"]["rps"] / alone[f"{mode}/{bottom}/c{c}"]["rps"], 4)
                if alone[f"{mode}/{bottom}/c{c}"]["rps"] else None for mode in ("stream", "nonstream")}

    def cpu(target: str) -> dict[str, float]:
        return {mode: round(alone[f"{mode}/{target}/c{c}"]["gateway_cpu_ms_per_request"], 3)
                for mode in ("stream", "nonstream")}

    def per_token(target: str) -> float:
        return round(alone[f"stream/{target}/c{c}"]["gateway_cpu_us_per_token"], 1)

    result["gateway_alone_ratio"] = ratio(GATEWAY, "stub direct")
    result["gateway_alone_concurrency"] = c
    result["stub_event_gap_ms"] = options.event_gap_ms
    result["gateway_alone_cpu_us_per_token"] = per_token(GATEWAY)
    if f"stream/{GATEWAY_B}/c{c}" in alone:  # the A/B: B's req/s over A's, and each one's CPU per request
        result["compare_env"] = options.compare_env
        result["gateway_b_over_a_rps"] = ratio(GATEWAY_B, GATEWAY)
        result["gateway_b_alone_ratio"] = ratio(GATEWAY_B, "stub direct")
        result["gateway_b_cpu_ms_per_request"] = cpu(GATEWAY_B)
        result["gateway_b_cpu_us_per_token"] = per_token(GATEWAY_B)
        print(f"gateway B ({' '.join(f'{k}={v}' for k, v in options.compare_env.items())}) / gateway A req/s at "
              f"c={c}: stream {result['gateway_b_over_a_rps']['stream']}, "
              f"non-stream {result['gateway_b_over_a_rps']['nonstream']}")
    if f"stream/{FLOOR}/c{c}" in alone:  # the bare proxy: what this machine and client allow any Python proxy
        result["floor_alone_ratio"] = ratio(FLOOR, "stub direct")
        result["floor_cpu_ms_per_request"] = cpu(FLOOR)
        result["floor_cpu_us_per_token"] = per_token(FLOOR)
        result["gateway_over_floor_rps"] = ratio(GATEWAY, FLOOR)
        print(f"bare proxy ({FLOOR}) / stub direct req/s at c={c}: stream {result['floor_alone_ratio']['stream']}, "
              f"non-stream {result['floor_alone_ratio']['nonstream']}; gateway / bare proxy: stream "
              f"{result['gateway_over_floor_rps']['stream']}, "
              f"non-stream {result['gateway_over_floor_rps']['nonstream']}")
    if f"stream/{PROTO_FLOOR}/c{c}" in alone:  # a relay at the protocol level: what no task per event saves
        result["proto_floor_cpu_ms_per_request"] = cpu(PROTO_FLOOR)
        result["proto_floor_cpu_us_per_token"] = per_token(PROTO_FLOOR)
        print(f"protocol-level relay ({PROTO_FLOOR}): CPU per streamed token {result['proto_floor_cpu_us_per_token']} "
              f"us, against the bare proxy's {result.get('floor_cpu_us_per_token')} and the gateway's "
              f"{result['gateway_alone_cpu_us_per_token']}")
    result["gateway_alone_pinning"] = {"stub": options.pin_stub or None, "gateway": options.pin_gateway or None}
    print(f"gateway+stub / stub direct req/s at c={c}: stream {result['gateway_alone_ratio']['stream']}, "
          f"non-stream {result['gateway_alone_ratio']['nonstream']} (pinning: stub "
          f"{options.pin_stub or '-'}, gateway {options.pin_gateway or '-'})")
    return result


async def _bench(options: Options, stack: DevProcess, children: Children) -> dict[str, Any]:
    admin_key, info, gateway_url = stack.admin_key, stack.info, stack.url
    key = _tenant_key(gateway_url, admin_key)
    # The dev gateway runs inside the `banyan dev` process (its other services are children of it).
    series: Measured = {}
    unloaded: Measured = {}
    if not options.alone_only:
        series, unloaded = await _side_by_side(options, info, gateway_url, key, psutil.Process(stack.process.pid))
    alone: dict[str, Any] = {}
    if not options.skip_stub:
        _say("[bench] the gateway alone: a second gateway in front of a local OpenAI stub")
        _, stub_url = _start_stub(children, stack, options)
        gateway, alone_url = start_serve_gateway(children, stack, name="bench-gateway-stub", engine_url=stub_url,
                                                 pin=options.pin_gateway)
        gateways = {GATEWAY: (alone_url, psutil.Process(gateway.process.pid))}
        if options.compare_env:
            b, b_url = start_serve_gateway(children, stack, name="bench-gateway-stub-b", engine_url=stub_url,
                                           pin=options.pin_gateway, extra_env=options.compare_env)
            gateways[GATEWAY_B] = (b_url, psutil.Process(b.process.pid))
        floor, floor_url = _start_floor(children, options, stub_url)
        gateways[FLOOR] = (floor_url, psutil.Process(floor.process.pid))
        if options.proto_floor:
            proto, proto_url = _start_floor(children, options, stub_url, module="loadtests.proto_proxy")
            gateways[PROTO_FLOOR] = (proto_url, psutil.Process(proto.process.pid))
        alone = await _gateway_alone(options, stub_url, gateways, key, info["base_model"])
    return _report(series, unloaded, alone, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                                help="6 paired rounds of 128 requests, 8 s per stub run (about 4-5 minutes here)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per target and mode")
    parser.add_argument("--requests", type=int, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32, help="mean output tokens per request")
    parser.add_argument("--stub-seconds", type=float, help="seconds per closed-loop run against the stub")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".banyan" / "bench",
                        help="banyan dev's data dir (the demo model is built there once)")
    parser.add_argument("--skip-stub", action="store_true", help="skip the gateway-alone measurement")
    parser.add_argument("--alone-only", action="store_true",
                        help="only the gateway-alone measurement (no rounds against the engine)")
    parser.add_argument("--pin-stub", default="", metavar="CPUS",
                        help="run the stub on these CPUs (`taskset -c` list, e.g. 0)")
    parser.add_argument("--pin-gateway", default="", metavar="CPUS",
                        help="run the gateway in front of the stub on these CPUs (e.g. 1); disjoint from --pin-stub")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="the bench client's connection pool (httpx's own caps the client near 100 req/s through "
                             "a gateway here)")
    parser.add_argument("--event-gap-ms", type=float, default=0.0,
                        help="the stub's pause between two events of a stream (0: a whole stream at once; e.g. 5 to "
                             "measure the relay event by event, as in front of an engine)")
    parser.add_argument("--proto-floor", action="store_true",
                        help="also measure loadtests.proto_proxy, a relay at the protocol level (no task, future or "
                             "ASGI layer per event), beside the bare proxy")
    parser.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE",
                        help="also measure a gateway B with this setting (repeatable) in the same run, in front of "
                             "the same stub (e.g. BANYAN_KEY_CACHE_TTL_S=0)")
    args = parser.parse_args(argv)
    compare_env = compare_env_of(parser, args.compare_env)
    if args.alone_only and args.skip_stub:
        parser.error("--alone-only and --skip-stub leave nothing to measure")
    quick = args.quick
    options = Options(rounds=args.rounds or (6 if quick else 12), requests=args.requests or (128 if quick else 256),
                      concurrency=args.concurrency, max_tokens=args.max_tokens,
                      stub_seconds=args.stub_seconds or (8.0 if quick else 20.0),
                      stub_concurrency=[args.concurrency] if quick else sorted({16, args.concurrency, 128}),
                      data_dir=args.data_dir.resolve(), skip_stub=args.skip_stub, alone_only=args.alone_only,
                      pin_stub=args.pin_stub, pin_gateway=args.pin_gateway, compare_env=compare_env,
                      client=args.client, event_gap_ms=args.event_gap_ms, proto_floor=args.proto_floor)
    children = Children(options.data_dir / "logs")
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    if load_at_start > (os.cpu_count() or 1) / 2:
        _say(f"[bench] note: the 1-minute load average is {load_at_start:.1f} before starting; other work on "
             "this machine will show up in the figures")
    stack: DevProcess | None = None
    try:
        stack = _start_dev(options)
        stack.wait_ready(timeout=420)
        result = _run(options, stack, children)
    finally:
        _say("[bench] stopping everything it started ...")
        children.stop_all(grace=90)
        if stack is not None:
            stack.stop(timeout=90)
    result["machine"]["loadavg_1m_at_start"] = round(load_at_start, 2)
    result["seconds"] = round(time.monotonic() - started, 1)
    print()
    print("RESULT " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


def _run(options: Options, stack: DevProcess, children: Children) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_bench(options, stack, children))
    result: dict[str, Any] = uvloop.run(_bench(options, stack, children))
    return result


if __name__ == "__main__":
    sys.exit(main())
