"""The one place that knows redis-py: building the client, and turning its errors into ours.

Everything else hands a coroutine to ``call_redis`` and gets back a result
or a ``gateway.errors`` exception:

- the store cannot be reached (connection refused or reset, a timeout, a
  cluster that is down or moving slots, a refused password or certificate):
  ``RedisUnreachable``, whose ``cause`` names why
  (``redis_health.classify_redis_failure``, logged once per change of state);
- every pooled connection stayed busy for the whole bounded wait:
  ``RedisBusy``, a ``RedisUnreachable`` that a follower rides out (it tries
  again later and keeps its stream) where a new stream answers 503;
- a key holds another type than the contract says (``WRONGTYPE``, a worker
  broke SPEC 6): ``StoredValueMalformed``, which callers report as the
  ``data_error`` or ``job_error`` of what they were reading;
- any other refusal (``MOVED`` from a cluster we were not told about, out of
  memory, a script error): ``RedisUnreachable``, with what Redis said, since
  no retry by the client will change it;
- an error raised under redis-py that it did not wrap (an event loop's own,
  such as uvloop's ``RuntimeError`` on a transport a TCP reset closed, or a
  bare ``OSError``): ``RedisUnreachable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import metrics
from gateway.config import RedisSettings
from gateway.errors import GatewayError, RedisUnreachable, StoredValueMalformed
from gateway.redis_health import HEALTH, PHRASES, RedisCause, classify_redis_failure

T = TypeVar("T")

# The sources, the slots and the cache are typed against ``Redis``; in
# cluster mode they get a ``RedisCluster``, whose command, script and
# pipeline methods are the same (``is_cluster`` tells the two apart).
RedisClient = aioredis.Redis


class RedisBusy(RedisUnreachable):
    """No pooled connection became free within ``redis.pool_timeout_s``: Redis is fine, we are busy."""


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster (``redis.cluster = true``)."""
    return isinstance(client, RedisCluster)


def build_redis_client(settings: RedisSettings) -> RedisClient:
    """The client ``settings`` ask for: one server, or the cluster that ``redis.url`` is a node of."""
    if settings.cluster:
        return cast(aioredis.Redis, _build_cluster_client(settings))
    return _build_single_client(settings)


def _security_options(settings: RedisSettings) -> dict[str, Any]:
    """The password and TLS settings as redis-py's keywords (TLS ones only for ``rediss://``)."""
    options: dict[str, Any] = {}
    if settings.password:
        options["password"] = settings.password
    if urlsplit(settings.url).scheme == "rediss":
        options.update(
            ssl_ca_certs=settings.tls_ca_file or None,  # None: the system's CAs
            ssl_certfile=settings.tls_cert_file or None,
            ssl_keyfile=settings.tls_key_file or None,
            ssl_check_hostname=settings.tls_check_hostname,
        )
    return options


def _retry(settings: RedisSettings) -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), settings.retries)


class ClosedTransportConnection(aioredis.Connection):
    """A connection whose write on a transport closed under it (a TCP reset) is a ``ConnectionError``.

    uvloop raises ``RuntimeError: unable to perform operation on
    <TCPTransport closed=True>`` there, where asyncio's own loop raises
    nothing; redis-py wraps only ``OSError``, so the command was not retried
    on a fresh connection and the caller got a bare ``RuntimeError``.
    redis-py has already dropped the connection when this is raised.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            raise redis.exceptions.ConnectionError(f"the connection was closed under a write ({exc})") from exc


def _build_single_client(settings: RedisSettings) -> aioredis.Redis:
    """A client on a blocking pool whose connections retry a failed command on a fresh connection.

    The retry policy goes to the pool's connections: redis-py ignores a
    ``retry=`` given to ``Redis(...)`` beside an explicit pool, and a pooled
    connection that died with a Redis restart would otherwise fail its next
    command instead of reconnecting.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=_retry(settings),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        # No health-check PING (and no clock read) before commands: a dead
        # pooled connection fails its command, which the retry repeats.
        health_check_interval=0,
        # For redis:// URLs; rediss:// and unix:// keep redis-py's own classes (the URL's wins).
        connection_class=ClosedTransportConnection,
        **_security_options(settings),
    )
    return aioredis.Redis(connection_pool=pool)


def _build_cluster_client(settings: RedisSettings) -> RedisCluster:
    """A cluster client that discovers every node from the one ``redis.url`` names.

    redis-py's cluster pools do not wait: past ``max_connections`` to one
    node a command fails at once with ``MaxConnectionsError``. A gate of
    ``redis.max_connections`` commands in flight per process gives the
    cluster the bounded wait of the single-server pool (and so never more
    connections to any one node than that).
    """
    client = cast(
        _GatedRedisCluster,
        _GatedRedisCluster.from_url(
            settings.url,
            max_connections=settings.max_connections,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            retry=_retry(settings),
            health_check_interval=0,
            **_security_options(settings),
        ),
    )
    client.gate = _Gate(settings.max_connections, settings.pool_timeout_s)
    return client


