"""Fault injection on a stack of its own, longer than the CI suite: each fault under steady mixed traffic (streams of
the base model and of an adapter, ``rag``, JSON completions) from a bounded pool of clients.

Starts its own stack (:class:`gateway.dev.faults.FaultStack`: Valkey persisting to its append-only file, moto, vLLM
on the CPU with the tiny model, the gateway as ``banyan serve``), seeds tenants, keys, adapters and documents, runs
the faults in order (:data:`gateway.dev.faults.PHASES`) and stops everything. For each fault it reports the
requests sent, full answers, clean OpenAI-shaped errors, anything else (hung or refused connections, torn
streams), the recovery time (the dependency back -> the first answer that started after it), the usage the
gateway recorded against the tokens the clients were told they were served, and whether anything stored before
the fault (tenants, keys, adapters, documents) is missing or changed after it. Prints a Markdown table and a
``RESULT {json}`` line. Loopback only; every wait is bounded.

    .venv/bin/python -m loadtests.fault_injection                  # every fault, 8 clients, 8 s outages
    .venv/bin/python -m loadtests.fault_injection --phases valkey,engine --outage-s 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.dev.faults import PHASES, FaultStack, PhaseResult, Timing, seed_world, table


def _machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load}"


async def _run(stack: FaultStack, phases: list[str], timing: Timing, root: Path) -> list[PhaseResult]:
    world = await seed_world(stack, adapter_dir=root / "adapters")
    results: list[PhaseResult] = []
    for name in phases:
        began = time.monotonic()
        print(f"-- {name}", flush=True)
        result = await PHASES[name](stack, world, timing)
        results.append(result)
        row = result.row()
        print(f"   {len(result.outcomes)} requests, {row['answered']} answered, {row['clean_errors']} clean errors, "
              f"{row['other']} other, recovery {row['recovery_s']} s ({time.monotonic() - began:.0f} s)", flush=True)
        for note in result.notes:
            print(f"   {note}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, in this order: {', '.join(PHASES)} (default: all)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--steady-s", type=float, default=5.0, help="traffic before each fault (default 5)")
    parser.add_argument("--outage-s", type=float, default=8.0, help="how long each dependency stays down (default 8)")
    parser.add_argument("--after-s", type=float, default=5.0, help="traffic after recovery (default 5)")
    parser.add_argument("--drain-s", type=float, default=3.0, help="BANYAN_SHUTDOWN_DRAIN_S of the gateway")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's files here (default: temp)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    phases = [p for p in PHASES if p in phases]
    timing = Timing(workers=args.workers, steady_s=args.steady_s, outage_s=args.outage_s, after_s=args.after_s,
                    recovery_timeout_s=180.0, request_timeout_s=60.0)
    with tempfile.TemporaryDirectory(prefix="banyan-faults-") as tmp:
        root = args.data_dir or Path(tmp)
        stack = FaultStack(root, progress=lambda line: print(line, flush=True), drain_s=args.drain_s)
        began = time.monotonic()
        stack.start()
        print(f"stack ready in {time.monotonic() - began:.0f} s (logs in {stack.logs})", flush=True)
        try:
            results = asyncio.run(_run(stack, phases, timing, root))
        finally:
            stack.stop()
    print()
    print(f"machine: {_machine()}; {args.workers} clients; outages {args.outage_s} s")
    print(table(results))
    print("RESULT " + json.dumps({"machine": _machine(), "workers": args.workers, "outage_s": args.outage_s,
                                  "phases": [r.row() for r in results]}))
    clean = all(not r.others and not r.lost for r in results)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
