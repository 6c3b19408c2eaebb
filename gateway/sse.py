"""The SSE response: aiohttp-sse's headers and stall handling, our framing and keep-alive.

aiohttp-sse gives us the mandatory headers (``text/event-stream``,
``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` so that nginx does not
buffer), chunked encoding, ``TCP_USER_TIMEOUT`` and the abort of a stalled
client. Two things differ from its defaults:

- events arrive as finished frames (``protocol.frame``), so ``send_frame``
  writes bytes instead of ``send``'s str with its per-line splitting;
- the ``: ping`` comment is sent only after ``ping_interval`` seconds without
  any write (SPEC 2), not on a fixed timer in the middle of a busy stream.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp_sse import EventSourceResponse

from gateway.protocol import PING


class CandleEventResponse(EventSourceResponse):
    """An ``EventSourceResponse`` that writes pre-framed events and pings only when idle."""

    _last_write_at = 0.0

    async def send_frame(self, frame: bytes) -> None:
        """Write one framed event; a client that does not take it in time is cut off."""
        try:
            async with asyncio.timeout(self._send_timeout):
                await self.write(frame)
        except ConnectionResetError:
            self.stop_streaming()
            raise
        except TimeoutError:
            self.stop_streaming()
            self._abort_transport()
            raise
        self._last_write_at = time.monotonic()

    async def _ping(self) -> None:
        # Overrides aiohttp-sse 3.0's fixed-period ping (the version is pinned);
        # the error handling mirrors it.
        self._last_write_at = time.monotonic()
        while True:
            idle_for = time.monotonic() - self._last_write_at
            if idle_for < self._ping_interval:
                await asyncio.sleep(self._ping_interval - idle_for)
                continue
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.write(PING)
            except TimeoutError:
                self._abort_transport()
                break
            except (ConnectionResetError, RuntimeError):
                # RuntimeError: writing after EOF.
                break
            self._last_write_at = time.monotonic()
