"""Running the application: event loop, access log, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiohttp import web

from gateway.access_log import RedactingAccessLogger
from gateway.app import create_app
from gateway.config import Settings, with_overrides

log = logging.getLogger(__name__)


def install_uvloop() -> None:
    """uvloop where available: measurably cheaper socket writes (docs/PERFORMANCE.md)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - it is a declared dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def runner_options(settings: Settings) -> dict[str, object]:
    """Options shared by ``serve`` and the dev server."""
    return {
        "access_log_class": RedactingAccessLogger,
        "access_log": logging.getLogger("gateway.access") if settings.server.access_log else None,
        # A client that goes away cancels its handler at once: no work, task or
        # connection outlives the stream.
        "handler_cancellation": True,
        "shutdown_timeout": settings.server.shutdown_grace_s,
    }


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[Settings]:
    """``settings`` with a Redis to talk to: the configured one, or (empty ``redis.url``) an embedded one."""
    if settings.redis.url:
        yield settings
        return
    # Development only: the embedded server's package is not a production requirement.
    from gateway.devtools.embedded_redis import EmbeddedRedis

    embedded = EmbeddedRedis()
    url = embedded.start()
    try:
        yield with_overrides(settings, redis={"url": url})
    finally:
        embedded.stop()


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; open streams get ``shutdown_grace_s`` to finish."""
    install_uvloop()
    with redis_for(settings) as ready:
        web.run_app(
            create_app(ready),
            host=ready.server.host,
            port=ready.server.port,
            print=lambda text: log.info("%s", text.strip()),
            **runner_options(ready),  # type: ignore[arg-type]
        )
