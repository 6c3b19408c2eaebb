"""The per-user limit on open streams, shared by all replicas through Redis.

Each open stream holds a slot: a member of the user's sorted set whose score
is its expiry time. A live stream pushes its expiry forward well within
``ttl``; a replica that dies without releasing its slots frees them when they
expire, so a crash never locks a user out for longer than ``ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Final

import redis.asyncio as aioredis

from gateway.errors import RedisUnreachable, TooManyStreams, Unavailable
from gateway.sources import keys
from gateway.sources.redis_jobs import call_redis

log = logging.getLogger(__name__)

# Drop expired slots, then take one if fewer than the maximum are held.
_ACQUIRE: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class StreamSlots:
    """Counts a user's open streams across replicas; ``max_per_user`` 0 disables it."""

    def __init__(self, client: aioredis.Redis, max_per_user: int, ttl_s: int, retry_after_s: int) -> None:
        self._redis = client
        self._max = max_per_user
        self._ttl_s = ttl_s
        self._retry_after_s = retry_after_s
        self._acquire = client.register_script(_ACQUIRE)

    @contextlib.asynccontextmanager
    async def hold(self, user_id: str) -> AsyncIterator[None]:
        """Hold one slot of ``user_id`` for the body; ``TooManyStreams`` if none is free."""
        if self._max == 0:
            yield
            return
        key = keys.user_streams_key(user_id)
        member = uuid.uuid4().hex
        now = time.time()
        args: list[float | int | str] = [now, now + self._ttl_s, self._max, member, self._ttl_s * 1000]
        try:
            taken = await call_redis(lambda: self._acquire(keys=[key], args=args), "counting open streams")
        except RedisUnreachable as exc:
            raise Unavailable(exc.message) from exc
        if not taken:
            raise TooManyStreams(f"this user already holds {self._max} open streams", retry_after_s=self._retry_after_s)
        refresher = asyncio.create_task(self._refresh(key, member))
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            try:
                await self._redis.zrem(key, member)
            except Exception:  # the slot expires by itself; a failed release must not mask the stream's end
                log.warning("could not release a stream slot; it expires within %ss", self._ttl_s)

    async def _refresh(self, key: str, member: str) -> None:
        period = self._ttl_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self._redis.zadd(key, {member: time.time() + self._ttl_s}, xx=True)
            except Exception:  # keep streaming; the next refresh may succeed
                log.warning("could not refresh a stream slot", exc_info=True)


def retry_after_seconds(retry_ms: int) -> int:
    """The ``Retry-After`` of a 429: the client's reconnect delay, in whole seconds."""
    return max(1, math.ceil(retry_ms / 1000))
