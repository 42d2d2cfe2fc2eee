"""How long can a bystander process stall while the CPU engine generates? A machine check, not a benchmark
of Banyan: it explains latency tails and tells how wide a test's timing window must be on this machine.

It starts ``banyan dev --empty`` (fresh data dir, free loopback ports), then runs three phases of equal
length while a separate probe process sleeps 50 ms at a time and records how much longer each sleep took:

1. idle: nothing else runs;
2. burners: one pure-Python CPU burner per core;
3. engine: long greedy generations sent straight to the vLLM server, one after another.

It prints the worst oversleep and the stalls over 0.5 s per phase, then ``RESULT {json}``, and stops the
stack by its process id. Loopback only; it stops by itself.

    .venv/bin/python -m loadtests.stall_probe [--seconds 20] [--max-tokens 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.dev.launcher import launch_dev

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
    print(f"{name:8} sleeps {len(over):5}  worst oversleep {row['worst_oversleep_s']:7.3f} s  "
          f"stalls > 0.5 s: {stalls}  {extra if extra else ''}", flush=True)
    return row


def engine_phase(engine_url: str, *, model: str, seconds: float, max_tokens: int,
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
    return summarize("engine", probe, {"generations": len(done),
                                       "generation_s": [round(d, 2) for d in done]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--max-tokens", type=int, default=4000, help="tokens per generation (<= 4090)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="banyan-stall-") as work:
        print("[1] starting banyan dev --empty ...", flush=True)
        stack = launch_dev(Path(work) / "data")
        try:
            stack.wait_ready()
            print("[2] phases of", args.seconds, "s each", flush=True)
            rows = [summarize("idle", run_probe(args.seconds), {})]
            burners = [subprocess.Popen([sys.executable, "-c", _BURNER, str(args.seconds)])
                       for _ in range(os.cpu_count() or 1)]
            rows.append(summarize("burners", run_probe(args.seconds), {"burners": len(burners)}))
            for burner in burners:
                burner.wait()
            rows.append(engine_phase(stack.engine_url, headers=stack.engine_headers, model=stack.info["base_model"],
                                     seconds=args.seconds,
                                     max_tokens=args.max_tokens))
        finally:
            print("[3] stopping the stack ...", flush=True)
            stack.stop()
    result = {"phases": rows, "cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
              "seconds": round(time.monotonic() - started, 1)}
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
