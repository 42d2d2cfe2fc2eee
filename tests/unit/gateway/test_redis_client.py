"""The gateway's Redis client: a burst of commands beyond its pool waits for a connection instead of failing."""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Connection

from gateway.app import redis_client
from gateway.settings import Settings


async def test_a_burst_beyond_the_pool_waits_for_connections_and_all_of_it_succeeds(valkey_url: str) -> None:
    client = redis_client(Settings(mode="dev", redis_url=valkey_url, redis_max_connections=8,
                                   redis_pool_timeout_s=10))
    try:
        assert isinstance(client.connection_pool, BlockingConnectionPool)
        # 40 commands that each hold a connection for 50 ms, 8 connections: five waves, none refused.
        results = await asyncio.gather(*(client.eval("redis.call('INCR', KEYS[1]); return 1", 1, "burst")
                                         for _ in range(40)),
                                       *(client.blpop(["nothing-here"], timeout=0.05) for _ in range(40)))
        assert results[:40] == [1] * 40
        assert await client.get("burst") == b"40"
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 8
    finally:
        await client.aclose()


async def test_a_connection_the_server_closed_is_replaced_without_failing_the_command(valkey_url: str) -> None:
    client = redis_client(Settings(mode="dev", redis_url=valkey_url, redis_max_connections=8))
    other = redis_client(Settings(mode="dev", redis_url=valkey_url))
    try:
        assert await client.set("before", 1)
        mine = await client.client_id()
        assert await other.client_kill_filter(_id=mine) == 1  # what a Redis restart does to every pooled connection
        assert await client.get("before") == b"1"  # on the closed connection: retried once on a new one
        assert await client.client_id() != mine
    finally:
        await client.aclose()
        await other.aclose()


async def test_commands_are_packed_by_hiredis_into_the_bytes_redis_py_writes(valkey_url: str) -> None:
    client = redis_client(Settings(mode="dev", redis_url=valkey_url))
    try:
        connection = client.connection_pool.make_connection()
        assert isinstance(connection, Connection)  # still the URL's connection class underneath
        args = ("EVALSHA", "0" * 40, 2, "banyan:rl:é:tokens", b"\x00\xff", 1764547200.123456, -1, 2**70, "CONFIG GET")
        plain = Connection()
        assert b"".join(connection.pack_command(*args)) == b"".join(plain.pack_command(*args))
        assert b"".join(connection.pack_commands([args[3:], ("PING",)])) == b"".join(
            plain.pack_commands([args[3:], ("PING",)]))
        assert await client.set("packed:é", "é" * 3) and await client.get("packed:é") == "é".encode() * 3
        assert await client.incrbyfloat("packed:f", 0.25) == 0.25
    finally:
        await client.aclose()
