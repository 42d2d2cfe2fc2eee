"""Two gateways, two engines under adapter churn (GitHub issue #13, item 2).

    nice -n 15 .venv/bin/python -m loadtests.fleet_churn            # 200 adapters, 20 tenants, 800 requests
    nice -n 15 .venv/bin/python -m loadtests.fleet_churn --requests 400

It assembles the pieces of ``banyan dev`` (:class:`gateway.dev.stack.DevStack`, the tiny model) into a small fleet on
loopback: one Valkey and one moto S3, two real vLLM engines (each with the resolver plugin, its own disk cache and
the shm-sleep setting, as ``banyan dev`` starts them) and two gateways (``banyan serve`` child processes), each
gateway with both engines in its pool (``BANYAN_ENGINE_URLS``). Then:

1. **Churn.** The adapter churn traffic of :mod:`loadtests.adapter_churn` (Zipf popularity over many adapters and
   tenants, streaming completions at a fixed concurrency), request ``i`` sent to gateway ``i mod 2``. Reported:
   errors (the goal is 0), per engine the requests it served and its cold loads (S3 fetches by its resolver, and
   adapters vLLM resolved and loaded), per gateway its placements (``resident``/``home``/``spill``) and unloads.
2. **Shared quotas.** A tenant with a small ``rpm`` gets requests alternating over both gateways, more than its
   limit within one minute: exactly ``rpm`` must be admitted in all. A tenant with a small ``max_concurrency`` gets
   bursts of simultaneous long streams over both gateways: exactly ``max_concurrency`` must be admitted per burst.
3. **Shared usage.** The usage recorded in Redis (the admin API) must equal what the clients were served through
   both gateways together, and the sum of both gateways' own token counters.

It prints a table and, last, ``RESULT {json}``; exit status 1 when a goal is missed. Everything it starts is
stopped by process id at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr

from adapters.store import S3Settings
from gateway.dev.launcher import serve_env, start_serve
from gateway.dev.models import dev_model
from gateway.dev.processes import free_port
from gateway.dev.stack import DevStack, dev_settings
from gateway.settings import Settings
from loadtests._stack import Sample, metric_by_label, metric_sum, scrape
from loadtests.adapter_churn import (
    QUICK,
    Adapter,
    Outcome,
    RunConfig,
    Target,
    adapter_bytes,
    build_adapters,
    create_tenants,
    run_phase,
    summarize,
    upload_all,
    zipf_plan,
)

FLEET_MODEL = "tiny"
REQUEST_TIMEOUT_S = 120.0
DESCRIPTION = "Two gateways and two real engines under adapter churn: errors, cold loads per engine, shared quotas."


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class FleetConfig:
    churn: RunConfig
    engines: int = 2
    gateways: int = 2
    quota_rpm: int = 20
    """The rpm tenant's limit; it is sent twice as many requests, alternating over the gateways."""
    quota_concurrency: int = 2
    """The concurrency tenant's limit; each burst sends four times as many simultaneous streams."""
    bursts: int = 5
    burst_max_tokens: int = 256
    """Tokens each burst stream generates (long enough that a burst's streams overlap)."""


def parse_args(argv: Sequence[str] | None = None) -> FleetConfig:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fleet_churn", description=DESCRIPTION)
    parser.add_argument("--adapters", type=int, help="distinct adapters (default 200)")
    parser.add_argument("--tenants", type=int, help="tenants the adapters are spread over (default 20)")
    parser.add_argument("--requests", type=int, help="churn requests (default 800)")
    parser.add_argument("--concurrency", type=int, help="churn requests in flight (default 16)")
    parser.add_argument("--max-tokens", type=int, help="tokens per churn request (default 16)")
    parser.add_argument("--cache-adapters", type=int, help="each engine's disk cache in adapters' worth (default 60)")
    parser.add_argument("--resident", type=int, help="gateway residency bound per engine (default 24)")
    parser.add_argument("--max-cpu-loras", type=int, help="engine --max-cpu-loras (default 24)")
    parser.add_argument("--phase-seconds", type=float, help="time cap of the churn phase (default 300)")
    parser.add_argument("--seed", type=int, help="seed of adapters, popularity and prompts")
    parser.add_argument("--engines", type=int, default=2, help="vLLM engines (default 2)")
    parser.add_argument("--gateways", type=int, default=2, help="gateways (default 2)")
    parser.add_argument("--quota-rpm", type=int, default=20, help="rpm of the rpm tenant (default 20)")
    parser.add_argument("--quota-concurrency", type=int, default=2, help="max_concurrency of its tenant (default 2)")
    parser.add_argument("--bursts", type=int, default=5, help="simultaneous bursts for the concurrency limit")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data dirs, logs)")
    args = vars(parser.parse_args(argv))
    fleet = {k: args.pop(k) for k in ("engines", "gateways", "quota_rpm", "quota_concurrency", "bursts")}
    churn = {k: v for k, v in args.items() if v is not None and v is not False}
    base = dataclasses.replace(QUICK, phase_seconds=300.0, direct_requests=0)
    return FleetConfig(churn=dataclasses.replace(base, **churn), **fleet)


