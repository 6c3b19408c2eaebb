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

from aiohttp import hdrs, web

from gateway import metrics
from gateway.broadcast import Seat
from gateway.compression import Codec, encoder_for, negotiate, parse_codecs
from gateway.config import Settings
from gateway.errors import RedisUnreachable, StreamError, Unauthenticated, Unavailable
from gateway.follow import LiveTail
from gateway.lifecycle import Lifecycle, StreamStopped
from gateway.limits import retry_after_seconds
from gateway.live import Follower
from gateway.observe import StreamWatch
from gateway.params import StreamRequest, parse_stream_request
from gateway.position import StreamPosition, decode_position
from gateway.redis_client import call_redis
from gateway.resources import LIFECYCLE, NOTES, REDIS, SETTINGS, SLOTS, SOURCES, VERIFIER
from gateway.sources.base import Snapshot, Source
from gateway.sse import CandleEventResponse
from gateway.stream import CandleStream, Send, read_plan, send_start_error

log = logging.getLogger(__name__)

T = TypeVar("T")
_OUTAGE_FIRST_PAUSE_S = 0.1
_OUTAGE_LONGEST_PAUSE_S = 1.0


async def stream_candles(request: web.Request) -> web.StreamResponse:
    """``GET /api/sse/backtest/{id}/data/multi``: the candle stream (SPEC 2)."""
    request_started = time.perf_counter()
    app = request.app
    settings = app[SETTINGS]
    lifecycle = app[LIFECYCLE]
    if lifecycle.draining:
        raise Unavailable("this replica is shutting down; reconnect to another")
    params = parse_stream_request(request.match_info["id"], request.query, request.headers)
    position = decode_position(params.last_event_id, params) if params.last_event_id else None
    if params.token is None:
        raise Unauthenticated("no token: send 'Authorization: Bearer <token>' or the token parameter")
    user = await app[VERIFIER].verify(params.token)
    if position is not None and position.finished:
        # 204 tells EventSource to stop reconnecting (HTML standard).
        return web.Response(status=204)

    slots = app[SLOTS]
    slot = await _riding_out_outage(lambda: slots.acquire(user.uid), settings, lifecycle)
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
                source, snapshot = await _riding_out_outage(
                    lambda: app[SOURCES].open_for(user, params, plan), settings, lifecycle
                )
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


async def _riding_out_outage(step: Callable[[], Awaitable[T]], settings: Settings, lifecycle: Lifecycle) -> T:
    """``step()``, tried again while Redis is unreachable, for up to ``redis.outage_wait_s``.

    A reconnecting EventSource stops for good on a 503, so a Redis restart is
    better ridden out inside the request than answered at once; past the
    bounded wait the answer is a 503 with ``Retry-After`` for the clients
    that can use it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.redis.outage_wait_s
    pause = _OUTAGE_FIRST_PAUSE_S
    while True:
        try:
            return await step()
        except RedisUnreachable as exc:
            if lifecycle.draining or loop.time() + pause > deadline:
                raise Unavailable(exc.message, retry_after_s=retry_after_seconds(settings.server.retry_ms)) from exc
        await asyncio.sleep(pause)
        pause = min(pause * 2, _OUTAGE_LONGEST_PAUSE_S)


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
    codec = negotiate(request.headers.get(hdrs.ACCEPT_ENCODING), parse_codecs(settings.compression.codecs))
    response.headers[hdrs.VARY] = hdrs.ACCEPT_ENCODING
    if codec is not Codec.IDENTITY:
        response.headers[hdrs.CONTENT_ENCODING] = codec.value
        response.encoder = encoder_for(codec)
    metrics.STREAM_ENCODINGS.labels(codec.value).inc()
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
    """Readiness: not draining and Redis answers."""
    if request.app[LIFECYCLE].draining:
        raise Unavailable("draining for shutdown")
    client = request.app[REDIS]
    try:
        await call_redis(client.ping, "checking readiness")
    except RedisUnreachable as exc:
        raise Unavailable(exc.message) from exc
    return web.json_response({"status": "ready"})
