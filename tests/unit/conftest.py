"""Fixtures shared by the unit tests: a real Valkey for the few units whose logic lives in Redis scripts and
transactions (a throwaway server on a free loopback port, no persistence, per test module)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from gateway.dev.processes import free_port
from gateway.dev.stack import valkey_binary


@pytest.fixture(scope="module")
def valkey_url() -> Iterator[str]:
    yield from throwaway_valkey()


def throwaway_valkey(*arguments: str) -> Iterator[str]:
    """A Valkey on a free loopback port (``arguments`` added to its command line, e.g. ``--loadmodule``) while the
    generator runs: its ``redis://`` URL."""
    port = free_port()
    child = subprocess.Popen([valkey_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "no", *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sync_redis.Redis.from_url(url).ping()
                break
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        child.terminate()
        child.wait(timeout=30)


@pytest.fixture
async def redis(valkey_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(valkey_url)
    await client.flushdb()
    yield client
    await client.aclose()
