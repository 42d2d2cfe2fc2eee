"""How long does a bystander process stall while the CPU engine generates, with vLLM's message queues
spinning (vLLM's own wait) and sleeping (``banyan dev``'s ``BANYAN_ENGINE_SHM_BUSY_SLEEP_S``)? A machine check
more than a benchmark: it explains latency tails and tells how wide a test's timing window must be.

Two phases without an engine's load first (idle; one pure-Python CPU burner per core), then, for each
setting, a ``banyan dev --empty`` (fresh data dir, free loopback ports) and two engine phases:

1. single: long greedy generations sent straight to the vLLM server, one after another, while a separate
   probe process sleeps 50 ms at a time and records how much longer each sleep took;
2. n16: one request of 16 sequences (as the integration test of a JSON client that leaves), while its
   client reads the engine's and the gateway's ``/metrics`` again and again (how long each answer took).

It prints a row per phase, then ``RESULT {json}``, and stops each stack by its process id. Loopback only;
it stops by itself.

    .venv/bin/python -m loadtests.stall_probe [--seconds 20] [--max-tokens 4000] [--sleeps 0,0.0001]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.dev.launcher import DevProcess, launch_dev

_PROBE = """
import json, sys, time
end, over = time.monotonic() + float(sys.argv[1]), []
while time.monotonic() < end:
    t = time.monotonic(); time.sleep(0.05); over.append(time.monotonic() - t - 0.05)
print(json.dumps(over))
"""

_BURNER = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"


def run_probe(seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _PROBE, str(seconds)], stdout=subprocess.PIPE, text=True)


def summarize(name: str, probe: subprocess.Popen[str], extra: dict[str, Any]) -> dict[str, Any]:
    out, _ = probe.communicate()
    over = json.loads(out)
    stalls = [round(x, 2) for x in over if x > 0.5]
    row = {"phase": name, "sleeps": len(over), "worst_oversleep_s": round(max(over, default=0.0), 3),
           "stalls_over_0_5_s": stalls, **extra}
    print(f"{name:18} sleeps {len(over):5}  worst oversleep {row['worst_oversleep_s']:7.3f} s  "
          f"stalls > 0.5 s: {stalls}  {extra if extra else ''}", flush=True)
    return row


def engine_phase(name: str, engine_url: str, *, model: str, seconds: float, max_tokens: int,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    done: list[float] = []
    stop = time.monotonic() + seconds

    def generate() -> None:
        with httpx.Client(base_url=engine_url, headers=headers, timeout=300) as client:
            while time.monotonic() < stop:
                started = time.monotonic()
                response = client.post("/v1/completions", json={"model": model, "prompt": "long",
                                                                "max_tokens": max_tokens, "ignore_eos": True,
                                                                "temperature": 0})
                response.raise_for_status()
                done.append(time.monotonic() - started)

    probe = run_probe(seconds)
    try:
        generate()
    except BaseException:
        probe.kill()
        probe.wait()
        raise
    return summarize(name, probe, {"generations": len(done), "generation_s": [round(d, 2) for d in done],
                                   "tokens_per_s": round(len(done) * max_tokens / max(sum(done), 1e-9), 1)})


def metrics_phase(name: str, stack: DevProcess, *, model: str, max_tokens: int) -> dict[str, Any]:
    """One request of 16 sequences to the engine; meanwhile its /metrics and the gateway's, read in turn."""
    answers: dict[str, list[float]] = {"engine": [], "gateway": []}
    result: dict[str, float] = {}

    def generate() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=stack.engine_url, headers=stack.engine_headers, timeout=600) as client:
            client.post("/v1/completions", json={"model": model, "prompt": "long", "max_tokens": max_tokens,
                                                 "n": 16, "ignore_eos": True}).raise_for_status()
        result["generation_s"] = time.monotonic() - started

    worker = threading.Thread(target=generate)
    worker.start()
    with httpx.Client(timeout=600) as reader:
        while worker.is_alive():
            for which, url in (("engine", stack.engine_url), ("gateway", stack.url)):
                asked = time.monotonic()
                reader.get(url + "/metrics").raise_for_status()
                answers[which].append(time.monotonic() - asked)
            time.sleep(0.05)
    worker.join()
    row = {"phase": name, "generation_s": round(result["generation_s"], 2),
           **{f"{which}_metrics_reads": len(times) for which, times in answers.items()},
           **{f"{which}_metrics_worst_s": round(max(times, default=0.0), 3) for which, times in answers.items()}}
    print(f"{name:18} 16 x {max_tokens} tokens in {row['generation_s']} s; /metrics worst answer: engine "
          f"{row['engine_metrics_worst_s']} s ({row['engine_metrics_reads']} reads), gateway "
          f"{row['gateway_metrics_worst_s']} s ({row['gateway_metrics_reads']} reads)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each probe phase")
    parser.add_argument("--max-tokens", type=int, default=4000, help="tokens per generation (<= 4090)")
    parser.add_argument("--sleeps", default="0,0.0001",
                        help="BANYAN_ENGINE_SHM_BUSY_SLEEP_S values to compare (0: vLLM's own spin)")
    args = parser.parse_args()
    started = time.monotonic()
    print("[1] phases without an engine, of", args.seconds, "s each", flush=True)
    rows = [summarize("idle", run_probe(args.seconds), {})]
    burners = [subprocess.Popen([sys.executable, "-c", _BURNER, str(args.seconds)])
               for _ in range(os.cpu_count() or 1)]
    rows.append(summarize("burners", run_probe(args.seconds), {"burners": len(burners)}))
    for burner in burners:
        burner.wait()
    for sleep in args.sleeps.split(","):
        label = "spin" if float(sleep) == 0 else f"sleep{float(sleep) * 1e6:g}us"
        with tempfile.TemporaryDirectory(prefix="banyan-stall-") as work:
            print(f"[2] banyan dev --empty with BANYAN_ENGINE_SHM_BUSY_SLEEP_S={sleep} ({label}) ...", flush=True)
            stack = launch_dev(Path(work) / "data", extra_env={"BANYAN_ENGINE_SHM_BUSY_SLEEP_S": sleep})
            try:
                stack.wait_ready()
                model = stack.info["base_model"]
                rows.append(engine_phase(f"{label}:single", stack.engine_url, headers=stack.engine_headers,
                                         model=model, seconds=args.seconds, max_tokens=args.max_tokens))
                rows.append(metrics_phase(f"{label}:n16", stack, model=model, max_tokens=args.max_tokens))
            finally:
                print("[3] stopping the stack ...", flush=True)
                stack.stop()
    result = {"phases": rows, "cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
              "seconds": round(time.monotonic() - started, 1)}
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