# ------------------------------------------------------------------------------------------------- stack


class FleetStack:
    """One Valkey, one moto S3, ``engines`` vLLM engines (one :class:`DevStack` each, for its own data dir, disk
    cache and logs) and ``gateways`` gateways (``banyan serve``), all on loopback. Started and stopped on the
    calling thread (children are asked to die with the thread that started them)."""

    def __init__(self, root: Path, cfg: FleetConfig, *, cache_bytes: int) -> None:
        self.root = root.resolve()
        self.cfg = cfg
        self.admin_key = "adm_fleet_" + secrets.token_hex(16)
        engine_key = "bek_" + secrets.token_urlsafe(24)
        model = dev_model(FLEET_MODEL)
        c = cfg.churn
        self.stacks = [DevStack(dev_settings(Settings(
            mode="dev", data_dir=self.root / f"engine-{i}", dev_model=FLEET_MODEL, admin_key=SecretStr(self.admin_key),
            engine_api_key=SecretStr(engine_key), lora_cache_max_bytes=cache_bytes, max_loras=c.max_loras,
            max_cpu_loras=c.max_cpu_loras, max_lora_rank=16), model), model=model, progress=_say)
            for i in range(cfg.engines)]
        self.engine_urls: list[str] = []
        self.gateway_urls: list[str] = []
        self.redis_url = ""
        self.s3 = S3Settings()
        self.model_path = Path()

    @property
    def engine_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stacks[0].engine_api_key}"}

    def engine_log(self, i: int) -> Path:
        return self.stacks[i].children.log_dir / "engine.log"

    def start(self) -> None:
        first = self.stacks[0]
        self.redis_url = first.start_valkey()
        self.s3 = first.start_s3()
        self.model_path = first.build_model()
        for stack in self.stacks:
            self.engine_urls.append(stack.start_engine(self.model_path, self.s3))
        for i in range(self.cfg.gateways):
            self.gateway_urls.append(self._start_gateway(i))

    def _start_gateway(self, i: int) -> str:
        s, c = self.stacks[0].settings, self.cfg.churn
        env = serve_env(port=free_port(), admin_key=self.admin_key, data_dir=self.root, redis_url=self.redis_url,
                        s3=self.s3, engine_urls=",".join(self.engine_urls), base_model=s.base_model,
                        model_config=self.model_path / "config.json", engine_api_key=self.stacks[0].engine_api_key,
                        max_model_len=s.max_model_len,
                        extra={"BANYAN_PREFETCH_ON_ACTIVATE": "false",
                               "BANYAN_ENGINE_RESIDENT_ADAPTERS": str(c.resident)})
        child, url = start_serve(self.stacks[0].children, f"gateway-{i}", env, cwd=self.root)
        _say(f"  gateway {i} (banyan serve, pid {child.process.pid}) ready at {url}")
        return url

    def stop(self) -> None:
        for stack in reversed(self.stacks):  # the first holds the gateways, Valkey and S3: it goes last
            stack.stop()


# ----------------------------------------------------------------------------------------------- figures


def _scrape_all(urls: list[str]) -> list[list[Sample]]:
    return [scrape(u) for u in urls]


