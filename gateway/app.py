"""``create_app(settings)``: routes, middlewares and one cleanup context per external client.

The data path of a request reads top to bottom in ``stream_candles``:
validated parameters -> resume position -> authenticated user -> stream slot
-> source for the id -> snapshot -> events -> bytes. Request-level errors
become JSON answers in ``error_middleware``; stream-level ones become
``error`` events in ``stream.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import auth
from gateway.config import Settings
from gateway.errors import (
    RedisUnreachable,
    RequestError,
    StreamError,
    TooManyStreams,
    Unauthenticated,
    Unavailable,
)
from gateway.limits import StreamSlots, retry_after_seconds
from gateway.live import JobNotes
from gateway.params import StreamRequest, parse_stream_request
from gateway.position import StreamPosition, decode_position
from gateway.sources.base import JobInfo, Snapshot, Source
from gateway.sources.cache import BacktestCache
from gateway.sources.redis_jobs import not_found
from gateway.sources.resolve import Sources
from gateway.sources.warehouse import Warehouse
from gateway.sse import CandleEventResponse
from gateway.stream import CandleStream, read_plan, send_fatal

log = logging.getLogger(__name__)

STREAM_ROUTE = "/api/sse/backtest/{id}/data/multi"


@dataclass
class Gateway:
    """What the handlers share: built by the cleanup contexts, read by requests."""

    settings: Settings
    redis: aioredis.Redis | None = None
    verifier: auth.TokenVerifier | None = None
    slots: StreamSlots | None = None
    sources: Sources | None = None
    notes: JobNotes | None = None
    draining: bool = False


GATEWAY = web.AppKey("gateway", Gateway)


def create_app(settings: Settings) -> web.Application:
    """The gateway application; tests build it the same way ``serve`` does."""
    app = web.Application(middlewares=[error_middleware])
    gateway = Gateway(settings=settings)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_redis_context)
    app.cleanup_ctx.append(_auth_context)
    app.cleanup_ctx.append(_warehouse_context)
    app.on_shutdown.append(_drain)
    app.router.add_get(STREAM_ROUTE, stream_candles)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


# -- cleanup contexts: create, yield, close ----------------------------------


async def _redis_context(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    settings = gateway.settings.redis
    embedded = None
    url = settings.url
    if not url:
        from gateway.devtools.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis()
        url = await asyncio.get_running_loop().run_in_executor(None, embedded.start)
    gateway.redis = connect_redis(url, gateway.settings)
    gateway.slots = StreamSlots(
        gateway.redis,
        gateway.settings.server.max_streams_per_user,
        gateway.settings.server.stream_slot_ttl_s,
        retry_after_seconds(gateway.settings.server.retry_ms),
    )
    gateway.sources = Sources(gateway.redis)
    gateway.notes = JobNotes(gateway.redis, gateway.settings.follow.recheck_interval_s)
    try:
        yield
    finally:
        await gateway.notes.aclose()
        await gateway.redis.aclose()
        if embedded is not None:
            await asyncio.get_running_loop().run_in_executor(None, embedded.stop)


def connect_redis(url: str, settings: Settings) -> aioredis.Redis:
    """A client on a blocking pool: when every connection is busy, wait rather than fail."""
    redis_settings = settings.redis
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=redis_settings.max_connections,
        timeout=redis_settings.pool_timeout_s,
        socket_timeout=redis_settings.socket_timeout_s,
        socket_connect_timeout=redis_settings.connect_timeout_s,
        # No health-check PING (and no clock read) before commands: a dead
        # pooled connection fails its command, which the retry policy repeats
        # on a fresh connection.
        health_check_interval=0,
    )
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), redis_settings.retries)
    return aioredis.Redis(connection_pool=pool, retry=retry)


async def _auth_context(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    timeout = aiohttp.ClientTimeout(total=gateway.settings.auth.fetch_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        gateway.verifier = auth.token_verifier(gateway.settings.auth, session)
        yield


async def _warehouse_context(app: web.Application) -> AsyncIterator[None]:
    """BigQuery and its Redis cache, when ``bigquery.project`` is set (SPEC 8, 9)."""
    gateway = app[GATEWAY]
    settings = gateway.settings.bigquery
    if not settings.project:
        log.warning("bigquery.project is empty: bt_ streams end with connection_error")
        yield
        return
    assert gateway.redis is not None
    warehouse = Warehouse(settings)
    cache = BacktestCache(gateway.redis, warehouse, gateway.settings.cache.ttl_s, settings.page_rows)
    gateway.sources = Sources(gateway.redis, warehouse, cache, settings.page_rows)
    try:
        yield
    finally:
        await cache.aclose()
        warehouse.close()


async def _drain(app: web.Application) -> None:
    """From shutdown on, new streams get 503; open ones get the grace period, then close."""
    app[GATEWAY].draining = True


# -- errors -------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        headers = {}
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = 'Bearer realm="candles"'
        elif isinstance(exc, TooManyStreams):
            headers["Retry-After"] = str(exc.retry_after_s)
        return web.json_response({"error": exc.code, "message": exc.message}, status=exc.status, headers=headers)


# -- handlers -------------------------------------------------------------------


async def stream_candles(request: web.Request) -> web.StreamResponse:
    """``GET /api/sse/backtest/{id}/data/multi``: the candle stream (SPEC 2)."""
    gateway = request.app[GATEWAY]
    if gateway.draining:
        raise Unavailable("this replica is shutting down; reconnect to another")
    params = parse_stream_request(request.match_info["id"], request.query, request.headers)
    position = decode_position(params.last_event_id, params) if params.last_event_id else None
    if params.token is None:
        raise Unauthenticated("no token: send 'Authorization: Bearer <token>' or the token parameter")
    assert gateway.verifier is not None and gateway.slots is not None and gateway.sources is not None
    user = await gateway.verifier.verify(params.token)
    if position is not None and position.finished:
        # 204 tells EventSource to stop reconnecting (HTML standard).
        return web.Response(status=204)

    async with gateway.slots.hold(user.uid):
        source = gateway.sources.open(params)
        try:
            snapshot: Snapshot | None = None
            failure: StreamError | None = None
            try:
                snapshot = await source.snapshot(params.intervals, read_plan(params, position))
            except RedisUnreachable as exc:
                raise Unavailable(exc.message) from exc
            except StreamError as exc:
                failure = exc
            if snapshot is not None and not _may_read(user, snapshot.job):
                snapshot, failure = None, not_found(params.id)
            return await _respond(request, gateway, params, position, source, snapshot, failure)
        finally:
            await source.aclose()


async def _respond(
    request: web.Request,
    gateway: Gateway,
    params: StreamRequest,
    position: StreamPosition | None,
    source: Source,
    snapshot: Snapshot | None,
    failure: StreamError | None,
) -> web.StreamResponse:
    server = gateway.settings.server
    response = CandleEventResponse(ping_interval=server.ping_interval_s, send_timeout=server.send_timeout_s)
    await response.prepare(request)
    if position is None:
        is_partial = snapshot is not None and snapshot.job.state.is_active
        position = StreamPosition.start(params, is_partial=is_partial)
    try:
        if snapshot is None:
            assert failure is not None
            await send_fatal(failure, params, position, response.send_frame, retry_ms=server.retry_ms)
        else:
            async with contextlib.AsyncExitStack() as stack:
                live = None
                if params.follow and position.is_partial and snapshot.job.job_id is not None:
                    assert gateway.notes is not None
                    live = await stack.enter_async_context(gateway.notes.follow(snapshot.job.job_id))
                stream = CandleStream(
                    params,
                    snapshot,
                    source,
                    position,
                    response.send_frame,
                    retry_ms=server.retry_ms,
                    live=live,
                    status_min_interval_s=gateway.settings.follow.status_min_interval_s,
                )
                await stream.run()
        await response.write_eof()
    except (ConnectionResetError, TimeoutError):
        # The client went away or stopped reading; it may reconnect and resume.
        log.info("stream of %s ended early: client gone or too slow", params.id)
    finally:
        response.stop_streaming()
        with contextlib.suppress(asyncio.CancelledError):
            await response.wait()
    return response


def _may_read(user: auth.User, job: JobInfo) -> bool:
    """Owners read their jobs, admins read all; anyone else sees job_not_found."""
    return user.is_admin or (bool(job.user_id) and job.user_id == user.uid)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining and Redis answers."""
    gateway = request.app[GATEWAY]
    if gateway.draining:
        raise Unavailable("draining for shutdown")
    assert gateway.redis is not None
    try:
        await gateway.redis.ping()
    except Exception as exc:
        raise Unavailable("Redis unreachable") from exc
    return web.json_response({"status": "ready"})


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines without the query string: it may carry a token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
