"""Adapter churn benchmark (GitHub issue #3, item 5).

Many tenants, many adapters, skewed popularity: how long does the first token take when the adapter is
cold (only in S3), warm (on the engine's local disk) or hot (registered in the engine), what does the
churn cost in throughput against an all-hot run, does the disk cache stay within its bound, and do the
outputs still equal Hugging Face PEFT's?

    .venv/bin/python -m loadtests.adapter_churn            # 1,000 adapters, 50 tenants (7-8 min on 2 cores)
    .venv/bin/python -m loadtests.adapter_churn --quick    # 200 adapters, 20 tenants (2-3.5 min)

Steps: start ``banyan dev --empty`` (loopback, fresh data dir, prefetch on activate off, small disk and
residency bounds); create the tenants and keys; make the adapters (one real PEFT adapter for the
stack's base model, the rest synthetic variants of it) and upload them all; send streaming completions
at a fixed concurrency, the adapter drawn by Zipf popularity, classifying each request when it is sent:

- ``cold``: no folder of the adapter's version under ``<data dir>/lora-cache/banyan-lora-cache/<tenant>/<name>/`` (never
  fetched, or evicted from disk);
- ``warm``: on disk, but not registered in the engine (not in the engine's ``GET /v1/models``, polled
  every 0.5 s in the background);
- ``hot``: registered in the engine.

Then the same number of requests to a few adapters that fit the engine's bounds (the all-hot baseline),
some of those sent to the vLLM server directly (what the gateway costs), the disk cache's peak against
its bound and the eviction/unload counters from the engine's and the gateway's ``/metrics``, and a PEFT
comparison for adapters from the popular head and the long tail.
It prints a table and, last, ``RESULT {json}``. Exit status 1 when a request failed, the disk cache's
peak exceeded its bound or an output differed from PEFT's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from adapters.cache import cache_files_dir
from adapters.layout import ADAPTER_FILES, MANIFEST_FILE
from adapters.naming import ENGINE_NAME_PREFIX, AdapterRef
from gateway.dev.demo_model import synthetic_variant
from gateway.dev.launcher import DevProcess, launch_dev
from gateway.dev.seed import upload_adapter
from loadtests._stack import Sample, metric_by_label, metric_sum, model_dir, scrape
from loadtests._stats import percentile

PROMPTS = ("Hello there", "The quick brown fox", "abc", "1 2 3 4")
CLASSES = ("cold", "warm", "hot")
POLL_INTERVAL_S = 0.5
REQUEST_TIMEOUT_S = 120.0
COLD_P50_GOAL_S = 1.0
DESCRIPTION = "Adapter churn benchmark: cold/warm/hot TTFT, throughput vs all-hot, disk bound, PEFT equality."
_RESOLVED = re.compile(r"banyan resolver: (\S+) ready in ([0-9.]+) s")


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RunConfig:
    adapters: int = 1000
    tenants: int = 50
    requests: int = 3000
    concurrency: int = 16
    max_tokens: int = 16
    zipf_s: float = 1.1
    cache_adapters: int = 300
    """The engine's disk cache bound, in adapters' worth of bytes."""
    resident: int = 64
    """The gateway's residency bound per engine (BANYAN_ENGINE_RESIDENT_ADAPTERS)."""
    max_loras: int = 8
    max_cpu_loras: int = 64
    hot_adapters: int = 8
    direct_requests: int = 1000
    """Requests of the hot set sent to the engine directly, without the gateway (0: skip)."""
    samples: int = 5
    upload_concurrency: int = 8
    phase_seconds: float = 360.0
    """Stop sending a traffic phase's requests after this long (requests not sent are reported)."""
    seed: int = 20240611
    keep: bool = False


QUICK = RunConfig(adapters=200, tenants=20, requests=800, cache_adapters=60, resident=24, max_cpu_loras=24,
                  direct_requests=400, phase_seconds=100.0)


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(prog="python -m loadtests.adapter_churn", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="smaller run: 200 adapters, 20 tenants, 800 requests")
    parser.add_argument("--adapters", type=int, help="distinct rank-8 adapters (default 1000)")
    parser.add_argument("--tenants", type=int, help="tenants the adapters are spread over (default 50)")
    parser.add_argument("--requests", type=int, help="requests per traffic phase (default 3000)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 16)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per request (default 16)")
    parser.add_argument("--zipf-s", type=float, help="Zipf exponent of adapter popularity (default 1.1)")
    parser.add_argument("--cache-adapters", type=int, help="disk cache bound in adapters' worth (default 300)")
    parser.add_argument("--resident", type=int, help="gateway residency bound per engine (default 64)")
    parser.add_argument("--max-loras", type=int, help="engine --max-loras (default 8)")
    parser.add_argument("--max-cpu-loras", type=int, help="engine --max-cpu-loras (default 64)")
    parser.add_argument("--hot-adapters", type=int, help="adapters of the all-hot baseline (default 8)")
    parser.add_argument("--direct-requests", type=int,
                        help="hot-set requests sent to the engine directly, no gateway (default 1000; 0 skips)")
    parser.add_argument("--samples", type=int, help="adapters compared with PEFT (default 5)")
    parser.add_argument("--upload-concurrency", type=int, help="uploads in flight (default 8)")
    parser.add_argument("--phase-seconds", type=float, help="time cap of each traffic phase (default 360)")
    parser.add_argument("--seed", type=int, help="seed of adapters, popularity and prompts")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data dir, logs, adapters)")
    args = vars(parser.parse_args(argv))
    base = QUICK if args.pop("quick") else RunConfig()
    overrides = {k: v for k, v in args.items() if v is not None and v is not False}
    cfg = dataclasses.replace(base, **overrides)
    if cfg.tenants > cfg.adapters or cfg.hot_adapters > min(cfg.max_loras, cfg.resident, cfg.adapters):
        parser.error("need tenants <= adapters and hot-adapters <= min(max-loras, resident, adapters)")
    return cfg


