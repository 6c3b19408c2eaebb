"""Running the application: event loop, access log, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.app import RedactingAccessLogger, create_app
from gateway.config import Settings

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


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; open streams get ``shutdown_grace_s`` to finish."""
    install_uvloop()
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        print=lambda text: log.info("%s", text.strip()),
        **runner_options(settings),  # type: ignore[arg-type]
    )
