"""How promptly a change made through one gateway reaches another gateway's caches (``gateway.invalidation``).

Starts Valkey (with the search module), the OpenAI stub as the engine and three gateways (``banyan serve``, real
HTTP on loopback): A and B with invalidation on (30 s caches), C with ``BANYAN_CACHE_INVALIDATION=false`` (the
subscriber cut: only the 1 s fallback TTL bounds it, as when pub/sub messages are lost). Then, trial after trial:

- **revocation**: a new key is used on the watcher (so the watcher has it cached), revoked through A's admin API,
  and the watcher asked (``GET /v1/models``, back to back) until it answers 401;
- **activation**: the watcher serves the adapter's card (``GET /v1/models/<name>``: the active version read
  through the same cache model resolution uses; the version's ``created`` says which one), the other version is
  activated through A, and the watcher asked until it serves the new one.

The delay of a trial is from A's answer to the first answer of the watcher that shows the change; the request
latency on the watcher (the resolution of the measurement) and how many stale answers it gave are reported too.
The probe also subscribes to the channel itself: when each change's message reached it, counted from sending the
change to A (the pub/sub delay, A's own handling included), and whether it came before A's answer.
The adapter's versions are recorded straight into the registry (as the training worker does; no S3, no engine).

    nice -n 15 .venv/bin/python -m loadtests.invalidation_probe --trials 200 --cut-trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from adapters.registry import AdapterRegistry, VersionMeta
from gateway.dev.launcher import serve_env, start_serve
from gateway.dev.processes import Children, free_port, http_ok
from gateway.dev.stack import dev_s3_settings
from gateway.invalidation import CHANNEL
from loadtests._stack import start_search_valkey

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "banyan-demo"
TENANT, ADAPTER = "probe", "probe-adapter"
STALE_LIMIT_S = 10.0
"""A trial whose change has not reached the watcher after this long fails the run."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _meta(version: int) -> VersionMeta:
    return VersionMeta(version=version, uid=secrets.token_hex(4), sha256="0" * 64, rank=8, alpha=16.0,
                       target_modules=["q_proj", "v_proj"], size_bytes=1, created=1_000_000 + version)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50_ms": round(at(0.5) * 1000, 2), "p99_ms": round(at(0.99) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2), "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


class Stack:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children = Children(log_dir=work / "logs")
        self.admin_key = "adm_probe_" + secrets.token_hex(16)
        self.redis_url = ""
        self.urls: dict[str, str] = {}

    def start(self) -> None:
        self.redis_url = start_search_valkey(self.children)
        stub_port = free_port()
        stub = self.children.spawn("stub", [sys.executable, "-m", "loadtests.stub_openai", "--port", str(stub_port),
                                            "--model", BASE_MODEL], cwd=REPO)
        stub_url = f"http://127.0.0.1:{stub_port}"
        self.children.wait_ready(stub, http_ok(stub_url + "/health"), timeout=30)
        s3 = dev_s3_settings(f"http://127.0.0.1:{free_port()}", bucket="banyan-probe")  # never reached
        for name, extra in (("a", {}), ("b", {}), ("c", {"BANYAN_CACHE_INVALIDATION": "false"})):
            env = serve_env(port=free_port(), admin_key=self.admin_key, data_dir=self.work, redis_url=self.redis_url,
                            s3=s3, engine_urls=stub_url, base_model=BASE_MODEL,
                            extra={"BANYAN_KEY_CACHE_TTL_S": "30", "BANYAN_ADAPTER_CACHE_TTL_S": "30",
                                   "BANYAN_CACHE_FALLBACK_TTL_S": "1", "BANYAN_PREFETCH_ON_ACTIVATE": "false",
                                   **extra})
            # /healthz, not /readyz: the first start exports the embedder
            child, url = start_serve(self.children, f"gateway-{name}", env, cwd=self.work, ready_path="/healthz")
            _say(f"gateway {name} (pid {child.process.pid}) at {url}{' (invalidation off)' if extra else ''}")
            self.urls[name] = url

    def stop(self) -> None:
        self.children.stop_all()