def engine_delta(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    """What one engine did between two snapshots: requests finished, cold loads (its resolver's S3 fetches), loads
    by stage and result, disk evictions, and the disk cache's peak against its bound."""
    def diff(name: str, **labels: str) -> int:
        return int(metric_sum(after, name, **labels) - metric_sum(before, name, **labels))

    loads_after = metric_by_label(after, "banyan_resolver_adapter_loads_total", "result")
    loads_before = metric_by_label(before, "banyan_resolver_adapter_loads_total", "result")
    ev_after = metric_by_label(after, "banyan_resolver_evictions_total", "reason")
    ev_before = metric_by_label(before, "banyan_resolver_evictions_total", "reason")
    return {
        "requests": diff("vllm:request_success_total"),
        "cold_loads_s3_fetches": diff("banyan_resolver_adapter_fetch_seconds_count"),
        "loads_by_result": {k: int(v - loads_before.get(k, 0.0)) for k, v in loads_after.items()},
        "evictions": {k: int(v - ev_before.get(k, 0.0)) for k, v in ev_after.items()},
        "disk_cache_peak_bytes": int(metric_sum(after, "banyan_resolver_disk_cache_peak_bytes")),
        "disk_cache_max_bytes": int(metric_sum(after, "banyan_resolver_disk_cache_max_bytes")),
    }


def gateway_delta(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    def by(name: str, label: str) -> dict[str, int]:
        a, b = metric_by_label(after, name, label), metric_by_label(before, name, label)
        return {k: int(v - b.get(k, 0.0)) for k, v in a.items() if v - b.get(k, 0.0)}

    return {"placements": by("banyan_adapter_placements_total", "placement"),
            "unloads": by("banyan_adapter_unloads_total", "result"),
            "engine_errors": by("banyan_engine_errors_total", "kind"),
            "rate_limited": by("banyan_rate_limited_total", "reason"),
            "tokens": by("banyan_tokens_total", "kind")}


def _log_count(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------------ quotas


async def _make_tenant(admin: httpx.AsyncClient, tid: str, limits: dict[str, int]) -> str:
    response = await admin.post("/admin/tenants", json={"id": tid, "name": tid, **limits})
    response.raise_for_status()
    response = await admin.post(f"/admin/tenants/{tid}/keys", json={"name": "fleet"})
    response.raise_for_status()
    return str(response.json()["key"])


async def _complete(client: httpx.AsyncClient, key: str, *, model: str, max_tokens: int) -> tuple[int, int]:
    """One non-streamed completion: its status and completion tokens."""
    response = await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
        "model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0})
    tokens = int(response.json().get("usage", {}).get("completion_tokens", 0)) if response.status_code == 200 else 0
    return response.status_code, tokens


async def rpm_check(gateways: list[httpx.AsyncClient], key: str, *, model: str, rpm: int) -> dict[str, Any]:
    """``2 * rpm`` short requests of one tenant, alternating over the gateways, 4 in flight, well within a minute:
    exactly ``rpm`` must be admitted in all."""
    plan = list(range(2 * rpm))
    statuses: list[tuple[int, int, int]] = []
    gate = asyncio.Semaphore(4)
    started = time.perf_counter()

    async def one(i: int) -> None:
        async with gate:
            status, tokens = await _complete(gateways[i % len(gateways)], key, model=model, max_tokens=4)
            statuses.append((i % len(gateways), status, tokens))

    await asyncio.gather(*(one(i) for i in plan))
    seconds = time.perf_counter() - started
    admitted = sum(1 for _, s, _ in statuses if s == 200)
    return {"limit": rpm, "sent": len(plan), "admitted": admitted,
            "refused_429": sum(1 for _, s, _ in statuses if s == 429),
            "other": sum(1 for _, s, _ in statuses if s not in (200, 429)),
            "admitted_per_gateway": [sum(1 for g, s, _ in statuses if g == i and s == 200)
                                     for i in range(len(gateways))],
            "completion_tokens": sum(t for _, _, t in statuses), "seconds": round(seconds, 2),
            "exact": admitted == rpm and seconds < 60}


async def _hold_stream(client: httpx.AsyncClient, key: str, *, model: str, max_tokens: int,
                       opened: asyncio.Event) -> tuple[int, int, float, float]:
    """One long stream: its status, completion tokens, and when (perf_counter) it was answered and ended."""
    body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    await opened.wait()
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        answered = time.perf_counter()
        if response.status_code != 200:
            await response.aread()
            return response.status_code, 0, answered, time.perf_counter()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: "):]).get("usage")
                if isinstance(usage, dict):
                    tokens = int(usage.get("completion_tokens") or 0)
    return 200, tokens, answered, time.perf_counter()


async def concurrency_check(gateways: list[httpx.AsyncClient], key: str, *, model: str, limit: int, bursts: int,
                            max_tokens: int) -> dict[str, Any]:
    """``bursts`` times, ``4 * limit`` long streams of one tenant sent at once over the gateways: a burst counts as
    exact when ``limit`` were admitted and every refusal came while ``limit`` admitted streams were still running
    (so the refusal was the limit's, not a gap between streams)."""
    rounds: list[dict[str, Any]] = []
    tokens = 0
    for _ in range(bursts):
        opened = asyncio.Event()
        tasks = [asyncio.create_task(_hold_stream(gateways[i % len(gateways)], key, model=model,
                                                  max_tokens=max_tokens, opened=opened))
                 for i in range(4 * limit)]
        await asyncio.sleep(0.05)
        opened.set()
        results = await asyncio.gather(*tasks)
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        first_end = min((r[3] for r in ok), default=0.0)
        overlapped = all(r[2] <= first_end for r in refused)
        tokens += sum(r[1] for r in ok)
        rounds.append({"admitted": len(ok), "refused_429": len(refused),
                       "other": len(results) - len(ok) - len(refused),
                       "admitted_per_gateway": [sum(1 for j, r in enumerate(results) if r[0] == 200
                                                    and j % len(gateways) == g) for g in range(len(gateways))],
                       "refusals_while_limit_running": overlapped,
                       "stream_seconds": round(max((r[3] - r[2] for r in ok), default=0.0), 2)})
        await asyncio.sleep(0.2)
    return {"limit": limit, "sent_per_burst": 4 * limit, "bursts": rounds, "completion_tokens": tokens,
            "exact": all(r["admitted"] == limit and r["other"] == 0 for r in rounds),
            "measurable": all(r["refusals_while_limit_running"] for r in rounds)}


# ------------------------------------------------------------------------------------------------- usage


async def recorded_usage(admin: httpx.AsyncClient, tenants: list[str]) -> dict[str, int]:
    """The usage Redis holds for ``tenants`` (summed), read through one gateway's admin API."""
    totals = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}
    for tid in tenants:
        response = await admin.get(f"/admin/tenants/{tid}/usage")
        response.raise_for_status()
        for k in totals:
            totals[k] += int(response.json()["total"][k])
    return totals


# ------------------------------------------------------------------------------------------------- drive


def _by_gateway(outcomes: list[Outcome], n: int) -> list[dict[str, int]]:
    return [{"requests": sum(1 for o in outcomes if o.target == g),
             "errors": sum(1 for o in outcomes if o.target == g and o.error),
             "completion_tokens": sum(o.tokens for o in outcomes if o.target == g and not o.error)}
            for g in range(n)]


async def drive(fleet: FleetStack, cfg: FleetConfig, adapters: list[Adapter]) -> dict[str, Any]:
    c = cfg.churn
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    limits = httpx.Limits(max_connections=c.concurrency + 16)
    admin_headers = {"Authorization": f"Bearer {fleet.admin_key}"}
    clients = [httpx.AsyncClient(base_url=u, timeout=timeout, limits=limits) for u in fleet.gateway_urls]
    admin = httpx.AsyncClient(base_url=fleet.gateway_urls[0], headers=admin_headers, timeout=timeout)
    metric_urls = fleet.engine_urls + fleet.gateway_urls
    ne = len(fleet.engine_urls)
    try:
        t0 = time.perf_counter()
        keys = await create_tenants(admin, c.tenants)
        stored = await upload_all(admin, adapters, concurrency=c.upload_concurrency)
        _say(f"[3] {c.tenants} tenants, {len(adapters)} adapters uploaded ({stored} B) in "
             f"{time.perf_counter() - t0:.1f} s")
        before = await asyncio.to_thread(_scrape_all, metric_urls)
        logs_before = [_log_count(fleet.engine_log(i), "Resolved and loaded LoRA adapter") for i in range(ne)]
        rng = np.random.default_rng(c.seed)
        _, drawn = zipf_plan(c, rng=rng)
        prompts = [int(p) for p in rng.integers(0, 4, size=c.requests)]
        plan = [(adapters[int(i)], p) for i, p in zip(drawn, prompts, strict=True)]
        _say(f"[4] churn: {c.requests} streaming requests at concurrency {c.concurrency}, Zipf({c.zipf_s}) over "
             f"{c.adapters} adapters, alternating over {len(clients)} gateways")
        load_start = os.getloadavg()[0]
        churn = await run_phase("churn", [Target(cl, keys) for cl in clients], plan, residency=None, cfg=c)
        load_end = os.getloadavg()[0]
        after = await asyncio.to_thread(_scrape_all, metric_urls)
        engines = [engine_delta(before[i], after[i]) for i in range(ne)]
        for i, e in enumerate(engines):
            e["resolved_and_loaded_log"] = (_log_count(fleet.engine_log(i), "Resolved and loaded LoRA adapter")
                                            - logs_before[i])
        gateways = [gateway_delta(before[ne + g], after[ne + g]) for g in range(len(clients))]
        churn_usage = await recorded_usage(admin, sorted(keys))

        _say(f"[5] shared quotas: rpm {cfg.quota_rpm}, max_concurrency {cfg.quota_concurrency}, over "
             f"{len(clients)} gateways")
        base = fleet.stacks[0].settings.base_model
        rpm_key = await _make_tenant(admin, "fleet-rpm", {"rpm": cfg.quota_rpm})
        conc_key = await _make_tenant(admin, "fleet-conc", {"max_concurrency": cfg.quota_concurrency})
        q_before = await asyncio.to_thread(_scrape_all, fleet.gateway_urls)
        rpm = await rpm_check(clients, rpm_key, model=base, rpm=cfg.quota_rpm)
        conc = await concurrency_check(clients, conc_key, model=base, limit=cfg.quota_concurrency,
                                       bursts=cfg.bursts, max_tokens=cfg.burst_max_tokens)
        q_after = await asyncio.to_thread(_scrape_all, fleet.gateway_urls)
        quota_gw = [gateway_delta(q_before[g], q_after[g]) for g in range(len(clients))]
        rpm_usage = await recorded_usage(admin, ["fleet-rpm"])
        conc_usage = await recorded_usage(admin, ["fleet-conc"])
    finally:
        for cl in [*clients, admin]:
            await cl.aclose()

    ok = [o for o in churn.outcomes if not o.error]
    client_tokens = sum(o.tokens for o in ok)
    gw_tokens = sum(g["tokens"].get("completion", 0) for g in gateways)
    churn_s = summarize(churn)
    churn_s.pop("classes", None)
    served = sum(e["requests"] for e in engines)
    usage = {
        "churn": {"recorded": churn_usage, "client_requests_ok": len(ok), "client_completion_tokens": client_tokens,
                  "gateways_completion_tokens": gw_tokens,
                  "equal": churn_usage["requests"] == len(ok) and churn_usage["completion_tokens"] == client_tokens
                  == gw_tokens},
        "rpm_tenant": {"recorded": rpm_usage, "client_requests_ok": rpm["admitted"],
                       "client_completion_tokens": rpm["completion_tokens"],
                       "equal": rpm_usage["requests"] == rpm["admitted"]
                       and rpm_usage["completion_tokens"] == rpm["completion_tokens"]},
        "concurrency_tenant": {"recorded": conc_usage,
                               "client_requests_ok": sum(r["admitted"] for r in conc["bursts"]),
                               "client_completion_tokens": conc["completion_tokens"],
                               "equal": conc_usage["requests"] == sum(r["admitted"] for r in conc["bursts"])
                               and conc_usage["completion_tokens"] == conc["completion_tokens"]},
    }
    result: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "adapter_bytes": stored // max(1, len(adapters))},
        "churn": churn_s, "per_gateway": _by_gateway(churn.outcomes, len(clients)),
        "gateways": gateways, "engines": engines,
        "cold_loads_per_1k": round(1000 * sum(e["cold_loads_s3_fetches"] for e in engines) / max(1, served), 1),
        "quotas": {"rpm": rpm, "concurrency": conc, "gateways": quota_gw}, "usage": usage,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_start": round(load_start, 2),
                    "loadavg_1m_end": round(load_end, 2)},
    }
    result["goals"] = {
        "zero_errors": churn_s["errors"] == 0,
        "rpm_shared_exact": rpm["exact"],
        "concurrency_shared_exact": conc["exact"],
        "usage_is_sum_of_gateways": all(u["equal"] for u in usage.values()),
        "disk_bound_kept": all(e["disk_cache_peak_bytes"] <= e["disk_cache_max_bytes"] for e in engines),
    }
    return result


