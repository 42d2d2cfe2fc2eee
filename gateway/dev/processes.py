"""Child processes of the local stack: Valkey with the search module, the S3 server, the vLLM engine, the trainer.

Each child runs in its own process group (so the engine's own workers go with it) and is asked to die
with its parent; :meth:`Children.stop_all` stops every group it started, by process id, TERM then KILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildFailed(RuntimeError):
    """A child process exited or did not become ready in time."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Children:
    log_dir: Path
    started: list[Child] = field(default_factory=list)
    spawned: set[str] = field(default_factory=set)
    """The names spawned so far (running or not)."""

    def spawn(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab" if name in self.spawned else "wb") as log:  # a restart keeps the earlier log
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=cwd, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = Child(name=name, process=process, log_path=log_path)
        self.started.append(child)
        self.spawned.add(name)
        return child

    def wait_ready(self, child: Child, probe: Callable[[], bool], *, timeout: float,
                   progress: Callable[[str], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        began = time.monotonic()
        last_note = began
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise ChildFailed(f"{child.name} exited with code {child.process.returncode}; "
                                  f"its log ({child.log_path}) ends with:\n{child.tail()}")
            if probe():
                return
            if progress and time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                progress(f"  ... still waiting for {child.name} ({int(last_note - began)} s)")
            time.sleep(0.25)
        raise ChildFailed(f"{child.name} was not ready after {timeout:.0f} s; its log ({child.log_path}) ends "
                          f"with:\n{child.tail()}")

    def named(self, name: str) -> Child:
        """The newest running child spawned as ``name`` (``KeyError`` if there is none)."""
        for child in reversed(self.started):
            if child.name == name and child.process.poll() is None:
                return child
        raise KeyError(name)

    def forget(self, child: Child) -> None:
        """Stop tracking a child that has exited (it was waited for: its id may belong to another process now)."""
        if child in self.started:
            self.started.remove(child)

    def send_signal(self, child: Child, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's whole process group (SIGSTOP/SIGCONT pause and resume it)."""
        _signal_group(child.process, sig)

    def kill(self, child: Child, *, sig: signal.Signals = signal.SIGKILL, grace: float = 15.0) -> None:
        """Stop one child's process group with ``sig`` (SIGKILL at once, or a signal it may handle, then SIGKILL
        after ``grace`` seconds); it is then no longer among those :meth:`stop_all` stops."""
        _signal_group(child.process, sig)
        try:
            child.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(child.process, signal.SIGKILL)
            child.process.wait(timeout=10)
        _signal_group(child.process, signal.SIGKILL)  # any straggler in the group
        self.started.remove(child)

    def stop_all(self, *, grace: float = 15.0) -> None:
        """Stop every child process group this object started, newest first."""
        for child in reversed(self.started):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for child in reversed(self.started):
            _signal_group(child.process, signal.SIGKILL)  # any straggler in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
        self.started.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def redis_ok(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return probe