class Arrivals:
    """The probe's own subscriber to the invalidation channel: when each message reached it."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.seen: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(CHANNEL)
        self._task = asyncio.create_task(self._read(pubsub))

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self.seen.append((time.perf_counter(), message["data"].decode()))
        finally:
            await pubsub.aclose()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def first(self, *, after: int, prefix: str) -> float | None:
        """When the first message starting with ``prefix`` among those after the first ``after`` arrived."""
        return next((t for t, data in self.seen[after:] if data.startswith(prefix)), None)


@dataclass
class Trials:
    """What the trials of one kind measured."""

    delays: list[float] = field(default_factory=list)
    """From A's answer to the watcher's first answer showing the change."""
    stale: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    from_request: list[float] = field(default_factory=list)
    """From sending the change to A to its message reaching the probe's own subscriber."""
    from_answer: list[float] = field(default_factory=list)
    """From A's answer to the message reaching the probe (negative: the message came first)."""

    def note(self, arrivals: Arrivals, *, mark: int, prefix: str, sent: float, answered: float) -> None:
        arrived = arrivals.first(after=mark, prefix=prefix)
        if arrived is not None:
            self.from_request.append(arrived - sent)
            self.from_answer.append(arrived - answered)

    def summary(self) -> dict[str, Any]:
        return {"delay": _percentiles(self.delays), "stale_answers_total": sum(self.stale),
                "trials_with_a_stale_answer": sum(1 for s in self.stale if s),
                "watcher_request": _percentiles(self.latencies),
                "message_after_request_sent": _percentiles(self.from_request),
                "message_before_answer_share": round(sum(1 for x in self.from_answer if x < 0)
                                                     / max(1, len(self.from_answer)), 3),
                "messages_missing": len(self.delays) - len(self.from_request)}


async def _until(check: Callable[[], Awaitable[bool]]) -> tuple[float, int, list[float]]:
    """Ask ``check`` back to back until it holds: the seconds it took, the stale answers, each ask's latency."""
    start = time.perf_counter()
    stale, latencies = 0, []
    while True:
        asked = time.perf_counter()
        done = await check()
        latencies.append(time.perf_counter() - asked)
        if done:
            return time.perf_counter() - start, stale, latencies
        stale += 1
        if time.perf_counter() - start > STALE_LIMIT_S:
            raise RuntimeError(f"the change did not arrive within {STALE_LIMIT_S} s")


async def revocation_trials(admin: httpx.AsyncClient, watcher: httpx.AsyncClient, arrivals: Arrivals, *,
                            trials: int) -> dict[str, Any]:
    out = Trials()
    for _ in range(trials):
        made = (await admin.post(f"/admin/tenants/{TENANT}/keys", json={"name": "probe"})).json()
        headers = {"Authorization": f"Bearer {made['key']}"}
        for _ in range(2):  # the second is a cache hit
            assert (await watcher.get("/v1/models", headers=headers)).status_code == 200
        mark, sent = len(arrivals.seen), time.perf_counter()
        (await admin.delete(f"/admin/tenants/{TENANT}/keys/{made['key_id']}")).raise_for_status()
        answered = time.perf_counter()

        async def refused(h: dict[str, str] = headers) -> bool:
            return (await watcher.get("/v1/models", headers=h)).status_code == 401

        took, n_stale, lat = await _until(refused)
        out.delays.append(took)
        out.stale.append(n_stale)
        out.latencies.extend(lat)
        out.note(arrivals, mark=mark, prefix="key ", sent=sent, answered=answered)
    return out.summary()


