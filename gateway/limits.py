"""The per-user limit on open streams, shared by all replicas through Redis.

Each open stream holds a slot: a member of the user's sorted set whose score
is its expiry time. One task per process pushes the expiry of every slot it
holds (and of each set's key) forward well within ``ttl``, so a stream keeps
its slot however long it lives, while a replica that dies without releasing
its slots frees them when they expire. A slot is released however its
stream ends (cancellation included); a release that fails because Redis is
away is retried in the background until it succeeds or the slot expired. An
acquire whose answer never came (the request's outage hold ran out, the
connection was lost) is given up the same way, with a tombstone so that it
takes no slot if it reaches Redis later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from functools import partial
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from gateway.errors import GatewayError, TooManyStreams, Unavailable
from gateway.redis_client import call_redis
from gateway.sources import keys

log = logging.getLogger(__name__)

# Drop expired slots, then take one if fewer than the maximum are held, unless
# this very acquire was given up already (it reached Redis after its request
# was answered 503: see _CANCEL).
_ACQUIRE: Final = """
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  return -1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
# An acquire whose answer never came (cut short by the request's deadline, or a
# connection lost with it in flight) may still land: drop its slot if it did,
# and leave a tombstone that makes it take none if it lands later.
_CANCEL: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""
_RELEASE_RETRY_S: Final = (0.2, 5.0)  # first and longest pause between release attempts


class ProcessStreamCap:
    """At most ``maximum`` streams open in this process (0: no cap); beyond it 503 ``unavailable``.

    Counted from admission (before the token is verified, so a full process
    spends nothing on a request it refuses) to the stream's end, in memory:
    it bounds this process, whoever the users are.
    """

    def __init__(self, maximum: int, retry_after_s: int) -> None:
        self._maximum = maximum
        self._retry_after_s = retry_after_s
        self.open = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one place for the body of the ``with``; ``Unavailable`` when every place is held."""
        if self._maximum and self.open >= self._maximum:
            raise Unavailable(
                f"this replica is at capacity ({self._maximum} open streams); retry or reconnect to another",
                retry_after_s=self._retry_after_s,
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class Slot(msgspec.Struct, frozen=True):
    """One held slot: the user's set and this stream's member in it."""

    key: str
    member: str
    cancelled_key: str


class StreamSlots:
    """Counts a user's open streams across replicas; ``max_per_user`` 0 disables it."""

    def __init__(self, client: aioredis.Redis, max_per_user: int, ttl_s: int, retry_after_s: int) -> None:
        self._redis = client
        self._max = max_per_user
        self._ttl_s = ttl_s
        self._retry_after_s = retry_after_s
        self._acquire = client.register_script(_ACQUIRE)
        self._cancel = client.register_script(_CANCEL)
        self._held: dict[str, set[str]] = {}  # set key -> members held by this process
        self._refresher: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> int:
        """Slots this process holds now."""
        return sum(map(len, self._held.values()))

    @property
    def releasing(self) -> int:
        """Releases (and cancelled acquires) still to land in Redis."""
        return len(self._releases)

    async def acquire(self, user_id: str) -> Slot | None:
        """Take one slot of ``user_id`` (None when the limit is off); ``TooManyStreams`` if none is free.

        Raises ``RedisUnreachable`` when Redis does not answer.
        """
        if self._max == 0:
            return None
        slot = Slot(keys.user_streams_key(user_id), uuid.uuid4().hex, keys.user_cancelled_streams_key(user_id))
        now = time.time()
        args: list[float | int | str] = [now, now + self._ttl_s, self._max, slot.member, self._ttl_s * 1000]
        try:
            taken = await call_redis(
                lambda: self._acquire(keys=[slot.key, slot.cancelled_key], args=args), "counting open streams"
            )
        except BaseException:
            # Cancelled by the request's deadline, or Redis unreachable: the script may have run, or may yet.
            self._in_background(self._cancel_acquire(slot))
            raise
        if not taken:
            raise TooManyStreams(f"this user already holds {self._max} open streams", retry_after_s=self._retry_after_s)
        self._held.setdefault(slot.key, set()).add(slot.member)
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever(), name="stream-slot-refresh")
            self._refresher.add_done_callback(partial(_log_failure, what="refreshing stream slots stopped"))
        return slot

    def release(self, slot: Slot | None) -> None:
        """Give the slot back, now or (Redis away) as soon as Redis answers; never raises, never waits.

        Synchronous on purpose: it is called from ``finally`` blocks of
        handlers that may be being cancelled, where an ``await`` could be cut short.
        """
        if slot is None:
            return
        members = self._held.get(slot.key)
        if members is not None:
            members.discard(slot.member)
            if not members:
                del self._held[slot.key]
        self._in_background(self._release(slot))

    def _in_background(self, release: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(release, name="stream-slot-release")
        self._releases.add(task)
        task.add_done_callback(self._release_done)

    def _release_done(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        _log_failure(task, "releasing a stream slot failed; it expires by itself")

    async def _release(self, slot: Slot) -> None:
        await self._until_done(lambda: self._redis.zrem(slot.key, slot.member), "releasing a stream slot")

    async def _cancel_acquire(self, slot: Slot) -> None:
        now = time.time()
        args: list[float | int | str] = [slot.member, now, now + self._ttl_s, self._ttl_s * 1000]
        await self._until_done(
            lambda: self._cancel(keys=[slot.key, slot.cancelled_key], args=args), "giving up a stream slot"
        )

    async def _until_done(self, call: Callable[[], Awaitable[object]], what: str) -> None:
        """``call`` until Redis takes it, or the slot has expired by itself."""
        deadline = time.monotonic() + self._ttl_s
        pause, longest = _RELEASE_RETRY_S
        while True:
            try:
                await call_redis(call, what)
                return
            except GatewayError as exc:
                if time.monotonic() + pause > deadline:
                    log.warning("gave up releasing a stream slot (%s); it has expired by now", exc.message)
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)

    async def _refresh_forever(self) -> None:
        period = self._ttl_s / 3
        while self._held:
            await asyncio.sleep(period)
            try:
                await call_redis(self._refresh_all, "refreshing stream slots")
            except GatewayError as exc:  # keep streaming; the next refresh may succeed
                log.warning("could not refresh stream slots: %s", exc.message)

    async def _refresh_all(self) -> None:
        expires_at = time.time() + self._ttl_s
        pipe = self._redis.pipeline(transaction=False)
        for key, members in list(self._held.items()):
            pipe.zadd(key, dict.fromkeys(members, expires_at), xx=True)
            # The set's own expiry too, or a long-lived set would vanish under live streams.
            pipe.pexpire(key, self._ttl_s * 1000)
        await pipe.execute()

    async def aclose(self) -> None:
        """Stop refreshing; give pending releases a moment to land (the rest expire)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._releases:
            await asyncio.wait(self._releases, timeout=1.0)
            for task in self._releases:
                task.cancel()


def _log_failure(task: asyncio.Task[None], what: str) -> None:
    """No background task of ours dies unobserved: a failure the loop would only report at exit is logged now."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error(what, exc_info=exc)


def retry_after_seconds(retry_ms: int) -> int:
    """The ``Retry-After`` of a 429: the client's reconnect delay, in whole seconds."""
    return max(1, math.ceil(retry_ms / 1000))
