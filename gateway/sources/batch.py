"""Pipelines asked for in one loop turn go to Redis as one: one round trip for every job looked at in that turn.

A note wakes its job's hub; when many jobs change at once (100 jobs, each
appended to every 200 ms, on a busy loop), their hubs wake in the same
loop turn and each would send its own pipeline: a connection taken, a
socket write, a reply read and a task woken per job. Here the first
caller of a turn starts one task that runs on the next turn, after every
caller of this turn has asked: it puts all their commands in one
pipeline, sends it, and hands each caller its own slice of the replies.

What each caller sees is what its own pipeline would have given it
(``execute(raise_on_error=False)``: an error reply in its place), and a
failure of the round trip itself (``call_redis``'s errors, ``RedisBusy``
included) reaches every caller of that turn; an error raised while a
caller's commands are added reaches that caller alone. A caller that is cancelled
while it waits is dropped; the others are not disturbed. Commands of
different jobs live in different hash slots: on a cluster, redis-py's
pipeline sends each node its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from gateway.redis_client import call_redis

# Adds one caller's commands to the shared pipeline.
Commands = Callable[[Pipeline], object]

# Pipelines out at once: each holds one connection of the pool.
MAX_IN_FLIGHT: Final = 4


class PipelineBatch:
    """One pipeline per loop turn for all who ask in it (one per process, shared by every job's source).

    At most ``max_in_flight`` pipelines are out at once, each holding one
    connection: who asks meanwhile waits for the next one, which then
    carries everyone who asked (more callers per round trip the busier
    Redis or the loop is, and never the whole pool).
    """

    def __init__(self, client: aioredis.Redis, what: str, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._client = client
        self._what = what  # for the error: "Redis unreachable while <what>"
        self._max_in_flight = max_in_flight
        self._asked: list[tuple[Commands, asyncio.Future[list[Any]]]] = []
        self._scheduled = False  # a send will take ``_asked`` on the next loop turn
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # held, so they are not collected mid-flight
        self.pipelines = self.commands = 0  # sent so far (tests and benchmarks)

    async def execute(self, commands: Commands) -> list[Any]:
        """The replies to what ``commands`` adds (errors in place), sent with this turn's other callers' commands."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._asked.append((commands, future))
        if not self._scheduled and self._in_flight < self._max_in_flight:
            self._schedule()
        return await future

    def _schedule(self) -> None:
        self._scheduled = True
        # Its first step runs on the next loop turn, after every caller woken in this one.
        task = asyncio.get_running_loop().create_task(self._send(), name="redis-pipeline-batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        self._scheduled = False
        asked, self._asked = self._asked, []
        asked = [(commands, future) for commands, future in asked if not future.done()]  # not the cancelled
        if not asked:
            return
        self._in_flight += 1
        try:
            await self._round_trip(asked)
        finally:
            self._in_flight -= 1
            if self._asked and not self._scheduled:
                self._schedule()  # those who asked while every pipeline was out

    async def _round_trip(self, asked: list[tuple[Commands, asyncio.Future[list[Any]]]]) -> None:
        pipe, asked, spans = self._build(asked)
        if not asked:
            return
        self.pipelines += 1
        self.commands += len(pipe)
        try:
            replies = await call_redis(lambda: pipe.execute(raise_on_error=False), self._what)
        except BaseException as exc:
            for _, future in asked:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), (start, stop) in zip(asked, spans, strict=True):
            if not future.done():
                future.set_result(replies[start:stop])

    def _build(
        self, asked: list[tuple[Commands, asyncio.Future[list[Any]]]]
    ) -> tuple[Pipeline, list[tuple[Commands, asyncio.Future[list[Any]]]], list[tuple[int, int]]]:
        """One pipeline of every caller's commands, and each caller's span of it.

        A caller whose commands raise gets that error (raised in this task, it
        would reach nobody and leave every caller of the turn waiting forever);
        the pipeline is built again without it, so none of its half-added
        commands reach the others' replies.
        """
        while True:
            pipe = self._client.pipeline(transaction=False)
            spans: list[tuple[int, int]] = []
            for commands, future in asked:
                start = len(pipe)
                try:
                    commands(pipe)
                except Exception as exc:
                    future.set_exception(exc)
                    asked = [entry for entry in asked if entry[1] is not future]
                    break
                spans.append((start, len(pipe)))
            else:
                return pipe, asked, spans