async def activation_trials(admin: httpx.AsyncClient, watcher: httpx.AsyncClient, arrivals: Arrivals, key: str, *,
                            trials: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    out = Trials()

    async def served() -> int:
        response = await watcher.get(f"/v1/models/{ADAPTER}", headers=headers)
        response.raise_for_status()
        return int(response.json()["created"]) - 1_000_000

    current = await served()
    for _ in range(trials):
        assert await served() == current  # cached by the watcher now
        target = 2 if current == 1 else 1
        mark, sent = len(arrivals.seen), time.perf_counter()
        (await admin.post(f"/admin/tenants/{TENANT}/adapters/{ADAPTER}/activate",
                          json={"version": target})).raise_for_status()
        answered = time.perf_counter()

        async def switched(v: int = target) -> bool:
            return await served() == v

        took, n_stale, lat = await _until(switched)
        out.delays.append(took)
        out.stale.append(n_stale)
        out.latencies.extend(lat)
        out.note(arrivals, mark=mark, prefix=f"adapter {TENANT}:{ADAPTER}", sent=sent, answered=answered)
        current = target
    return out.summary()


async def _cache_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    from loadtests._stack import metric_by_label, parse_metrics

    samples = parse_metrics((await client.get("/metrics")).text)
    out = {f"key_{k}": v for k, v in metric_by_label(samples, "banyan_key_cache_total", "result").items()}
    out.update({f"adapter_{k}": v for k, v in metric_by_label(samples, "banyan_adapter_cache_total", "result").items()})
    out.update({f"event_{k}": v for k, v in
                metric_by_label(samples, "banyan_invalidation_events_total", "event").items()})
    return out


async def drive(stack: Stack, *, trials: int, cut_trials: int) -> dict[str, Any]:
    admin_headers = {"Authorization": f"Bearer {stack.admin_key}"}
    redis = Redis.from_url(stack.redis_url)
    async with httpx.AsyncClient(base_url=stack.urls["a"], headers=admin_headers, timeout=30) as admin, \
            httpx.AsyncClient(base_url=stack.urls["b"], timeout=30) as b, \
            httpx.AsyncClient(base_url=stack.urls["c"], timeout=30) as c:
        (await admin.post("/admin/tenants", json={"id": TENANT, "name": "probe"})).raise_for_status()
        key = (await admin.post(f"/admin/tenants/{TENANT}/keys", json={"name": "reader"})).json()["key"]
        registry = AdapterRegistry(redis)
        for version in (1, 2):  # as the training worker records a finished job
            assert await registry.allocate_version(TENANT, ADAPTER) == version
            assert await registry.record_version(TENANT, ADAPTER, _meta(version), activate=version == 1)
        arrivals = Arrivals(redis)
        await arrivals.start()
        result: dict[str, Any] = {}
        try:
            for label, watcher, n in (("pubsub", b, trials), ("cut", c, cut_trials)):
                _say(f"{label}: {n} revocations and {n} activations through A, watched on "
                     f"{'B' if watcher is b else 'C (invalidation off)'} ...")
                result[f"revocation_{label}"] = await revocation_trials(admin, watcher, arrivals, trials=n)
                result[f"activation_{label}"] = await activation_trials(admin, watcher, arrivals, key, trials=n)
        finally:
            await arrivals.stop()
            await redis.aclose()
        result["metrics_b"] = await _cache_metrics(b)
        result["metrics_c"] = await _cache_metrics(c)
    return result


def print_report(r: dict[str, Any]) -> None:
    print(f"load average at start / end: {r['load_start']} / {r['load_end']}")
    for label, what in (("pubsub", "B (pub/sub on, 30 s TTL)"), ("cut", "C (subscriber cut, 1 s fallback TTL)")):
        for kind in ("revocation", "activation"):
            x = r[f"{kind}_{label}"]
            d, w = x["delay"], x["watcher_request"]
            print(f"{kind:>10} seen by {what}: p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms "
                  f"over {d['n']} trials; stale answers {x['stale_answers_total']} in "
                  f"{x['trials_with_a_stale_answer']} trials; a watcher request takes p50 {w['p50_ms']} ms")
            m = x["message_after_request_sent"]
            if label == "pubsub" and m:
                print(f"{'':>10} its pub/sub message reached the probe p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms, "
                      f"max {m['max_ms']} ms after the change was sent to A (before A's answer in "
                      f"{x['message_before_answer_share']:.0%} of trials; missing: {x['messages_missing']})")
    print(f"B's caches and subscriber: {r['metrics_b']}")
    print(f"C's caches: {r['metrics_c']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=200, help="trials of each kind with pub/sub on")
    parser.add_argument("--cut-trials", type=int, default=20, help="trials of each kind with the subscriber cut")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="banyan-probe-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        stack = Stack(work)
        load_start = os.getloadavg()
        try:
            stack.start()
            result = asyncio.run(drive(stack, trials=args.trials, cut_trials=args.cut_trials))
        finally:
            stack.stop()
        result["load_start"] = [round(x, 2) for x in load_start]
        result["load_end"] = [round(x, 2) for x in os.getloadavg()]
        result["trials"], result["cut_trials"] = args.trials, args.cut_trials
    print_report(result)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
