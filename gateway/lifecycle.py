"""The replica's own state that handlers consult: whether it is draining, and which streams are open.

Shutdown (``drain``), in phases, each logged in one line:

1. draining: readiness answers 503 at once and every new stream gets 503
   ``unavailable`` with ``Retry-After`` (nginx's ``proxy_next_upstream
   http_503`` retries it on another replica); the port stays open meanwhile.
2. open streams get ``server.shutdown_grace_s`` to end by themselves;
3. the rest are stopped at an event boundary: a stream that is writing
   finishes its event and stops before the next one, one that is waiting
   (for a read, for a follow note) stops at once. Each client gets a clean
   end of the stream without ``all_complete``, reconnects with its last
   event id and resumes on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Final

log = logging.getLogger(__name__)

# After the stop, how long a stream may take to finish the event it is writing
# (a client that does not read is cut off by the send timeout anyway).
STOP_WAIT_S: Final = 1.0


class StreamStopped(Exception):
    """Raised in a stream's task after the event it was writing: the replica is draining."""


class OpenStream:
    """One open stream as the lifecycle sees it: its task, and whether it is mid-event."""

    __slots__ = ("body", "stop_requested", "writing")

    def __init__(self) -> None:
        self.body: asyncio.Task[None] | None = None
        self.writing = False
        self.stop_requested = False

    def stop(self) -> None:
        """End the stream at the next event boundary."""
        self.stop_requested = True
        if not self.writing and self.body is not None:
            self.body.cancel()

    def check(self) -> None:
        """Called after each event: raise ``StreamStopped`` if a stop was asked for."""
        if self.stop_requested:
            raise StreamStopped


class Lifecycle:
    """Set at shutdown; read by every new request and by readiness."""

    def __init__(self) -> None:
        self.draining = False
        self._streams: set[OpenStream] = set()
        self._none_open: asyncio.Event | None = None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @contextlib.contextmanager
    def stream(self) -> Iterator[OpenStream]:
        """Track one stream for the body's duration."""
        entry = OpenStream()
        self._streams.add(entry)
        try:
            yield entry
        finally:
            self._streams.discard(entry)
            if not self._streams and self._none_open is not None:
                self._none_open.set()

    async def drain(self, grace_s: float) -> None:
        """Refuse new streams, give open ones ``grace_s`` to end, stop the rest at an event boundary."""
        first_call = not self.draining
        self.draining = True
        if first_call:
            log.info(
                "draining: readiness and new streams answer 503; %d open streams have %.1f s to end",
                len(self._streams),
                grace_s,
            )
        if not self._streams:
            return
        started = time.monotonic()
        await self._wait_until_none_open(grace_s)
        if self._streams:
            log.info("grace period over: stopping %d open streams at an event boundary", len(self._streams))
            for entry in list(self._streams):
                entry.stop()
            await self._wait_until_none_open(STOP_WAIT_S)
        if self._streams:
            log.warning("%d streams did not stop in time; closing them", len(self._streams))
            for entry in list(self._streams):
                if entry.body is not None:
                    entry.body.cancel()
            await self._wait_until_none_open(STOP_WAIT_S)
        log.info("drained in %.2f s", time.monotonic() - started)

    async def _wait_until_none_open(self, timeout_s: float) -> None:
        self._none_open = asyncio.Event()
        if not self._streams:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), timeout_s)
