"""Follow mode's wake-ups: one pub/sub connection per process, fanned out to followers.

Workers publish a note on ``job:{id}:events`` after each change (SPEC 6).
The gateway treats any note as "look again" and never depends on one
arriving: every follower also wakes on a timer (``follow.recheck_interval_s``),
so a lost note delays an update by at most that long. The process subscribes
to a job's channel when its first follower arrives and unsubscribes after
the last one leaves, however many streams follow the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from gateway.sources import keys

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a new follower may wait for its subscription, and an idle reader sleeps.
_RECONCILE_S: Final = 0.05
_RETRY_DELAY_S: Final = 1.0


class SharedReads:
    """Reads that all followers of one job in this process can share.

    A note wakes every follower of the job at once, and each would read the
    same job state and the same new chunk. A follower instead joins a read of
    the same key that *started after it woke* (so it sees everything that was
    there when it woke), or starts one that later wakers join. At 100
    followers this turns 200 Redis round trips per append into 2.
    """

    _KEEP: Final = 64  # recent reads remembered, per job

    def __init__(self) -> None:
        self.started = 0  # reads started so far: a follower's wake-up mark
        self._reads: OrderedDict[Hashable, tuple[int, asyncio.Future[Any]]] = OrderedDict()

    async def read(self, key: Hashable, woke_at: int, read: Callable[[], Awaitable[T]]) -> T:
        entry = self._reads.get(key)
        if entry is None or entry[0] < woke_at or (entry[1].done() and entry[1].exception() is not None):
            entry = (self.started, asyncio.ensure_future(read()))
            self.started += 1
            self._reads[key] = entry
            self._reads.move_to_end(key)
            if len(self._reads) > self._KEEP:
                self._reads.popitem(last=False)
        # shield: one follower leaving must not cancel the others' read.
        result: T = await asyncio.shield(entry[1])
        return result


class Follower:
    """One stream's view of its job's notes: ``wait_for_change`` returns on a note or the timer."""

    def __init__(self, recheck_interval_s: float, reads: SharedReads) -> None:
        self._changed = asyncio.Event()
        self._recheck_interval_s = recheck_interval_s
        self._reads = reads
        self._woke_at = reads.started

    def notify(self) -> None:
        if not self._changed.is_set():
            # Marked when the note arrives, not when this task next runs: by
            # then another follower may have started the read this one can join.
            self._woke_at = self._reads.started
        self._changed.set()

    async def wait_for_change(self) -> None:
        try:
            async with asyncio.timeout(self._recheck_interval_s):
                await self._changed.wait()
        except TimeoutError:
            self._woke_at = self._reads.started
        self._changed.clear()

    async def shared(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or the result of an identical read another follower started since this one woke."""
        return await self._reads.read(key, self._woke_at, read)


class JobNotes:
    """The process's pub/sub subscriptions, shared by all followers of each job.

    One task owns the pub/sub connection: it alone subscribes, unsubscribes
    and reads (redis-py's connection is not safe to drive from two tasks at
    once). Between short reads it brings the subscriptions in line with the
    jobs that have followers.
    """

    def __init__(self, client: aioredis.Redis, recheck_interval_s: float) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._recheck_interval_s = recheck_interval_s
        self._followers: dict[bytes, set[Follower]] = {}
        self._shared: dict[bytes, SharedReads] = {}
        self._subscribed: set[bytes] = set()
        self._reader: asyncio.Task[None] | None = None

    @property
    def subscribed_jobs(self) -> int:
        """How many job channels this process listens to (for tests and metrics)."""
        return len(self._subscribed)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Follower]:
        """Notes of ``job_id`` for the body's duration."""
        channel = keys.events_channel(job_id).encode()
        follower = Follower(self._recheck_interval_s, self._shared.setdefault(channel, SharedReads()))
        self._followers.setdefault(channel, set()).add(follower)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_notes(), name="job-notes-reader")
        try:
            yield follower
        finally:
            followers = self._followers.get(channel, set())
            followers.discard(follower)
            if not followers:
                self._followers.pop(channel, None)
                self._shared.pop(channel, None)

    async def _read_notes(self) -> None:
        while True:
            try:
                await self._reconcile()
                if not self._subscribed:
                    await asyncio.sleep(_RECONCILE_S)
                    continue
                message = await self._pubsub.get_message(timeout=_RECONCILE_S)
            except (redis.exceptions.RedisError, OSError):
                log.warning("job notes connection failed; followers rely on their timers meanwhile")
                self._subscribed.clear()  # resubscribe once the connection is back
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            if message is None or message.get("type") != "message":
                continue
            for follower in self._followers.get(message["channel"], ()):
                follower.notify()

    async def _reconcile(self) -> None:
        wanted = set(self._followers)
        if new := wanted - self._subscribed:
            await self._pubsub.subscribe(*new)
            self._subscribed |= new
        if gone := self._subscribed - wanted:
            await self._pubsub.unsubscribe(*gone)
            self._subscribed -= gone

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