def print_report(r: dict[str, Any]) -> None:
    c = r["churn"]
    _say("")
    _say(f"churn           {c['requests']} requests ({c['planned']} planned), {c['requests_per_s']} req/s, TTFT p50 "
         f"{c['ttft_p50_ms']} ms / p95 {c['ttft_p95_ms']} ms, errors {c['errors']} {c['error_kinds']}")
    for g, (sent, gw) in enumerate(zip(r["per_gateway"], r["gateways"], strict=True)):
        _say(f"gateway {g}       {sent['requests']} requests, {sent['errors']} errors; placements {gw['placements']}; "
             f"unloads {gw['unloads']}; engine errors {gw['engine_errors']}")
    for i, e in enumerate(r["engines"]):
        _say(f"engine {i}        {e['requests']} requests; cold loads (S3 fetches) {e['cold_loads_s3_fetches']}; "
             f"resolved and loaded {e['resolved_and_loaded_log']}; evictions {e['evictions']}; disk peak "
             f"{e['disk_cache_peak_bytes']} / {e['disk_cache_max_bytes']} B")
    _say(f"cold loads      {r['cold_loads_per_1k']} per 1,000 requests served")
    rpm, conc = r["quotas"]["rpm"], r["quotas"]["concurrency"]
    _say(f"rpm quota       limit {rpm['limit']}: {rpm['sent']} sent in {rpm['seconds']} s, {rpm['admitted']} admitted "
         f"(per gateway {rpm['admitted_per_gateway']}), {rpm['refused_429']} refused 429, {rpm['other']} other")
    per_gateway = [b["admitted_per_gateway"] for b in conc["bursts"]]
    _say(f"concurrency     limit {conc['limit']}: per burst of {conc['sent_per_burst']}, admitted "
         f"{[b['admitted'] for b in conc['bursts']]} (per gateway {per_gateway}), refused "
         f"{[b['refused_429'] for b in conc['bursts']]}, streams ran "
         f"{[b['stream_seconds'] for b in conc['bursts']]} s")
    for name, u in r["usage"].items():
        _say(f"usage {name:<18} recorded {u['recorded']}; clients {u['client_requests_ok']} requests, "
             f"{u['client_completion_tokens']} completion tokens; equal {u['equal']}")
    _say(f"machine         {r['machine']}")
    _say(f"goals           {r['goals']}")


