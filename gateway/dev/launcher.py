"""``banyan dev`` as a subprocess: the one launcher of the integration tests and the load scripts.

:func:`launch_dev` starts ``banyan dev`` the way a user does (the ``banyan`` executable next to this Python)
on a free loopback port, with its own data dir, and returns at once; :meth:`DevProcess.wait_ready` waits for
the one ready line (:data:`READY_LINE`) and then reads ``<data dir>/stack.json``; :meth:`DevProcess.stop`
sends SIGINT (``banyan dev`` then stops the services it started), then SIGTERM, then SIGKILL, to its process
id only.

The process gets this process' environment minus every inherited ``BANYAN_*`` variable, so that only the
caller's settings apply: the data dir, the port, the admin key, the dev model (``BANYAN_DEV_MODEL``; tests and
benchmarks use the tiny demo model) and the caller's ``extra_env``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.store import S3Settings
from gateway.dev.processes import Child, Children, free_port, http_ok
from gateway.dev.stack import dev_s3_settings

READY_LINE = "banyan dev is ready"
"""What ``banyan dev`` prints once the gateway serves (and the demo tenant, unless ``--empty``, is seeded)."""
READY_TIMEOUT_S = 420.0
OUTPUT_FILE = "banyan-dev.out"


class DevNotReady(RuntimeError):
    """``banyan dev`` exited or did not print its ready line in time (the message ends with its output)."""


@dataclass
class DevProcess:
    """One ``banyan dev`` process and what a caller needs to talk to it."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    admin_key: str
    """The admin key it was given ("" if ``banyan dev`` generated one: it prints it)."""
    output: Path
    """Its stdout and stderr."""
    info: dict[str, Any] = field(default_factory=dict)
    """``<data dir>/stack.json`` (read by :meth:`wait_ready`): the URLs of the services it started."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_url(self) -> str:
        return str(self.info["engine_url"])

    @property
    def engine_headers(self) -> dict[str, str]:
        """What a direct call to the engine's API (``/v1/*``) must send: its API key."""
        return {"Authorization": f"Bearer {self.info['engine_api_key']}"}

    @property
    def model_path(self) -> Path:
        return Path(self.info["model_path"])

    @property
    def lora_cache_dir(self) -> Path:
        return self.data_dir / "lora-cache"

    @property
    def engine_log(self) -> Path:
        return self.data_dir / "logs" / "engine.log"

    def s3_settings(self) -> S3Settings:
        """The S3 settings of the running stack's object store (its moto server)."""
        return dev_s3_settings(self.info["s3_endpoint_url"], bucket=self.info["s3_bucket"])

    def output_text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, *, timeout: float = READY_TIMEOUT_S) -> DevProcess:
        """Block until the ready line; then read ``stack.json``. Raise :class:`DevNotReady` (after stopping the
        process) if it exits first or the timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.output_text():
                self.info = json.loads((self.data_dir / "stack.json").read_text())
                return self
            if self.process.poll() is not None:
                raise DevNotReady(f"banyan dev exited with code {self.process.returncode} before it was ready"
                                  f"{self._tail()}")
            time.sleep(0.5)
        self.stop()
        raise DevNotReady(f"banyan dev was not ready after {timeout:.0f} s (stopped){self._tail()}")

    def stop(self, *, timeout: float = 90.0) -> int | None:
        """SIGINT and wait; then SIGTERM, then SIGKILL (this process id only). Return its exit code."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.process.poll()

    def _tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.output_text().splitlines()[-lines:])
        return (f"; the services' logs are in {self.data_dir / 'logs'}; its output ({self.output}) ends with:\n"
                f"{tail}")


def _hear_sigint() -> None:  # runs in the child between fork and exec
    """SIGINT as the default again: a process started from a background job of a non-interactive shell (as CI
    may run the suite) inherits SIGINT ignored, and ``stop`` would then wait out its first timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clean_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process' environment minus inherited ``BANYAN_*`` variables, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BANYAN_")}
    env.update(settings)
    return env


def serve_env(*, port: int, admin_key: str, data_dir: Path, redis_url: str, s3: S3Settings, engine_urls: str,
              base_model: str, model_config: Path | None = None, engine_api_key: str | None = None,
              max_model_len: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a production gateway (``banyan serve``) on a local stack's Valkey and S3, in front of
    ``engine_urls`` (comma-separated: the stack's engines, or a stub), offline, logging warnings only; ``extra``
    adds or overrides settings (the caller's own)."""
    return clean_env({
        "BANYAN_MODE": "prod", "BANYAN_ADMIN_KEY": admin_key, "BANYAN_HOST": "127.0.0.1", "BANYAN_PORT": str(port),
        "BANYAN_DATA_DIR": str(data_dir), "BANYAN_REDIS_URL": redis_url, **s3.s3_env(),
        "BANYAN_ENGINE_URLS": engine_urls, "BANYAN_BASE_MODEL": base_model,
        **({"BANYAN_BASE_MODEL_CONFIG": str(model_config)} if model_config is not None else {}),
        **({"BANYAN_ENGINE_API_KEY": engine_api_key} if engine_api_key else {}),
        **({"BANYAN_MAX_MODEL_LEN": str(max_model_len)} if max_model_len is not None else {}),
        "BANYAN_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra or {})})


def pinned(cpus: str) -> list[str]:
    """The command prefix that runs a child on ``cpus`` (a ``taskset -c`` list), or nothing for an empty list."""
    return ["taskset", "-c", cpus] if cpus else []


def start_serve(children: Children, name: str, env: Mapping[str, str], *, cwd: Path, timeout: float = 240.0,
                ready_path: str = "/readyz", cpus: str = "") -> tuple[Child, str]:
    """Start ``banyan serve`` with ``env`` (:func:`serve_env`) as the child ``name``, on the CPUs ``cpus`` (a
    ``taskset -c`` list; empty: any), and wait until ``ready_path`` answers 200; the child and its URL."""
    url = f"http://127.0.0.1:{env['BANYAN_PORT']}"
    banyan = str(Path(sys.executable).parent / "banyan")
    child = children.spawn(name, [*pinned(cpus), banyan, "serve"], env=dict(env), cwd=cwd)
    children.wait_ready(child, http_ok(url + ready_path), timeout=timeout)
    return child, url


def launch_dev(data_dir: Path, *, empty: bool = True, model: str = "tiny", admin_key: str | None = None,
               port: int | None = None, extra_env: Mapping[str, str] | None = None,
               command: Sequence[str] | None = None) -> DevProcess:
    """Start ``banyan dev`` (``--empty`` unless ``empty=False``) and return at once: call
    :meth:`DevProcess.wait_ready`.

    ``admin_key``: None makes a random one; "" lets ``banyan dev`` generate (and print) its own. ``port``:
    the gateway's (default: a free one). ``extra_env``: more ``BANYAN_*`` settings (or others). ``command``
    replaces the ``banyan`` executable (tests of this launcher).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    key = "adm_dev_" + secrets.token_hex(16) if admin_key is None else admin_key
    env = clean_env({"BANYAN_DATA_DIR": str(data_dir), "BANYAN_PORT": str(port), "BANYAN_DEV_MODEL": model,
                     **({"BANYAN_ADMIN_KEY": key} if key else {}), **(extra_env or {})})
    cmd = [*(command or [str(Path(sys.executable).parent / "banyan")]), "dev", *(["--empty"] if empty else [])]
    output = data_dir / OUTPUT_FILE
    with output.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   preexec_fn=_hear_sigint)
    return DevProcess(process=process, data_dir=data_dir, port=port, admin_key=key, output=output)
