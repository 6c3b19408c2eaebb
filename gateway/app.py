"""``create_app(settings)``: routes, middlewares and one cleanup context per external client.

Each shared resource lives under its own typed ``web.AppKey`` and is set by
the one cleanup context that creates and closes it (aiohttp's documented
pattern); handlers (``handlers.py``) read them and nothing else.
Request-level errors become JSON answers in ``error_middleware``; the errors
aiohttp answers itself (a request its parser rejects) in ``runner.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from google.cloud import bigquery

from gateway import auth, connections, handlers, metrics
from gateway.config import BigQuerySettings, Settings
from gateway.cors import CorsPolicy
from gateway.errors import RequestError, Unauthenticated
from gateway.lifecycle import Lifecycle
from gateway.limits import ProcessStreamCap, StreamSlots, retry_after_seconds
from gateway.live import JobNotes
from gateway.logs import install_redaction
from gateway.redis_client import build_redis_client
from gateway.redis_health import check_at_start_up
from gateway.resources import LIFECYCLE, NOTES, REDIS, SETTINGS, SLOTS, SOURCES, STREAM_CAP, VERIFIER
from gateway.sources.cache import BacktestCache
from gateway.sources.resolve import Sources, Warehoused
from gateway.sources.warehouse import Warehouse, make_client

log = logging.getLogger(__name__)

STREAM_ROUTE = "/api/sse/backtest/{id}/data/multi"

# Builds the BigQuery client; development swaps in one that suits the emulator.
BigQueryClientFactory = Callable[[BigQuerySettings], bigquery.Client]


def create_app(settings: Settings, *, bigquery_client: BigQueryClientFactory = make_client) -> web.Application:
    """The gateway application; tests build it the same way ``serve`` does.

    ``settings.redis.url`` must name a server: the embedded one of
    development is started by the command line, before the app.
    """
    install_redaction()  # aiohttp's parser errors quote raw requests: no token may reach a log
    cors = CorsPolicy(settings.server.cors_origins)
    app = web.Application(middlewares=[connections.responded_middleware, cors.middleware, error_middleware])
    if cors.origins:
        app.on_response_prepare.append(cors.on_response_prepare)
    app[SETTINGS] = settings
    app[LIFECYCLE] = Lifecycle()
    app[STREAM_CAP] = ProcessStreamCap(
        settings.server.max_streams_per_process, retry_after_seconds(settings.server.retry_ms)
    )
    app.cleanup_ctx.append(_redis_context)
    app.cleanup_ctx.append(_auth_context)
    app.cleanup_ctx.append(_sources_context(bigquery_client))
    app.on_shutdown.append(_drain)
    app.router.add_get(STREAM_ROUTE, handlers.stream_candles)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    return app


# -- cleanup contexts: create, yield, close ----------------------------------


async def _redis_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = build_redis_client(settings.redis)
    app[REDIS] = client
    app[SLOTS] = StreamSlots(
        client,
        settings.server.max_streams_per_user,
        settings.server.stream_slot_ttl_s,
        retry_after_seconds(settings.server.retry_ms),
    )
    app[NOTES] = notes = JobNotes(
        client,
        settings.follow.recheck_interval_s,
        settings.follow.max_reads_in_flight,
        settings.follow.status_min_interval_s,
    )
    metrics.watch_job_notes(notes)
    # The start-up check speaks first: it names what it found before any background call can fail.
    await check_at_start_up(client, settings.redis)
    app[SLOTS].start()
    try:
        yield
    finally:
        metrics.unwatch_job_notes(notes)
        await notes.aclose()
        await app[SLOTS].aclose()
        await client.aclose()


async def _auth_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS].auth
    timeout = aiohttp.ClientTimeout(total=settings.fetch_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[VERIFIER] = auth.token_verifier(settings, session)
        yield


def _sources_context(bigquery_client: BigQueryClientFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def sources_context(app: web.Application) -> AsyncIterator[None]:
        """Sources of running jobs, and of backtests when ``bigquery.project`` is set (SPEC 8, 9)."""
        settings = app[SETTINGS]
        client = app[REDIS]
        if not settings.bigquery.project:
            log.warning("bigquery.project is empty: bt_ streams end with connection_error")
            app[SOURCES] = Sources(client)
            yield
            return
        warehouse = Warehouse(settings.bigquery, bigquery_client(settings.bigquery))
        cache = BacktestCache(client, warehouse, settings.cache.ttl_s, settings.bigquery.page_rows)
        app[SOURCES] = Sources(client, Warehoused(warehouse, cache, settings.bigquery.page_rows))
        try:
            yield
        finally:
            await cache.aclose()
            warehouse.close()

    return sources_context


async def _drain(app: web.Application) -> None:
    """From shutdown on, new streams are refused; open ones get the grace period, then stop (lifecycle.py).

    ``serve`` drains before it closes the port; this covers runners that do not.
    """
    lifecycle = app[LIFECYCLE]
    lifecycle.draining = True
    if lifecycle.open_streams:
        await lifecycle.drain(app[SETTINGS].server.shutdown_grace_s)


# -- errors -------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer before a stream starts is the SPEC's JSON: ours, aiohttp's (404, 405) and the unexpected."""
    try:
        return await handler(request)
    except RequestError as exc:
        headers = {}
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = 'Bearer realm="candles"'
        elif exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
        metrics.request_refused(exc.status, exc.code, exc.message, getattr(exc, "reason", None))
        return error_response(exc.status, exc.code, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "invalid_request"), exc.reason, exc.headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        # A bug, not a condition we designed for: log it whole, answer without detail.
        log.exception("unexpected error before the stream started")
        return error_response(500, "internal", INTERNAL_ERROR_MESSAGE, {})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
#: A 500's message: the client gets no detail of a bug, the log gets all of it.
INTERNAL_ERROR_MESSAGE = "internal error; it has been logged"


def error_response(status: int, code: str, message: str, headers: Mapping[str, str]) -> web.Response:
    """The SPEC's error answer, ``{"error": code, "message": message}``; also the runner's (``runner.py``)."""
    headers = {name: value for name, value in headers.items() if name.lower() not in ("content-type", "content-length")}
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)