# -------------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Adapter:
    index: int
    tenant: str
    name: str
    folder: Path


def tenant_id(index: int) -> str:
    return f"churn-{index:03d}"


def build_adapters(cfg: RunConfig, *, work: Path, first: Path) -> list[Adapter]:
    """One real PEFT adapter (``first``) and ``adapters - 1`` synthetic variants of it, spread over tenants."""
    out = [Adapter(0, tenant_id(0), "a0000", first)]
    for i in range(1, cfg.adapters):
        folder = synthetic_variant(first, work / f"adapter-{i:04d}", seed=cfg.seed + i)
        out.append(Adapter(i, tenant_id(i % cfg.tenants), f"a{i:04d}", folder))
    return out


def adapter_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ADAPTER_FILES)


def zipf_plan(cfg: RunConfig, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Popularity rank -> adapter index (a random permutation), and the adapter of each request."""
    ranks = np.arange(1, cfg.adapters + 1, dtype=np.float64)
    weights = ranks ** -cfg.zipf_s
    by_rank = rng.permutation(cfg.adapters)
    drawn = rng.choice(cfg.adapters, size=cfg.requests, p=weights / weights.sum())
    return by_rank, by_rank[drawn]


def sample_ranks(adapters: int, count: int) -> list[int]:
    """Popularity ranks spread from the head to the tail (geometrically), for the PEFT comparison."""
    points = np.geomspace(1, adapters, num=max(count, 1))
    return sorted({min(adapters - 1, round(p) - 1) for p in points})


# ----------------------------------------------------------------------------------------------- setup


async def create_tenants(admin: httpx.AsyncClient, count: int) -> dict[str, str]:
    """Create the tenants with one key each; tenant id -> key."""
    async def one(i: int) -> tuple[str, str]:
        tid = tenant_id(i)
        response = await admin.post("/admin/tenants", json={"id": tid, "name": f"Churn tenant {i}"})
        if response.status_code != 201:
            raise RuntimeError(f"creating tenant {tid}: {response.status_code} {response.text}")
        response = await admin.post(f"/admin/tenants/{tid}/keys", json={"name": "churn"})
        if response.status_code != 201:
            raise RuntimeError(f"creating a key for {tid}: {response.status_code} {response.text}")
        return tid, str(response.json()["key"])

    return dict(await asyncio.gather(*(one(i) for i in range(count))))


async def upload_all(admin: httpx.AsyncClient, adapters: list[Adapter], *, concurrency: int) -> int:
    """Upload every adapter (bounded concurrency, a progress line every 100); total stored bytes."""
    gate = asyncio.Semaphore(concurrency)
    done = 0
    total = 0
    started = time.perf_counter()

    async def one(a: Adapter) -> None:
        nonlocal done, total
        async with gate:  # the files are read inside the gate: at most `concurrency` adapters in memory
            try:
                uploaded = await upload_adapter(admin, a.tenant, a.name, a.folder)
            except httpx.HTTPStatusError as e:
                raise RuntimeError(f"uploading {a.tenant}/{a.name}: {e.response.status_code} {e.response.text}") from e
        total += cast(int, uploaded["size_bytes"])
        done += 1
        if done % 100 == 0 or done == len(adapters):
            _say(f"  uploaded {done}/{len(adapters)} adapters ({time.perf_counter() - started:.1f} s)")

    await asyncio.gather(*(one(a) for a in adapters))
    return total


# ----------------------------------------------------------------------------------------- observation


@dataclass
class Residency:
    """Where each adapter is: the engine's registry (polled) and the engine's disk cache (looked at)."""

    engine: httpx.AsyncClient
    cache_dir: Path
    registered: dict[tuple[str, str], str] = field(default_factory=dict)
    """(tenant, adapter) -> the internal name the engine has registered."""
    polls: int = 0
    poll_errors: int = 0
    load: list[float] = field(default_factory=list)
    """The machine's 1-minute load average at each poll (other work on the machine skews the figures)."""

    def classify(self, adapter: Adapter) -> str:
        if (adapter.tenant, adapter.name) in self.registered:
            return "hot"
        return "warm" if self.on_disk(adapter) else "cold"

    def on_disk(self, adapter: Adapter) -> bool:
        try:
            with os.scandir(self.cache_dir / adapter.tenant / adapter.name) as entries:
                return any(e.name.startswith("v") and e.is_dir() for e in entries)
        except FileNotFoundError:
            return False

    async def refresh(self) -> None:
        try:
            response = await self.engine.get("/v1/models")
            response.raise_for_status()
            ids = [str(m.get("id", "")) for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError):
            self.poll_errors += 1
            return
        refs = (AdapterRef.from_engine_name(i) for i in ids if i.startswith(ENGINE_NAME_PREFIX))
        self.registered = {(r.tenant, r.name): r.engine_name for r in refs if r is not None}
        self.polls += 1
        self.load.append(os.getloadavg()[0])

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_INTERVAL_S)


