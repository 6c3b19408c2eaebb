"""The per-user limit on open streams, shared by all replicas through Redis.

Each open stream holds a slot: a member of the user's sorted set whose score
is its expiry time. One task per process pushes the expiry of every slot it
holds (and of each set's key) forward well within ``ttl``, so a stream keeps
its slot however long it lives, while a replica that dies without releasing
its slots frees them when they expire: within about 3 s, as each process
beats (a liveness key, ``keys.replica_liveness_key``) and each slot names its
process, so an acquire that finds a user's slots full drops those of
replicas that stopped beating (and at the latest after ``ttl``). A slot is
released however its stream ends (cancellation included); a release that
fails because Redis is away is retried in the background until it succeeds or the slot expired. An
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
from gateway.redis_client import call_redis, raise_if_cancelling
from gateway.sources import keys

log = logging.getLogger(__name__)

# Drop expired slots (and ARGV[6...], slots found dead: of a replica that
# stopped beating, or this replica's own that it no longer holds), then take
# one if fewer than the maximum are held; when none is free, the members that
# hold them. Unless this very acquire was given up already (it reached Redis
# after its request was answered 503: see _CANCEL).
_ACQUIRE: Final = """
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  return -1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #ARGV > 5 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, 6))
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.call('ZRANGE', KEYS[1], 0, -1)
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
# Each replica's liveness: a key it sets every LIVENESS_BEAT_S that lapses
# LIVENESS_TTL_MS after its last beat. A slot's member names its replica, so a
# replica that died (SIGKILL, OOM, a lost node) has its slots dropped by the
# next acquire that needs them, seconds after its death instead of the slot TTL.
LIVENESS_BEAT_S: Final = 1.0
LIVENESS_TTL_MS: Final = 3000
# A reconnect (it carries Last-Event-ID) that finds its user's slots full is
# held this long while other replicas' slots may still lapse or be released:
# its predecessor's slot is likely one of them.
RECONNECT_PATIENCE_S: Final = LIVENESS_TTL_MS / 1000 + 1.0
_PATIENCE_POLL_S: Final = 0.25
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
# First and longest pause between release attempts: short, so that after a Redis
# restart a reconnect waiting for its predecessor's slot (RECONNECT_PATIENCE_S) sees it go.
_RELEASE_RETRY_S: Final = (0.2, 2.0)


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
        self._acquiring: set[str] = set()  # members whose acquire is in flight
        self._refresher: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self.replica_id = uuid.uuid4().hex[:16]
        self._liveness_key = keys.replica_liveness_key(self.replica_id)
        self._heartbeat: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start beating: other replicas count this one's slots while it does (nothing when the limit is off)."""
        if self._max and self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat_forever(), name="stream-slot-heartbeat")
            self._heartbeat.add_done_callback(partial(_log_failure, what="the stream slot heartbeat stopped"))

    async def _beat_forever(self) -> None:
        failing = False
        while True:
            try:
                await call_redis(
                    lambda: self._redis.set(self._liveness_key, b"1", px=LIVENESS_TTL_MS), "beating for stream slots"
                )
                if failing:
                    log.info("stream slot heartbeat answered again")
                failing = False
            except GatewayError as exc:
                if not failing:  # once per failing spell; its slots may be taken as dead meanwhile
                    log.warning("stream slot heartbeat failed: %s", exc.message)
                failing = True
            raise_if_cancelling()
            await asyncio.sleep(LIVENESS_BEAT_S)

    @property
    def held(self) -> int:
        """Slots this process holds now."""
        return sum(map(len, self._held.values()))

    @property
    def releasing(self) -> int:
        """Releases (and cancelled acquires) still to land in Redis."""
        return len(self._releases)

    async def acquire(self, user_id: str, patience_s: float = 0.0) -> Slot | None:
        """Take one slot of ``user_id`` (None when the limit is off); ``TooManyStreams`` if none is free.

        Slots found dead are dropped first: those of replicas that stopped
        beating, and this replica's own that it no longer holds (a release
        still on its way, after a Redis restart). With ``patience_s`` (a
        reconnect), full slots of other replicas are waited on for that long,
        as they may lapse or be released meanwhile. Raises
        ``RedisUnreachable`` when Redis does not answer.
        """
        if self._max == 0:
            return None
        slot = Slot(
            keys.user_streams_key(user_id),
            f"{self.replica_id}.{uuid.uuid4().hex}",
            keys.user_cancelled_streams_key(user_id),
        )
        deadline = time.monotonic() + patience_s
        self._acquiring.add(slot.member)
        try:
            while True:
                holders = await self._try_acquire(slot, dead=[])
                if holders:
                    dead = await self._dead(slot.key, holders)
                    if dead:
                        holders = await self._try_acquire(slot, dead)
                if not holders:
                    break
                others_may_lapse = any(not member.startswith(self.replica_id + ".") for member in holders)
                if not others_may_lapse or time.monotonic() + _PATIENCE_POLL_S > deadline:
                    raise TooManyStreams(
                        f"this user already holds {self._max} open streams", retry_after_s=self._retry_after_s
                    )
                await asyncio.sleep(_PATIENCE_POLL_S)
        finally:
            self._acquiring.discard(slot.member)
        self._held.setdefault(slot.key, set()).add(slot.member)
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever(), name="stream-slot-refresh")
            self._refresher.add_done_callback(partial(_log_failure, what="refreshing stream slots stopped"))
        return slot

    async def _try_acquire(self, slot: Slot, dead: list[str]) -> list[str]:
        """One attempt: [] if the slot was taken, else the members holding the user's slots."""
        now = time.time()
        args: list[float | int | str] = [now, now + self._ttl_s, self._max, slot.member, self._ttl_s * 1000, *dead]
        try:
            answer = await call_redis(
                lambda: self._acquire(keys=[slot.key, slot.cancelled_key], args=args), "counting open streams"
            )
        except BaseException:
            # Cancelled by the request's deadline, or Redis unreachable: the script may have run, or may yet.
            self._in_background(self._cancel_acquire(slot))
            raise
        if answer == 1:
            return []
        if isinstance(answer, list):
            return [member.decode() if isinstance(member, bytes) else str(member) for member in answer]
        raise TooManyStreams("this stream's slot was given up already", retry_after_s=self._retry_after_s)

    async def _dead(self, key: str, holders: list[str]) -> list[str]:
        """Of ``holders``, the members no live stream holds: this replica's not held, other replicas' not beating."""
        mine = self._held.get(key, set())
        dead = [
            member
            for member in holders
            if member.startswith(self.replica_id + ".") and member not in mine and member not in self._acquiring
        ]
        replicas = sorted({member.split(".", 1)[0] for member in holders if "." in member} - {self.replica_id})
        if replicas:
            pipe = self._redis.pipeline(transaction=False)
            for replica in replicas:
                pipe.exists(keys.replica_liveness_key(replica))
            beating = await call_redis(pipe.execute, "checking other replicas' liveness")
            gone = {replica for replica, alive in zip(replicas, beating, strict=True) if not alive}
            dead += [member for member in holders if member.split(".", 1)[0] in gone]
        return dead

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
            raise_if_cancelling()

    async def _refresh_all(self) -> None:
        expires_at = time.time() + self._ttl_s
        pipe = self._redis.pipeline(transaction=False)
        for key, members in list(self._held.items()):
            pipe.zadd(key, dict.fromkeys(members, expires_at), xx=True)
            # The set's own expiry too, or a long-lived set would vanish under live streams.
            pipe.pexpire(key, self._ttl_s * 1000)
        await pipe.execute()

    async def aclose(self) -> None:
        """Stop refreshing and beating; give pending releases a moment to land (the rest expire)."""
        for task in (self._refresher, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._releases:
            await asyncio.wait(self._releases, timeout=1.0)
            left = list(self._releases)
            for task in left:
                task.cancel()
            if left:  # ended, not left pending for the loop's close to find
                await asyncio.wait(left, timeout=1.0)


def _log_failure(task: asyncio.Task[None], what: str) -> None:
    """No background task of ours dies unobserved: a failure the loop would only report at exit is logged now."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error(what, exc_info=exc)


def retry_after_seconds(retry_ms: int) -> int:
    """The ``Retry-After`` of a 429: the client's reconnect delay, in whole seconds."""
    return max(1, math.ceil(retry_ms / 1000))
