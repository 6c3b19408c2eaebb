"""The one place that knows redis-py: building the client, and turning its errors into ours.

Everything else hands a coroutine to ``call_redis`` and gets back a result
or a ``gateway.errors`` exception:

- the store cannot be reached (connection refused or reset, a timeout, the
  pool exhausted, a cluster that is down or moving slots): ``RedisUnreachable``;
- a key holds another type than the contract says (``WRONGTYPE``, a worker
  broke SPEC 6): ``StoredValueMalformed``, which callers report as the
  ``data_error`` or ``job_error`` of what they were reading;
- any other refusal (``MOVED`` from a cluster we were not told about, out of
  memory, a script error): ``RedisUnreachable``, with what Redis said, since
  no retry by the client will change it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import metrics
from gateway.config import RedisSettings
from gateway.errors import RedisUnreachable, StoredValueMalformed

T = TypeVar("T")

RedisClient = aioredis.Redis


def build_redis_client(settings: RedisSettings) -> RedisClient:
    """A client on a blocking pool whose connections retry a failed command on a fresh connection.

    The retry policy goes to the pool's connections: redis-py ignores a
    ``retry=`` given to ``Redis(...)`` beside an explicit pool, and a pooled
    connection that died with a Redis restart would otherwise fail its next
    command instead of reconnecting.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), settings.retries)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        # No health-check PING (and no clock read) before commands: a dead
        # pooled connection fails its command, which the retry repeats.
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)


@metrics.observe_redis
async def call_redis(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Run one Redis call (or pipeline); redis-py's errors become the gateway's, naming ``what``."""
    try:
        return await operation()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnreachable(f"Redis unreachable while {what}") from exc
    except redis.exceptions.ResponseError as exc:
        raise response_error(exc, what) from exc
    except redis.exceptions.RedisError as exc:
        raise RedisUnreachable(f"Redis failed while {what} ({type(exc).__name__})") from exc


def response_error(exc: redis.exceptions.ResponseError, what: str) -> StoredValueMalformed | RedisUnreachable:
    """What one error reply means; also for replies collected by ``pipeline.execute(raise_on_error=False)``."""
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return StoredValueMalformed(f"{what}: the stored value has the wrong Redis type")
    if text.startswith("MOVED") or text.startswith("ASK"):
        return RedisUnreachable(f"Redis is a cluster (set redis.cluster = true) while {what}")
    return RedisUnreachable(f"Redis refused a command while {what}: {text[:120]}")