def disk_footprint(root: Path) -> dict[str, int]:
    """What the disk cache holds on disk once traffic has stopped: adapter folders, the bytes of their
    adapter files and of their ``manifest.json`` files (the bound counts both)."""
    out = {"folders": 0, "adapter_file_bytes": 0, "manifest_bytes": 0, "staging_entries": 0}
    staging = root / ".staging"
    out["staging_entries"] = len(list(staging.iterdir())) if staging.is_dir() else 0
    for manifest in root.glob(f"*/*/v*/{MANIFEST_FILE}"):
        out["folders"] += 1
        out["manifest_bytes"] += manifest.stat().st_size
        out["adapter_file_bytes"] += adapter_bytes(manifest.parent)
    return out


# --------------------------------------------------------------------------------------------- traffic


@dataclass
class Outcome:
    adapter: int
    klass: str
    prompt: int
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    text: str = ""
    error: str | None = None
    target: int = 0
    """Which of the phase's targets (gateways) it went to."""


@dataclass(frozen=True)
class Target:
    """Where a phase sends its requests: the gateway (tenant keys, public names) or, with ``engine_names``,
    the engine directly (internal names, no gateway)."""

    client: httpx.AsyncClient
    keys: dict[str, str]
    engine_names: dict[int, str] | None = None

    def address(self, adapter: Adapter) -> tuple[str, dict[str, str]]:
        if self.engine_names is not None:
            return self.engine_names[adapter.index], {}
        return adapter.name, {"Authorization": f"Bearer {self.keys[adapter.tenant]}"}


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome]
    seconds: float
    planned: int


def _consume_event(data: str, outcome: Outcome, parts: list[str], started: float) -> None:
    event = json.loads(data)
    if "error" in event:
        outcome.error = "error_event"
        return
    for choice in event.get("choices") or []:
        text = choice.get("text") or ""
        if text and outcome.ttft is None:
            outcome.ttft = time.perf_counter() - started
        parts.append(text)
    usage = event.get("usage")
    if isinstance(usage, dict):
        outcome.tokens = int(usage.get("completion_tokens") or 0)


