"""The gateway's own health: its readiness (the dependencies' check, cached) and its shutdown drain.

On SIGTERM (:func:`gateway.cli.serve_forever`) the gateway drains: ``/readyz`` answers 503 at once (load balancers
stop sending), the requests in flight get up to ``shutdown_drain_s`` to finish, and the streams still open then are
cut (each relay registers with :meth:`Drain.on_cut`; cut, it sends an error event and ``[DONE]``) before the server
stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("banyan.health")


class Drain:
    """Requests in flight (counted by :class:`gateway.middleware.RequestContextMiddleware`), whether the gateway is
    draining, and the cut of the streams still open when the drain time is up."""

    def __init__(self) -> None:
        self.requests = 0
        self.draining = False
        self.streams_cut = False
        self._cuts: set[Callable[[], None]] = set()
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.requests += 1

    def leave(self) -> None:
        self.requests -= 1
        if self.requests <= 0 and self._idle is not None:
            self._idle.set()

    def begin(self) -> None:
        """Go unready: ``/readyz`` answers 503 from now on."""
        self.draining = True

    def on_cut(self, cut: Callable[[], None]) -> Callable[[], None]:
        """Call ``cut`` when the streams are cut (at once if they already are); returns what forgets it (a stream
        that ended). Registered once per stream, nothing per event: a relay waits for the engine's bytes as it
        would without a drain, and ``cut`` interrupts that wait."""
        if self.streams_cut:
            cut()
        else:
            self._cuts.add(cut)
        return functools.partial(self._cuts.discard, cut)

    def cut_streams(self) -> None:
        """End every stream still open (also one waiting for the engine's next bytes)."""
        self.streams_cut = True
        cuts, self._cuts = self._cuts, set()
        for cut in cuts:
            cut()

    async def run(self, *, seconds: float, stop: Callable[[], None], settle_s: float = 2.0) -> None:
        """The whole drain: unready, up to ``seconds`` for the requests in flight to end, cut the streams still open
        (and give them ``settle_s`` to send their last event), then ``stop`` the server."""
        self.begin()
        log.warning("draining: unready, %d request(s) in flight, up to %.0f s", self.requests, seconds)
        if not await self._until_idle(seconds):
            log.warning("drain time is up: ending %d request(s) still open", self.requests)
            self.cut_streams()
            await self._until_idle(settle_s)
        stop()

    async def _until_idle(self, seconds: float) -> bool:
        """Whether no request was in flight within ``seconds``."""
        self._idle = asyncio.Event()
        if self.requests <= 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


ROLES = ("engine", "redis", "object_store")
"""What ``/readyz`` names: the role of a dependency, never its address."""


@dataclass
class Readiness:
    """The last check of the dependencies, reused for ``ttl_s`` (one check at a time: concurrent probes share
    it), so that ``/readyz`` does not fan out to every dependency on each call."""

    ttl_s: float = 2.0
    _checked_at: float = field(default=-1e18, init=False, repr=False)
    _failed: tuple[str, ...] = field(default=(), init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    async def failed(self, check: Callable[[], Awaitable[dict[str, bool]]]) -> tuple[str, ...]:
        """The roles (:data:`ROLES`) whose check failed, from a check at most ``ttl_s`` old."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_s:
                ok = await check()
                roles = (*ROLES, *(role for role in ok if role not in ROLES))  # e.g. one engine role per base
                self._failed = tuple(role for role in roles if not ok.get(role, False))
                self._checked_at = time.monotonic()
            return self._failed


async def probe(check: Awaitable[Any], *, role: str, timeout_s: float = 3.0) -> bool:
    """Whether ``check`` finished in time; the failure is logged (by kind), never raised or shown to the caller."""
    try:
        await asyncio.wait_for(check, timeout=timeout_s)
        return True
    except Exception as e:  # readiness reports any failure, never raises
        log.warning("readiness: %s failed: %s", role, type(e).__name__)
        return False