def run(cfg: FleetConfig, work: Path) -> dict[str, Any]:
    from gateway.dev.demo_model import build_adapter

    t0 = time.perf_counter()
    c = cfg.churn
    fleet = FleetStack(work, cfg, cache_bytes=1024 * 1024)  # the bound is set once the adapter's size is known
    _say(f"[1] starting Valkey, S3, {cfg.engines} engines and {cfg.gateways} gateways under {work}")
    try:
        model_path = fleet.stacks[0].build_model()
        first = build_adapter(model_path, work / "adapters" / "adapter-0000", seed=c.seed, rank=8)
        cache_bytes = max(1024 * 1024, c.cache_adapters * adapter_bytes(first))
        for stack in fleet.stacks:
            stack.settings = stack.settings.model_copy(update={"lora_cache_max_bytes": cache_bytes})
        fleet.start()
        _say(f"  fleet ready ({time.perf_counter() - t0:.1f} s): engines {fleet.engine_urls}, gateways "
             f"{fleet.gateway_urls}; disk bound {cache_bytes} B per engine")
        adapters = build_adapters(c, work=work / "adapters", first=first)
        _say(f"[2] {len(adapters)} adapters made")
        result = asyncio.run(drive(fleet, cfg, adapters))
    finally:
        _say("[6] stopping the fleet (every child by its process id) ...")
        fleet.stop()
    result["config"]["cache_bytes"] = cache_bytes
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="banyan-fleet-"))
    _say(f"fleet churn: {cfg}")
    _say(f"work dir {work}")
    ok = False
    try:
        result = run(cfg, work)
        print_report(result)
        ok = all(result["goals"].values())
        if not ok:
            _say("FAILED: a goal was missed (see goals above)")
        _say(f"total {result['total_seconds']} s")
        _say("RESULT " + json.dumps(result, sort_keys=True))
    finally:
        if cfg.churn.keep or not ok:
            shutil.rmtree(work / "adapters", ignore_errors=True)
            _say(f"kept {work} for its logs (the adapters were removed)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