async def stream_one(target: Target, adapter: Adapter, *, prompt: int, klass: str, max_tokens: int) -> Outcome:
    """One streaming completion; the time to the first event with text, the text and the token count."""
    outcome = Outcome(adapter=adapter.index, klass=klass, prompt=prompt)
    model, headers = target.address(adapter)
    body = {"model": model, "prompt": PROMPTS[prompt], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    done = False
    started = time.perf_counter()
    try:
        async with target.client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                outcome.error = f"status_{response.status_code}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    _consume_event(line[len("data: "):], outcome, parts, started)
    except httpx.HTTPError as e:
        outcome.error = type(e).__name__
    except ValueError:
        outcome.error = "bad_event"
    outcome.latency = time.perf_counter() - started
    outcome.text = "".join(parts)
    if outcome.error is None and (not done or outcome.ttft is None):
        outcome.error = "incomplete_stream"
    return outcome


async def run_phase(name: str, target: Target | Sequence[Target], plan: list[tuple[Adapter, int]], *,
                    residency: Residency | None, cfg: RunConfig) -> Phase:
    """Send ``plan`` (adapter, prompt) at ``cfg.concurrency``, classifying each request when it is sent (class
    ``-`` without ``residency``). With several targets (gateways), request ``i`` goes to target ``i mod n``."""
    targets = [target] if isinstance(target, Target) else list(target)
    outcomes: list[Outcome] = []
    cursor = 0
    step = max(1, len(plan) // 10)
    started = time.perf_counter()
    deadline = started + cfg.phase_seconds

    async def worker() -> None:
        nonlocal cursor
        while cursor < len(plan) and time.perf_counter() < deadline:
            adapter, prompt = plan[cursor]
            which = cursor % len(targets)
            cursor += 1
            klass = residency.classify(adapter) if residency is not None else "-"
            outcome = await stream_one(targets[which], adapter, prompt=prompt, klass=klass, max_tokens=cfg.max_tokens)
            outcome.target = which
            outcomes.append(outcome)
            if len(outcomes) % step == 0:
                errors = sum(1 for o in outcomes if o.error)
                _say(f"  {name}: {len(outcomes)}/{len(plan)} requests, {time.perf_counter() - started:.1f} s, "
                     f"errors {errors}")

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return Phase(name=name, outcomes=outcomes, seconds=time.perf_counter() - started, planned=len(plan))


async def warm_hot_set(target: Target, hot: list[Adapter], *, residency: Residency, cfg: RunConfig) -> bool:
    """Make the baseline's adapters hot: one request each, then wait until the engine lists them all."""
    await asyncio.gather(*(stream_one(target, a, prompt=0, klass="warmup", max_tokens=cfg.max_tokens) for a in hot))
    for _ in range(60):
        await residency.refresh()
        if all(residency.classify(a) == "hot" for a in hot):
            return True
        await asyncio.sleep(POLL_INTERVAL_S)
    return False


# ------------------------------------------------------------------------------------------- summaries


def _pct(values: list[float], p: float) -> float | None:
    return round(percentile(values, p) * 1000, 1) if values else None


def summarize(phase: Phase) -> dict[str, Any]:
    ok = [o for o in phase.outcomes if o.error is None]
    classes: dict[str, Any] = {}
    for klass in CLASSES:
        ttfts = [o.ttft for o in ok if o.klass == klass and o.ttft is not None]
        classes[klass] = {"count": sum(1 for o in phase.outcomes if o.klass == klass),
                          "ttft_p50_ms": _pct(ttfts, 50), "ttft_p95_ms": _pct(ttfts, 95)}
    all_ttft = [o.ttft for o in ok if o.ttft is not None]
    errors: dict[str, int] = {}
    for o in phase.outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    tokens = sum(o.tokens for o in ok)
    return {"requests": len(phase.outcomes), "planned": phase.planned, "seconds": round(phase.seconds, 2),
            "requests_per_s": round(len(ok) / phase.seconds, 2),
            "tokens_per_s": round(tokens / phase.seconds, 1), "completion_tokens": tokens,
            "errors": sum(errors.values()), "error_kinds": errors,
            "distinct_adapters": len({o.adapter for o in phase.outcomes}),
            "ttft_p50_ms": _pct(all_ttft, 50), "ttft_p95_ms": _pct(all_ttft, 95),
            "latency_p50_ms": _pct([o.latency for o in ok], 50), "classes": classes}


def _histogram_quantile(samples: list[Sample], name: str, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a Prometheus histogram."""
    buckets = sorted((float(lab["le"]), v) for n, lab, v in samples if n == name + "_bucket")
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    return next(le for le, count in buckets if count >= q * total)


def engine_figures(samples: list[Sample]) -> dict[str, Any]:
    fetch = "banyan_resolver_adapter_fetch_seconds"
    count = metric_sum(samples, fetch + "_count")
    return {
        "disk_cache_peak_bytes": int(metric_sum(samples, "banyan_resolver_disk_cache_peak_bytes")),
        "disk_cache_max_bytes": int(metric_sum(samples, "banyan_resolver_disk_cache_max_bytes")),
        "disk_cache_bytes": int(metric_sum(samples, "banyan_resolver_disk_cache_bytes")),
        "evictions": {k: int(v) for k, v in metric_by_label(samples, "banyan_resolver_evictions_total",
                                                             "reason").items()},
        "loads": {f"{lab.get('stage')}/{lab.get('result')}": int(v) for n, lab, v in samples
                  if n == "banyan_resolver_adapter_loads_total"},
        "fetches": int(count),
        "fetch_mean_ms": round(metric_sum(samples, fetch + "_sum") / count * 1000, 1) if count else None,
        "fetch_p50_le_s": _histogram_quantile(samples, fetch, 0.5),
        "fetch_p95_le_s": _histogram_quantile(samples, fetch, 0.95),
    }


def gateway_figures(samples: list[Sample]) -> dict[str, Any]:
    return {
        "unloads": {k: int(v) for k, v in metric_by_label(samples, "banyan_adapter_unloads_total", "result").items()},
        "placements": {k: int(v) for k, v in metric_by_label(samples, "banyan_adapter_placements_total",
                                                             "placement").items()},
    }


def engine_log_figures(log_path: Path) -> dict[str, Any]:
    """From vLLM's log: adapters resolved and loaded, and the resolver's own time per resolution."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    ready = [float(m.group(2)) for m in _RESOLVED.finditer(text)]
    return {"resolved_and_loaded": text.count("Resolved and loaded LoRA adapter"),
            "resolver_ready_count": len(ready), "resolver_ready_p50_ms": _pct(ready, 50),
            "resolver_ready_p95_ms": _pct(ready, 95)}


PHASE_HISTOGRAMS = {
    "gateway_ttft": "banyan_time_to_first_token_seconds",
    "engine_e2e": "vllm:e2e_request_latency_seconds",
    "engine_queue": "vllm:request_queue_time_seconds",
    "engine_ttft": "vllm:time_to_first_token_seconds",
    "engine_prefill": "vllm:request_prefill_time_seconds",
    "engine_decode": "vllm:request_decode_time_seconds",
    "resolver_fetch": "banyan_resolver_adapter_fetch_seconds",
}


def phase_means(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    """Mean of each histogram over one phase (the difference of two snapshots), in ms, with its count.
    ``gateway_ttft`` is the gateway's own TTFT (from the request's arrival to its first chunk out)."""
    out: dict[str, Any] = {}
    for key, name in PHASE_HISTOGRAMS.items():
        count = metric_sum(after, name + "_count") - metric_sum(before, name + "_count")
        total = metric_sum(after, name + "_sum") - metric_sum(before, name + "_sum")
        out[key] = {"count": int(count), "mean_ms": round(total / count * 1000, 1) if count else None}
    return out


# ----------------------------------------------------------------------------------------- correctness


async def _complete(target: Target, adapter: Adapter, *, prompt: str, max_tokens: int) -> str | None:
    model, headers = target.address(adapter)
    response = await target.client.post("/v1/completions", headers=headers, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    if response.status_code != 200:
        return None
    return str(response.json()["choices"][0]["text"])


async def check_correctness(target: Target, sampled: list[Adapter], *, churn: list[Outcome], model_path: Path,
                            cfg: RunConfig) -> dict[str, Any]:
    """Greedy outputs through the gateway (fresh non-streaming ones, and the streamed ones of the churn
    phase) against PEFT's for the sampled adapters."""
    from loadtests._peft import PeftOracle

    oracle = await asyncio.to_thread(PeftOracle, model_path)
    base = await asyncio.to_thread(oracle.greedy, None, list(PROMPTS), max_new_tokens=cfg.max_tokens)
    fresh_ok = fresh_total = fresh_failed = churn_ok = churn_total = 0
    per_adapter: list[dict[str, Any]] = []
    for adapter in sampled:
        expected = await asyncio.to_thread(oracle.greedy, adapter.folder, list(PROMPTS), max_new_tokens=cfg.max_tokens)
        base_differs = expected != base
        got = [await _complete(target, adapter, prompt=p, max_tokens=cfg.max_tokens) for p in PROMPTS]
        fresh = sum(1 for g, e in zip(got, expected, strict=True) if g == e)
        fresh_failed += sum(1 for g in got if g is None)
        streamed = [o for o in churn if o.adapter == adapter.index and o.error is None]
        matched = sum(1 for o in streamed if o.text == expected[o.prompt])
        fresh_ok, fresh_total = fresh_ok + fresh, fresh_total + len(PROMPTS)
        churn_ok, churn_total = churn_ok + matched, churn_total + len(streamed)
        per_adapter.append({"adapter": f"{adapter.tenant}/{adapter.name}", "fresh": f"{fresh}/{len(PROMPTS)}",
                            "churn_streams": f"{matched}/{len(streamed)}", "differs_from_base": base_differs})
    return {"fresh_matches": fresh_ok, "fresh_total": fresh_total, "fresh_failed_requests": fresh_failed,
            "churn_matches": churn_ok,
            "churn_total": churn_total, "adapters": per_adapter}


# ---------------------------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(result: dict[str, Any]) -> None:
    churn, hot = result["churn"], result["all_hot"]
    eng, gw, peft = result["engine"], result["gateway"], result["peft"]
    _say("")
    _say(f"{'phase/class':<14}{'count':>7}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}")
    for klass in CLASSES:
        c = churn["classes"][klass]
        _say(f"{'churn ' + klass:<14}{c['count']:>7}{_ms(c['ttft_p50_ms']):>13}{_ms(c['ttft_p95_ms']):>13}")
    _say(f"{'churn all':<14}{churn['requests']:>7}{_ms(churn['ttft_p50_ms']):>13}{_ms(churn['ttft_p95_ms']):>13}")
    _say(f"{'all-hot':<14}{hot['requests']:>7}{_ms(hot['ttft_p50_ms']):>13}{_ms(hot['ttft_p95_ms']):>13}")
    direct = result["direct_engine"]
    for phase in (churn, hot, direct):
        if phase is not None and phase["requests"] < phase["planned"]:
            _say(f"NOTE: a phase hit --phase-seconds: {phase['requests']} of {phase['planned']} requests sent")
    if direct is not None:
        _say(f"{'direct (no gw)':<14}{direct['requests']:>7}{_ms(direct['ttft_p50_ms']):>13}"
             f"{_ms(direct['ttft_p95_ms']):>13}")
    _say("")
    _say(f"throughput      churn {churn['requests_per_s']} req/s, {churn['tokens_per_s']} tok/s; all-hot "
         f"{hot['requests_per_s']} req/s, {hot['tokens_per_s']} tok/s; ratio {result['throughput_ratio']}")
    if direct is not None:
        _say(f"                all-hot sent to the engine directly: {direct['requests_per_s']} req/s, "
             f"{direct['tokens_per_s']} tok/s, errors {direct['errors']}")
    disk = result["disk_at_end"]
    _say(f"disk cache      peak {eng['disk_cache_peak_bytes']} B of bound {eng['disk_cache_max_bytes']} B "
         f"({result['peak_fraction']:.1%}); at the end on disk: {disk['folders']} adapter folders, "
         f"{disk['adapter_file_bytes']} B of adapter files + {disk['manifest_bytes']} B of manifests")
    _say(f"evictions       {eng['evictions']}; gateway unloads {gw['unloads']}; placements {gw['placements']}")
    _say(f"fetches         {eng['fetches']} (mean {eng['fetch_mean_ms']} ms, p50 <= {eng['fetch_p50_le_s']} s, "
         f"p95 <= {eng['fetch_p95_le_s']} s); loads {eng['loads']}")
    _say(f"engine log      {result['engine_log']}")
    for phase in ("churn", "all_hot", "direct_engine"):
        if result[phase] is None:
            continue
        parts = ", ".join(f"{k} {v['mean_ms']} ms (n={v['count']})" for k, v in result[phase]["breakdown_ms"].items())
        _say(f"means {phase:<13} {parts}")
    _say(f"errors          churn {churn['errors']} {churn['error_kinds']}, all-hot {hot['errors']} "
         f"{hot['error_kinds']}")
    _say(f"PEFT            fresh {peft['fresh_matches']}/{peft['fresh_total']} (failed requests "
         f"{peft['fresh_failed_requests']}), churn streams "
         f"{peft['churn_matches']}/{peft['churn_total']}: {peft['adapters']}")
    _say(f"machine         {result['machine']} (load from anything else running here skews every figure)")
    _say(f"goals           {result['goals']}")


def goals(result: dict[str, Any]) -> dict[str, bool]:
    cold = result["churn"]["classes"]["cold"]["ttft_p50_ms"]
    peft = result["peft"]
    return {
        "zero_errors": (result["churn"]["errors"] + result["all_hot"]["errors"]
                        + (result["direct_engine"]["errors"] if result["direct_engine"] is not None else 0)) == 0,
        "bound_never_exceeded": result["engine"]["disk_cache_peak_bytes"] <= result["engine"]["disk_cache_max_bytes"],
        "cold_p50_le_1s": cold is not None and cold <= COLD_P50_GOAL_S * 1000,
        "outputs_equal_peft": (peft["fresh_matches"] == peft["fresh_total"]
                               and peft["churn_matches"] == peft["churn_total"]),
    }


# ------------------------------------------------------------------------------------------------ main


def _settings(cfg: RunConfig, *, cache_bytes: int) -> dict[str, str]:
    return {"BANYAN_PREFETCH_ON_ACTIVATE": "false", "BANYAN_LORA_CACHE_MAX_BYTES": str(cache_bytes),
            "BANYAN_ENGINE_RESIDENT_ADAPTERS": str(cfg.resident), "BANYAN_MAX_LORAS": str(cfg.max_loras),
            "BANYAN_MAX_CPU_LORAS": str(cfg.max_cpu_loras), "BANYAN_MAX_LORA_RANK": "16"}


@dataclass
class Traffic:
    """What the traffic phases produced, with metric snapshots around them."""

    churn: Phase
    hot: Phase
    direct: Phase | None
    hot_warmed: bool
    by_rank: np.ndarray
    snapshots: dict[str, list[Sample]]
    residency: Residency


async def _snapshot(stack: DevProcess) -> list[Sample]:
    """The engine's and the gateway's metrics together (their names do not collide)."""
    engine, gateway = await asyncio.gather(asyncio.to_thread(scrape, stack.engine_url),
                                           asyncio.to_thread(scrape, stack.url))
    return engine + gateway


@dataclass(frozen=True)
class Targets:
    gateway: Target
    engine: Target


async def _traffic(stack: DevProcess, targets: Targets, residency: Residency, *, cfg: RunConfig,
                   adapters: list[Adapter]) -> Traffic:
    """The churn phase, the all-hot baseline, and the same hot set sent to the engine directly."""
    rng = np.random.default_rng(cfg.seed)
    snapshots = {"start": await _snapshot(stack)}
    by_rank, drawn = zipf_plan(cfg, rng=rng)
    prompts = [int(p) for p in rng.integers(0, len(PROMPTS), size=cfg.requests)]
    plan = [(adapters[int(i)], p) for i, p in zip(drawn, prompts, strict=True)]
    _say(f"[4] churn: {cfg.requests} streaming requests at concurrency {cfg.concurrency}, "
         f"Zipf({cfg.zipf_s}) over {cfg.adapters} adapters")
    churn = await run_phase("churn", targets.gateway, plan, residency=residency, cfg=cfg)
    snapshots["churn"] = await _snapshot(stack)

    hot_set = [adapters[int(i)] for i in by_rank[:cfg.hot_adapters]]
    _say(f"[5] all-hot baseline: {cfg.requests} requests over the {len(hot_set)} most popular adapters")
    warmed = await warm_hot_set(targets.gateway, hot_set, residency=residency, cfg=cfg)
    snapshots["warmed"] = await _snapshot(stack)
    choice = rng.integers(0, len(hot_set), size=cfg.requests)
    hot_plan = [(hot_set[int(i)], p) for i, p in zip(choice, prompts, strict=True)]
    hot = await run_phase("all-hot", targets.gateway, hot_plan, residency=residency, cfg=cfg)
    snapshots["hot"] = await _snapshot(stack)

    direct = None
    names = {a.index: residency.registered.get((a.tenant, a.name)) for a in hot_set}
    if cfg.direct_requests > 0 and all(names.values()):
        _say(f"[5b] the same hot set sent to the engine directly (no gateway): {cfg.direct_requests} requests")
        engine = dataclasses.replace(targets.engine, engine_names={k: str(v) for k, v in names.items()})
        direct = await run_phase("direct", engine, hot_plan[:cfg.direct_requests], residency=residency, cfg=cfg)
        snapshots["direct"] = await _snapshot(stack)
    return Traffic(churn=churn, hot=hot, direct=direct, hot_warmed=warmed, by_rank=by_rank, snapshots=snapshots,
                   residency=residency)


async def _setup(admin: httpx.AsyncClient, cfg: RunConfig, adapters: list[Adapter]) -> tuple[dict[str, str], int]:
    t0 = time.perf_counter()
    keys = await create_tenants(admin, cfg.tenants)
    stored = await upload_all(admin, adapters, concurrency=cfg.upload_concurrency)
    _say(f"[3] {cfg.tenants} tenants, {len(adapters)} adapters uploaded ({stored} B) in "
         f"{time.perf_counter() - t0:.1f} s")
    return keys, stored


async def drive(stack: DevProcess, cfg: RunConfig, adapters: list[Adapter], *, cache_bytes: int) -> dict[str, Any]:
    """Everything that talks to the running stack; returns the RESULT figures."""
    admin_headers = {"Authorization": f"Bearer {stack.admin_key}"}
    limits = httpx.Limits(max_connections=max(cfg.concurrency, cfg.upload_concurrency) + 8)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with (httpx.AsyncClient(base_url=stack.url, headers=admin_headers, timeout=timeout) as admin,
                httpx.AsyncClient(base_url=stack.url, timeout=timeout, limits=limits) as client,
                httpx.AsyncClient(base_url=stack.engine_url, headers=stack.engine_headers, timeout=timeout,
                                  limits=limits) as direct,
                httpx.AsyncClient(base_url=stack.engine_url, headers=stack.engine_headers, timeout=10.0) as poll):
        t0 = time.perf_counter()
        keys, stored = await _setup(admin, cfg, adapters)
        setup_s = time.perf_counter() - t0
        targets = Targets(gateway=Target(client, keys), engine=Target(direct, keys))
        residency = Residency(engine=poll, cache_dir=cache_files_dir(stack.lora_cache_dir))
        await residency.refresh()
        poller = asyncio.create_task(residency.run())
        try:
            traffic = await _traffic(stack, targets, residency, cfg=cfg, adapters=adapters)
        finally:
            poller.cancel()
        ranks = sample_ranks(cfg.adapters, cfg.samples)
        sampled = [adapters[int(traffic.by_rank[r])] for r in ranks]
        _say(f"[6] PEFT comparison for {len(sampled)} adapters (popularity ranks {ranks})")
        peft = await check_correctness(targets.gateway, sampled, churn=traffic.churn.outcomes,
                                       model_path=stack.model_path, cfg=cfg)
        final = await _snapshot(stack)
    return assemble(cfg, traffic, final=final, peft=peft, stack=stack,
                    extra={"cache_bytes": cache_bytes, "adapter_bytes": stored // max(1, len(adapters)),
                           "setup_seconds": round(setup_s, 1)})


def assemble(cfg: RunConfig, traffic: Traffic, *, final: list[Sample], peft: dict[str, Any], stack: DevProcess,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The RESULT figures."""
    churn_s, hot_s = summarize(traffic.churn), summarize(traffic.hot)
    snaps = traffic.snapshots
    churn_s["breakdown_ms"] = phase_means(snaps["start"], snaps["churn"])
    hot_s["breakdown_ms"] = phase_means(snaps["warmed"], snaps["hot"])
    direct_s = summarize(traffic.direct) if traffic.direct is not None else None
    if direct_s is not None:
        direct_s["breakdown_ms"] = phase_means(snaps["hot"], snaps["direct"])
    engine_final = engine_figures(final)
    result: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "cache_bytes": extra["cache_bytes"],
                   "adapter_bytes": extra["adapter_bytes"]},
        "setup_seconds": extra["setup_seconds"],
        "churn": churn_s, "all_hot": hot_s, "all_hot_warmed": traffic.hot_warmed, "direct_engine": direct_s,
        "throughput_ratio": (round(churn_s["requests_per_s"] / hot_s["requests_per_s"], 3)
                             if hot_s["requests_per_s"] else None),
        "engine": engine_final, "engine_after_churn": engine_figures(snaps["churn"]),
        "gateway": gateway_figures(final), "gateway_after_churn": gateway_figures(snaps["churn"]),
        "peak_fraction": engine_final["disk_cache_peak_bytes"] / max(1, engine_final["disk_cache_max_bytes"]),
        "disk_at_end": disk_footprint(cache_files_dir(stack.lora_cache_dir)),
        "registry_polls": traffic.residency.polls, "registry_poll_errors": traffic.residency.poll_errors,
        "machine": _machine(traffic.residency.load),
        "engine_log": engine_log_figures(stack.engine_log), "peft": peft,
    }
    result["goals"] = goals(result)
    return result


def _machine(load: list[float]) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_1m_mean": round(float(np.mean(load)), 2) if load else None,
            "loadavg_1m_max": round(max(load), 2) if load else None}


def prepare(cfg: RunConfig, work: Path) -> tuple[Path, int]:
    """The demo base model (where ``banyan dev`` will reuse it) and the one real PEFT adapter; its size."""
    from gateway.dev.demo_model import build_adapter, build_base_model

    model_path = build_base_model(model_dir(work / "data"))
    first = build_adapter(model_path, work / "adapters" / "adapter-0000", seed=cfg.seed, rank=8)
    return first, adapter_bytes(first)


def run(cfg: RunConfig, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, first_bytes = prepare(cfg, work)
    # The variants are a little smaller than the PEFT original (no safetensors metadata); bound on the larger.
    # The bound also counts each version's manifest.json, so a little fewer than `cache_adapters` fit in it.
    cache_bytes = cfg.cache_adapters * first_bytes
    stack = launch_dev(work / "data", extra_env=_settings(cfg, cache_bytes=cache_bytes))
    _say(f"[1] banyan dev --empty starting (pid {stack.process.pid}, data dir {stack.data_dir}); disk bound "
         f"{cache_bytes} B = {cfg.cache_adapters} adapters of {first_bytes} B of adapter files (the bound also "
         "counts each version's manifest.json)")
    try:
        adapters = build_adapters(cfg, work=work / "adapters", first=first)
        _say(f"[2] {len(adapters)} adapters made ({time.perf_counter() - t0:.1f} s); waiting for the stack")
        stack.wait_ready()
        _say(f"  stack ready at {stack.url} ({time.perf_counter() - t0:.1f} s)")
        result = asyncio.run(drive(stack, cfg, adapters, cache_bytes=cache_bytes))
    finally:
        _say(f"[7] stopping the stack (pid {stack.process.pid}) ...")
        code = stack.stop()
        _say(f"  stopped (exit code {code})")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="banyan-churn-"))
    _say(f"adapter churn: {cfg}")
    _say(f"work dir {work}")
    ok = False
    try:
        result = run(cfg, work)
        print_report(result)
        g = result["goals"]
        ok = g["zero_errors"] and g["bound_never_exceeded"] and g["outputs_equal_peft"]
        if not g["cold_p50_le_1s"]:
            _say(f"GOAL MISSED: cold TTFT p50 {result['churn']['classes']['cold']['ttft_p50_ms']} ms > 1000 ms")
        if not ok:
            _say("FAILED: errors, the disk bound or the PEFT comparison (see goals above)")
        _say(f"total {result['total_seconds']} s")
        _say("RESULT " + json.dumps(result, sort_keys=True))
    finally:
        if cfg.keep:
            _say(f"kept the work dir {work} (logs in {work / 'data' / 'logs'})")
        elif not ok:
            shutil.rmtree(work / "adapters", ignore_errors=True)
            _say(f"kept the data dir {work / 'data'} for its logs (the adapters were removed)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