class _Gate:
    """At most ``size`` commands (or pipelines) in flight; a wait past ``timeout_s`` is ``MaxConnectionsError``."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self._size = size
        self._timeout_s = timeout_s
        self._free: asyncio.Semaphore | None = None  # made on first use, in the loop that uses it

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._free is None:
            self._free = asyncio.Semaphore(self._size)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._free.acquire()
        except TimeoutError:
            raise redis.exceptions.MaxConnectionsError("No connection available.") from None
        try:
            return await call()
        finally:
            self._free.release()


class _GatedRedisCluster(RedisCluster):
    gate: _Gate

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.gate.run(lambda: super(_GatedRedisCluster, self).execute_command(*args, **kwargs))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise redis.exceptions.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _GatedClusterPipeline(self, transaction)  # type: ignore[abstract]


class _GatedClusterPipeline(ClusterPipeline):
    """A cluster pipeline through the gate."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = cast(_GatedRedisCluster, self.cluster_client)
        parent = super().execute
        return await client.gate.run(lambda: parent(raise_on_error, allow_redirections))


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a Redis call swallowed, so that a loop calling Redis ends.

    Python 3.11's ``asyncio.wait_for``, around redis-py's socket writes, can
    swallow a cancellation that lands as the write completes (bpo-42130): the
    task's ``cancelling()`` stays set but nothing is raised, and a background
    loop that goes on (the slot heartbeat) would never end, so neither would
    the shutdown that awaits it. For loops of their own task that are never
    meant to outlive a cancellation (``call_redis`` checks each call itself).
    """
    if (task := asyncio.current_task()) is not None and task.cancelling():
        raise asyncio.CancelledError


@metrics.observe_redis
async def call_redis(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Run one Redis call (or pipeline); redis-py's errors become the gateway's, naming ``what``.

    A cancellation requested during the call (the task's ``cancelling()``
    count rose) is raised, even when redis-py swallowed it (bpo-42130): a loop
    of calls, or a stream reading chunk after chunk, ends when its task is
    cancelled. Only one requested during the call: a task that caught its
    cancellation and cleans up (more calls in its ``finally``) is left alone.
    Cancelled, then failed: the cancellation is what the caller sees.
    """
    task = asyncio.current_task()
    cancels = 0 if task is None else task.cancelling()
    started = time.monotonic()
    try:
        result = await operation()
    except Exception as exc:
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError from exc
        ours = _gateway_error(exc, what, started)
        if ours is None:
            raise
        raise ours from exc
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError
    if HEALTH.cause is not None:
        HEALTH.answered()
    return result


def _gateway_error(exc: Exception, what: str, started: float) -> GatewayError | None:
    """The gateway's error for what a Redis call raised (None: not Redis's, raised as it is)."""
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        return RedisBusy(f"no Redis connection free while {what}", "busy")
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        if str(exc).startswith("No connection available"):  # BlockingConnectionPool's wait ran out
            return RedisBusy(f"no Redis connection free while {what}", "busy")
        return unreachable(exc, what, started)
    if isinstance(exc, redis.exceptions.ResponseError):
        return response_error(exc, what)
    if isinstance(exc, redis.exceptions.RedisError | redis.exceptions.RedisClusterException):
        return unreachable(exc, what, started)
    if isinstance(exc, OSError | EOFError | RuntimeError):
        # Raised under redis-py and not wrapped by it: a socket error of a
        # connection class we did not choose (rediss://, unix://), or an event
        # loop's own (uvloop's RuntimeError on a transport closed by a reset).
        return unreachable(exc, what, started)
    return None


def unreachable(exc: BaseException, what: str, started: float | None = None) -> RedisUnreachable:
    """A failure to reach Redis, named by its cause (``redis_health.classify_redis_failure``) and logged on change."""
    cause, _ = HEALTH.failed(*classify_redis_failure(exc), started=started)
    return RedisUnreachable(f"Redis {PHRASES[cause]} ({cause.value}) while {what}", cause.value)


def response_error(exc: redis.exceptions.ResponseError, what: str) -> StoredValueMalformed | RedisUnreachable:
    """What one error reply means; also for replies collected by ``pipeline.execute(raise_on_error=False)``."""
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return StoredValueMalformed(f"{what}: the stored value has the wrong Redis type")
    # redis-py parses MOVED/ASK into their own classes, whose text lacks the word.
    if isinstance(exc, redis.exceptions.MovedError | redis.exceptions.AskError) or text.startswith(("MOVED", "ASK")):
        HEALTH.failed(RedisCause.CLUSTER_MISCONFIGURED, "MOVED: the server is a Redis Cluster node")
        return RedisUnreachable(
            f"Redis is a cluster (set redis.cluster = true) while {what}", RedisCause.CLUSTER_MISCONFIGURED.value
        )
    if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        HEALTH.failed(RedisCause.AUTH_FAILED, text[:120])
        return RedisUnreachable(
            f"Redis {PHRASES[RedisCause.AUTH_FAILED]} (auth_failed) while {what}", RedisCause.AUTH_FAILED.value
        )
    return RedisUnreachable(f"Redis refused a command while {what}: {text[:120]}", "command_refused")
