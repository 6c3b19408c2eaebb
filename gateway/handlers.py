"""The HTTP handlers: the candle stream, liveness and readiness.

The data path of a stream reads top to bottom in ``stream_candles``:
validated parameters -> resume position -> authenticated user -> stream slot
-> source, described, authorized, opened -> events -> bytes. Request-level
errors are raised as ``RequestError`` (``app.error_middleware`` answers
them); stream-level ones become ``error`` events in ``stream.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from aiohttp import HttpVersion11, hdrs, web

from gateway import metrics
from gateway.broadcast import Seat
from gateway.config import Settings
from gateway.errors import RedisUnreachable, StreamError, Unauthenticated, Unavailable
from gateway.follow import LiveTail
from gateway.lifecycle import Lifecycle, StreamStopped
from gateway.limits import RECONNECT_PATIENCE_S, retry_after_seconds
from gateway.live import Follower
from gateway.observe import StreamWatch
from gateway.params import StreamRequest, parse_stream_request
from gateway.position import StreamPosition, decode_position
from gateway.redis_client import call_redis
from gateway.redis_health import HEALTH, LASTING_CAUSES, RedisCause
from gateway.resources import LIFECYCLE, NOTES, REDIS, SETTINGS, SLOTS, SOURCES, STREAM_CAP, VERIFIER
from gateway.sources import warehouse_usage
from gateway.sources.base import Snapshot, Source
from gateway.sse import CandleEventResponse
from gateway.stream import CandleStream, Send, read_plan, send_start_error

log = logging.getLogger(__name__)

T = TypeVar("T")
_OUTAGE_FIRST_PAUSE_S = 0.1
_OUTAGE_LONGEST_PAUSE_S = 1.0
# Readiness answers within this, whatever Redis does (kubelet's default probe timeout is 1 s; ours 2 s).
READINESS_TIMEOUT_S = 1.5


async def stream_candles(request: web.Request) -> web.StreamResponse:
    """``GET /api/sse/backtest/{id}/data/multi``: the candle stream (SPEC 2)."""
    request_started = time.perf_counter()
    # What the warehouse does because of this stream, for its log line (observe.py).
    warehouse_usage.track()
    app = request.app
    if app[LIFECYCLE].draining:
        raise Unavailable("this replica is shutting down; reconnect to another")
    with app[STREAM_CAP].admit():
        return await _admitted(request, request_started)


async def _admitted(request: web.Request, request_started: float) -> web.StreamResponse:
    """The stream, once this process took it on (``server.max_streams_per_process``)."""
    app = request.app
    settings = app[SETTINGS]
    lifecycle = app[LIFECYCLE]
    params = parse_stream_request(request.match_info["id"], request.query, request.headers)
    position = decode_position(params.last_event_id, params) if params.last_event_id else None
    if params.token is None:
        raise Unauthenticated("no token: send 'Authorization: Bearer <token>' or the token parameter")
    user = await app[VERIFIER].verify(params.token)
    if position is not None and position.finished:
        # 204 tells EventSource to stop reconnecting (HTML standard).
        return web.Response(status=204)

    slots = app[SLOTS]
    hold = OutageHold(settings, lifecycle)
    # A reconnect waits a little for the slot of the stream it continues (its
    # replica died, or its release is on its way after a Redis restart).
    patience_s = RECONNECT_PATIENCE_S if params.last_event_id else 0.0
    slot = await hold.ride_out(lambda: slots.acquire(user.uid, patience_s))
    try:
        # A follow stream of a job whose notes this process already hears
        # registers before the job is read: every change written after that
        # read wakes it, so after its snapshot it waits instead of looking.
        # (In memory only: nothing is asked of Redis before authorization.)
        notes = app[NOTES]
        early = notes.follow(params.id) if params.follow and notes.hears(params.id) else contextlib.nullcontext()
        async with early as feed:
            source: Source | None = None
            snapshot: Snapshot | None = None
            failure: StreamError | None = None
            try:
                plan = read_plan(params, position)
                source, snapshot = await hold.ride_out(lambda: app[SOURCES].open_for(user, params, plan))
            except StreamError as exc:
                failure = exc
            try:
                return await _respond(
                    request, settings, params, position, source, snapshot, failure, user.uid, request_started, feed
                )
            finally:
                if source is not None:
                    await source.aclose()
    finally:
        slots.release(slot)


class OutageHold:
    """One request's bounded wait for Redis: its steps retried while Redis is unreachable, until the deadline.

    A reconnecting EventSource stops for good on a 503, so a Redis restart is
    better ridden out inside the request than answered at once; past
    ``redis.outage_wait_s`` the answer is a 503 with ``Retry-After`` for the
    clients that can use it. The deadline is the request's, set by its first
    step and shared by the next, and it cuts a step short: a Redis that hangs
    (stopped, or a route that drops every packet) would otherwise hold the
    request for redis-py's socket timeout times its attempts. 0 tries once.
    A cause that waiting cannot mend (a refused password or certificate, a
    cluster setting: ``LASTING_CAUSES``) is answered at once.
    """

    def __init__(self, settings: Settings, lifecycle: Lifecycle) -> None:
        self._wait_s = settings.redis.outage_wait_s
        self._retry_after_s = retry_after_seconds(settings.server.retry_ms)
        self._lifecycle = lifecycle
        self._deadline: float | None = None

    async def ride_out(self, step: Callable[[], Awaitable[T]]) -> T:
        """``step()``, tried again while Redis is unreachable; ``Unavailable`` past the deadline."""
        if not self._wait_s:
            try:
                return await step()
            except RedisUnreachable as exc:
                raise self._unavailable(exc) from exc
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self._wait_s
        last: RedisUnreachable | str = f"Redis did not answer within redis.outage_wait_s ({self._wait_s:g} s)"
        pause = _OUTAGE_FIRST_PAUSE_S
        try:
            async with asyncio.timeout_at(self._deadline):
                while True:
                    try:
                        return await step()
                    except RedisUnreachable as exc:
                        if self._lifecycle.draining or exc.cause in LASTING_CAUSES:
                            raise self._unavailable(exc) from exc
                        last = exc
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _OUTAGE_LONGEST_PAUSE_S)
        except TimeoutError:
            if isinstance(last, RedisUnreachable):
                raise self._unavailable(last) from None
            raise Unavailable(last, self._retry_after_s, reason="redis_timeout") from None

    def _unavailable(self, exc: RedisUnreachable) -> Unavailable:
        return Unavailable(exc.message, self._retry_after_s, reason=f"redis_{exc.cause}")


async def _respond(
    request: web.Request,
    settings: Settings,
    params: StreamRequest,
    position: StreamPosition | None,
    source: Source | None,
    snapshot: Snapshot | None,
    failure: StreamError | None,
    user_id: str,
    request_started: float,
    feed: Follower | None,
) -> web.StreamResponse:
    server = settings.server
    response = CandleEventResponse(ping_interval=server.ping_interval_s, send_timeout=server.send_timeout_s)
    if request.version < HttpVersion11:
        # HTTP/1.0 has no chunked framing: the stream's end is the connection's (aiohttp-sse says keep-alive).
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"
    await response.prepare(request)
    if position is None:
        is_partial = snapshot is not None and snapshot.job.state.is_active
        position = StreamPosition.start(params, is_partial=is_partial)
    follow = params.follow and position.is_partial and snapshot is not None and snapshot.job.job_id is not None
    # Operations (observe.py, lifecycle.py): every event goes through watch.send, which
    # counts it and stops the stream after it when the replica drains; one line per stream.
    with request.app[LIFECYCLE].stream() as entry:
        watch = StreamWatch(
            params,
            position,
            user_id=user_id,
            client=request.remote,
            follow=follow,
            request_started=request_started,
            entry=entry,
        )
        send = watch.bind(response.send_frame)
        outcome = "client_gone"
        try:
            if source is None or snapshot is None:
                assert failure is not None
                body = send_start_error(failure, params, position, send, retry_ms=server.jittered_retry_ms())
            else:
                seat = Seat(response, watch)
                body = _run_stream(request, settings, params, position, source, snapshot, send, seat, feed)
            entry.body = asyncio.ensure_future(body)
            try:
                await entry.body
                outcome = watch.outcome_of_return()
            except (StreamStopped, asyncio.CancelledError):
                if not entry.stop_requested or (task := asyncio.current_task()) is None or task.cancelling():
                    raise  # the handler itself was cancelled: the client went away
                outcome = "drained"
            await response.write_eof()
        except (ConnectionResetError, TimeoutError):
            # The client went away or stopped reading; it may reconnect and resume.
            outcome = "cut_slow_client" if response.cut_off else "client_gone"
        except asyncio.CancelledError:
            outcome = "cut_slow_client" if response.cut_off else "drained" if entry.stop_requested else "client_gone"
            raise
        finally:
            watch.end(outcome)
            response.stop_streaming()
            with contextlib.suppress(asyncio.CancelledError):
                await response.wait()
    return response


async def _run_stream(
    request: web.Request,
    settings: Settings,
    params: StreamRequest,
    position: StreamPosition,
    source: Source,
    snapshot: Snapshot,
    send: Send,
    seat: Seat,
    registered: Follower | None,
) -> None:
    """The stream's events; a follow stream with ``registered`` heard its job's notes since before its read."""
    stream = CandleStream(params, snapshot, source, position, send, retry_ms=settings.server.jittered_retry_ms())
    job_id = snapshot.job.job_id
    if not (params.follow and position.is_partial and job_id is not None):
        await stream.run()
        return
    # A registration made before the read is of this very job: a running job keeps its request's id.
    registration = request.app[NOTES].follow(job_id) if registered is None else contextlib.nullcontext(registered)
    async with registration as feed:
        tail = LiveTail(stream, source, feed, status_min_interval_s=settings.follow.status_min_interval_s, seat=seat)
        metrics.FOLLOWERS.inc()
        try:
            await stream.run(live_tail=partial(tail.run, caught_up=registered is not None))
        finally:
            metrics.FOLLOWERS.dec()


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining and Redis answers; a 503's body names Redis's failure by cause.

    The body carries the cause's word (``"redis": "auth_failed"``), not the
    detail (host, port, certificate): this port is public. The detail is in
    the log, once per change of state (redis_health.py).
    """
    if request.app[LIFECYCLE].draining:
        raise Unavailable("draining for shutdown")
    client = request.app[REDIS]
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            await call_redis(client.ping, "checking readiness")
        if HEALTH.cause is RedisCause.CLUSTER_MISCONFIGURED:
            # PING answers on any node; the keys of other nodes' slots would not (MOVED).
            raise RedisUnreachable(
                "Redis is a cluster (set redis.cluster = true) while checking readiness", HEALTH.cause.value
            )
    except RedisUnreachable as exc:
        return _not_ready(exc.message, exc.cause)
    except TimeoutError:
        return _not_ready(f"Redis did not answer the readiness check within {READINESS_TIMEOUT_S:g} s", "timeout")
    return web.json_response({"status": "ready", "redis": "ok"})


def _not_ready(message: str, cause: str) -> web.Response:
    metrics.request_refused(503, Unavailable.code, message, f"redis_{cause}")
    body = {"error": Unavailable.code, "message": message, "redis": cause}
    return web.json_response(body, status=503, headers={"Retry-After": "1"})
