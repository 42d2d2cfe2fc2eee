"""The script batcher on a real Valkey: scripts of one moment share a pipeline, each caller gets its own reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.dev.processes import free_port
from gateway.redis_batch import ONCE_TTL_S, ScriptBatcher

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('refused ' .. ARGV[1])"


class CountingRedis:
    """Counts the pipelines and the lone commands the batcher sends."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pipelines = 0
        self.lone = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pipeline, execute = self.redis.pipeline, self.redis.execute_command

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return pipeline(*args, **kwargs)

        async def counted_execute(*args: Any, **kwargs: Any) -> Any:
            self.lone += 1
            return await execute(*args, **kwargs)

        monkeypatch.setattr(self.redis, "pipeline", counted_pipeline)
        monkeypatch.setattr(self.redis, "execute_command", counted_execute)


async def test_scripts_called_together_share_one_pipeline_and_each_gets_its_reply(
        redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = ScriptBatcher(redis)
    incr = batcher.script(INCR)
    await redis.script_load(INCR)  # else the first batch is sent again as EVAL (see the NOSCRIPT test)
    counting = CountingRedis(redis)
    counting.install(monkeypatch)
    replies = await asyncio.gather(*(batcher.run(incr, keys=[f"k{i % 3}"], args=[i]) for i in range(12)))
    assert counting.pipelines == 1 and counting.lone == 0
    # INCRBY in call order within each key: k0 gets 0, 3, 6, 9 -> running totals 0, 3, 9, 18
    assert replies[0::3] == [0, 3, 9, 18]
    assert replies[1::3] == [1, 5, 12, 22]
    assert await redis.get("k2") == b"26"  # 2 + 5 + 8 + 11


async def test_a_lone_script_is_sent_without_a_pipeline(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = ScriptBatcher(redis)
    incr = batcher.script(INCR)
    await redis.script_load(INCR)
    counting = CountingRedis(redis)
    counting.install(monkeypatch)
    assert await batcher.run(incr, keys=["solo"], args=[5]) == 5
    assert await batcher.run(incr, keys=["solo"], args=[5]) == 10
    assert counting.pipelines == 0 and counting.lone == 2


async def test_scripts_a_restarted_redis_lost_are_sent_again_with_their_text(redis: Redis) -> None:
    batcher = ScriptBatcher(redis)
    incr = batcher.script(INCR)
    for together in (1, 5):  # the lone path and the pipeline path
        await redis.script_flush()
        replies = await asyncio.gather(*(batcher.run(incr, keys=[f"flushed{together}"], args=[1])
                                         for _ in range(together)))
        assert sorted(replies) == list(range(1, together + 1))
    assert await redis.script_exists(incr.sha) == [True]


@pytest.mark.parametrize("loaded", [(), (INCR,), (INCR, FAIL)])
async def test_a_failing_script_fails_only_its_own_caller(redis: Redis, loaded: tuple[str, ...]) -> None:
    await redis.script_flush()
    for text in loaded:  # none, some or all of the batch found loaded: the NOSCRIPT resend is per script
        await redis.script_load(text)
    batcher = ScriptBatcher(redis)
    incr, fail = batcher.script(INCR), batcher.script(FAIL)
    results = await asyncio.gather(batcher.run(incr, keys=["ok"], args=[1]), batcher.run(fail, keys=["x"], args=[7]),
                                   batcher.run(incr, keys=["ok"], args=[1]), return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError) and "refused 7" in str(results[1])
    alone = await asyncio.gather(batcher.run(fail, keys=["x"], args=[8]), return_exceptions=True)
    assert isinstance(alone[0], ResponseError)


async def test_an_unreachable_redis_fails_every_caller_of_the_batch() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1.0)
    batcher = ScriptBatcher(client)
    incr = batcher.script(INCR)
    try:
        results = await asyncio.gather(*(batcher.run(incr, keys=["k"], args=[1]) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await client.aclose()


async def test_a_caller_that_stops_waiting_does_not_stop_its_script(redis: Redis) -> None:
    batcher = ScriptBatcher(redis)
    incr = batcher.script(INCR)
    waiting = asyncio.ensure_future(batcher.run(incr, keys=["kept"], args=[4]))
    await asyncio.sleep(0)  # queued
    waiting.cancel()
    await batcher.aclose()
    assert await redis.get("kept") == b"4"



async def test_a_once_script_takes_effect_once_per_run_id(redis: Redis) -> None:
    """Sent again with the same run id (its reply lost after it ran), a script made ``once`` does nothing; alone in
    a lone command or among others in a pipeline; without a run id every run is its own."""
    batcher = ScriptBatcher(redis)
    incr = batcher.script(INCR, once="test")
    assert await batcher.run(incr, keys=["n"], args=[5], run_id="a") == 5
    assert await batcher.run(incr, keys=["n"], args=[5], run_id="a") == 0  # the repeat: nothing, 0
    replies = await asyncio.gather(batcher.run(incr, keys=["n"], args=[1], run_id="a"),
                                   batcher.run(incr, keys=["n"], args=[2], run_id="b"),
                                   batcher.run(incr, keys=["n"], args=[2], run_id="b"))
    assert replies == [0, 7, 0] and await redis.get("n") == b"7"
    await batcher.run(incr, keys=["n"], args=[1])
    await batcher.run(incr, keys=["n"], args=[1])
    assert await redis.get("n") == b"9"
    assert 0 < await redis.ttl("banyan:once:test:a") <= ONCE_TTL_S  # the mark goes by itself
    plain = batcher.script(INCR)
    assert [await batcher.run(plain, keys=["m"], args=[1], run_id="a") for _ in range(2)] == [1, 2]


def test_once_ids_do_not_repeat_within_a_process_or_in_a_forked_child() -> None:
    import os

    from gateway.redis_batch import once_id

    ids = {once_id() for _ in range(1000)}
    assert len(ids) == 1000
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its ids, to the parent
        os.write(write, " ".join(once_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split())
    assert len(theirs) == 100 and not theirs & (ids | {once_id() for _ in range(100)})
