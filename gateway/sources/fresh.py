"""Identical concurrent reads of one process, shared without ever answering a caller with an older read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class FreshReads:
    """Reads by key; each caller gets the answer of a read that started after it asked.

    When many streams open on one job at once (a reconnect storm, a page that
    many viewers load together), each reads the same job hash and the same
    first chunk. A read already in flight cannot answer a newcomer: it
    started before the newcomer asked and may miss a change the newcomer must
    see (its job just created, a point just appended). So a caller that finds
    a read of its key in flight queues for the *next* one, which starts as
    soon as the one in flight ends and answers every caller queued for it. A
    key has at most one read in flight and one queued: N callers within one
    round trip cost two reads, not N. A caller that finds nothing in flight
    reads in its own task, at the cost of a plain read.

    Callers of one key must mean the very same read: the key holds everything
    the read depends on.
    """

    def __init__(self) -> None:
        # The read in flight per key; queued callers wait only for it to end, never for its answer.
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._queued: dict[Hashable, asyncio.Future[Any]] = {}

    async def read(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        queued = self._queued.get(key)
        if queued is None:
            running = self._running.get(key)
            if running is None:
                return await self._lead(key, read)
            queued = asyncio.ensure_future(self._next(key, running, read))
            self._queued[key] = queued
            queued.add_done_callback(partial(self._forget, key))
        # shield: one caller going away must not cancel the read the others wait for.
        result: T = await asyncio.shield(queued)
        return result

    async def _lead(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        ended = asyncio.get_running_loop().create_future()
        self._running[key] = ended
        try:
            return await read()
        finally:
            if self._running.get(key) is ended:
                del self._running[key]
            ended.set_result(None)

    async def _next(self, key: Hashable, running: asyncio.Future[Any], read: Callable[[], Awaitable[T]]) -> T:
        await asyncio.wait([running])  # its answer belongs to its own callers
        # Under way from here: callers that come now queue behind this read.
        self._running[key] = self._queued.pop(key)
        return await read()

    def _forget(self, key: Hashable, future: asyncio.Future[Any]) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if self._queued.get(key) is future:
            del self._queued[key]
        if not future.cancelled():
            future.exception()  # retrieved here, in case every caller went away
