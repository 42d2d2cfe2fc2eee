"""Start and stop a local ``banyan dev --empty`` stack for a benchmark, and read Prometheus text.

The stack runs as a subprocess on a free loopback port with a fresh ``BANYAN_DATA_DIR`` and a chosen
admin key, exactly as a user starts it; inherited ``BANYAN_*`` variables are dropped so that only the
benchmark's settings apply. It is stopped with SIGINT (then SIGTERM, then SIGKILL, by its process id)
and ``banyan dev`` itself stops the services it started.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.dev.processes import free_port

READY_LINE = "banyan dev is ready"
BASE_MODEL = "banyan-demo"


@dataclass
class Stack:
    """One ``banyan dev --empty`` process and what a benchmark needs to talk to it."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    admin_key: str
    output: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_url(self) -> str:
        return str(self.info["engine_url"])

    @property
    def model_path(self) -> Path:
        return Path(self.info["model_path"])

    @property
    def lora_cache_dir(self) -> Path:
        return self.data_dir / "lora-cache"

    @property
    def engine_log(self) -> Path:
        return self.data_dir / "logs" / "engine.log"

    def wait_ready(self, *, timeout: float = 420.0) -> None:
        """Block until ``banyan dev`` prints its ready line; raise (after stopping it) if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output.read_text(errors="replace")
            if READY_LINE in text:
                self.info = json.loads((self.data_dir / "stack.json").read_text())
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"banyan dev exited with {self.process.returncode}:\n{text[-4000:]}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"banyan dev was not ready after {timeout:.0f} s:\n{self.output.read_text()[-4000:]}")

    def stop(self, *, timeout: float = 90.0) -> int | None:
        """SIGINT the stack and wait; escalate to SIGTERM and SIGKILL (this process id only)."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.process.poll()


def stack_env(data_dir: Path, *, port: int, admin_key: str, settings: dict[str, str]) -> dict[str, str]:
    """The environment of the stack: ours, minus inherited ``BANYAN_*``, plus the benchmark's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
    env.update({"BANYAN_DATA_DIR": str(data_dir), "BANYAN_PORT": str(port), "BANYAN_ADMIN_KEY": admin_key,
                "BANYAN_BASE_MODEL": BASE_MODEL})
    env.update(settings)
    return env


def start_stack(data_dir: Path, *, settings: dict[str, str], admin_key: str | None = None) -> Stack:
    """Start ``banyan dev --empty`` (returns at once; call :meth:`Stack.wait_ready`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    key = admin_key or "adm_bench_" + secrets.token_hex(12)
    output = data_dir / "banyan-dev.out"
    cmd = [str(Path(sys.executable).parent / "banyan"), "dev", "--empty"]
    with output.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=stack_env(data_dir, port=port, admin_key=key, settings=settings))
    return Stack(process=process, data_dir=data_dir, port=port, admin_key=key, output=output)


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
