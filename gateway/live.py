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
from collections.abc import AsyncIterator
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions

from gateway.sources import keys

log = logging.getLogger(__name__)

_READ_TIMEOUT_S: Final = 1.0
_RETRY_DELAY_S: Final = 1.0


class Follower:
    """One stream's view of its job's notes: ``wait_for_change`` returns on a note or the timer."""

    def __init__(self, recheck_interval_s: float) -> None:
        self._changed = asyncio.Event()
        self._recheck_interval_s = recheck_interval_s

    def notify(self) -> None:
        self._changed.set()

    async def wait_for_change(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._recheck_interval_s):
                await self._changed.wait()
        self._changed.clear()


class JobNotes:
    """The process's pub/sub subscriptions, shared by all followers of each job."""

    def __init__(self, client: aioredis.Redis, recheck_interval_s: float) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._recheck_interval_s = recheck_interval_s
        self._followers: dict[bytes, set[Follower]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    @property
    def subscribed_jobs(self) -> int:
        """How many job channels this process listens to (for tests and metrics)."""
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Follower]:
        """Notes of ``job_id`` for the body's duration."""
        channel = keys.events_channel(job_id).encode()
        follower = Follower(self._recheck_interval_s)
        await self._add(channel, follower)
        try:
            yield follower
        finally:
            await self._remove(channel, follower)

    async def _add(self, channel: bytes, follower: Follower) -> None:
        async with self._lock:
            followers = self._followers.setdefault(channel, set())
            followers.add(follower)
            if len(followers) == 1:
                try:
                    await self._pubsub.subscribe(channel)
                except redis.exceptions.RedisError:
                    # The timer still wakes this follower; the reader resubscribes on reconnect.
                    log.warning("could not subscribe to %s; following by timer", channel.decode())
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_notes(), name="job-notes-reader")

    async def _remove(self, channel: bytes, follower: Follower) -> None:
        async with self._lock:
            followers = self._followers.get(channel)
            if followers is None:
                return
            followers.discard(follower)
            if not followers:
                del self._followers[channel]
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self._pubsub.unsubscribe(channel)

    async def _read_notes(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=_READ_TIMEOUT_S)
            except (redis.exceptions.RedisError, RuntimeError, OSError):
                log.warning("job notes connection failed; followers rely on their timers meanwhile")
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            if message is None or message.get("type") != "message":
                continue
            for follower in self._followers.get(message["channel"], ()):
                follower.notify()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
