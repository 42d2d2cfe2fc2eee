"""Scripts sent together: the hot path's Redis scripts from all requests in flight, one pipeline per turn of the
event loop.

A request runs three scripts (admission before the engine call; its usage and its release after), and every
command costs the gateway a socket write, a read and redis-py's own bookkeeping (about 55 us of CPU for one
``EVALSHA``, most of it the same whatever the command). :class:`ScriptBatcher` queues the scripts called in one
turn of the loop and sends them as one pipeline (``transaction=False``: each script is still atomic, and none waits
for another) as soon as the loop is free: a request's usage and release, issued together, go out as one write, and
under load the admissions and settlements of many requests share one. Nothing waits for a timer: an idle gateway
sends each script at once, as before.

Scripts go by ``EVALSHA``; a Redis that has lost them (a restart) answers ``NOSCRIPT``, and those are sent again
as ``EVAL`` with their text (which loads them). Each caller gets its own script's reply or error; a connection
error fails every script of its batch, as it would have failed each one.

A connection that breaks after Redis ran a script but before its reply arrived makes the script run again: redis-py
sends a failed pipeline once more on a new connection, and a usage record that failed is tried again in the
background. A script that counts (usage, the tokens a release charges) must not count twice: it is made with
``once=<kind>`` (:meth:`ScriptBatcher.script`) and run with the id its caller chose once for all its tries
(``run_id``); the batcher puts that id's mark in front of it, and a repeat does nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH = 256
"""Most scripts one pipeline carries (a longer queue goes out in several)."""

ONCE_TTL_S = 120
"""How long a script run once remembers its id: longer than every try of it (redis-py's at once, a usage record's
for about a minute)."""

_ONCE_LUA = f"if redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', {ONCE_TTL_S}) == false then return 0 end\n"
"""The first line of a script made ``once``: its last key marks the run's id; a repeat does nothing, returns 0."""

_PROCESS = ""
_SERIAL = itertools.count()


def _new_process() -> None:
    """A fresh prefix and count (at import, and in a forked child: it must not repeat its parent's ids)."""
    global _PROCESS, _SERIAL
    _PROCESS, _SERIAL = secrets.token_hex(6), itertools.count()


_new_process()
os.register_at_fork(after_in_child=_new_process)


def once_id() -> str:
    """An id no other call of this process or of another gateway replica uses (a random prefix per process)."""
    return f"{_PROCESS}{next(_SERIAL):x}"


class Script:
    """A Lua script the batcher runs: its text and SHA1; ``once``: the kind of a script that takes effect once per
    run id (its runs marked ``banyan:once:<kind>:<id>`` for :data:`ONCE_TTL_S`)."""

    def __init__(self, redis: Redis, text: str, *, once: str | None = None) -> None:
        self.once = once
        self.text = _ONCE_LUA + text if once else text
        self.sha: str = redis.register_script(self.text).sha


_Item = tuple[Script, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: Redis, *, max_batch: int = MAX_BATCH) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._queue: list[_Item] = []
        self._flushing = False
        self._sending: set[asyncio.Task[None]] = set()

    def script(self, text: str, *, once: str | None = None) -> Script:
        return Script(self._redis, text, once=once)

    async def run(self, script: Script, *, keys: Sequence[Any], args: Sequence[Any], run_id: str | None = None) -> Any:
        """The script's reply (or its error), sent with whatever else was called in this turn of the loop. A
        caller cancelled while waiting stops waiting; its script still runs (as a sent command would). ``run_id``
        (a script made ``once``): the same for every try of one run (default: a new one, which still covers the
        client's own re-send of the pipeline)."""
        if script.once:
            keys = [*keys, f"banyan:once:{script.once}:{run_id or once_id()}"]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, done))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return await done

    def _flush(self) -> None:
        self._flushing = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            task = asyncio.ensure_future(self._send(queue[start:start + self._max_batch]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Item]) -> None:
        try:
            replies = await self._execute([("EVALSHA", script.sha, keys, args) for script, keys, args, _ in batch])
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:
                again = await self._execute([("EVAL", batch[i][0].text, batch[i][1], batch[i][2]) for i in lost])
                for i, reply in zip(lost, again, strict=True):
                    replies[i] = reply
        except BaseException as e:  # the connection failed (or the flush was cancelled): every caller hears it
            for *_, done in batch:
                if not done.done():
                    done.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (*_, done), reply in zip(batch, replies, strict=True):
            if done.done():
                continue
            if isinstance(reply, Exception):
                done.set_exception(reply)
            else:
                done.set_result(reply)

    async def _execute(self, commands: list[tuple[str, str, Sequence[Any], Sequence[Any]]]) -> list[Any]:
        if len(commands) == 1:  # no pipeline object for a lone script
            command, body, keys, args = commands[0]
            try:
                return [await self._redis.execute_command(command, body, len(keys), *keys, *args)]
            except ResponseError as e:  # the script's own error reply (or NOSCRIPT): its caller's alone
                return [e]
        async with self._redis.pipeline(transaction=False) as pipe:
            for command, body, keys, args in commands:
                pipe.execute_command(command, body, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        """Send what is queued and wait for everything sent to be answered."""
        if self._queue:
            self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
