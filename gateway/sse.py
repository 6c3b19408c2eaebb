"""The SSE response: aiohttp-sse's headers and stall handling, our framing and keep-alive.

aiohttp-sse gives us the mandatory headers (``text/event-stream``,
``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` so that nginx does not
buffer), chunked encoding, ``TCP_USER_TIMEOUT`` and the abort of a stalled
client. Two things differ from its defaults:

- events arrive as finished frames (``protocol.frame``), so ``send_frame``
  writes bytes instead of ``send``'s str with its per-line splitting;
- one heartbeat task per stream replaces both aiohttp-sse's fixed-period
  ping and a timeout around every write: it sends ``: ping`` only after
  ``ping_interval`` seconds without a write (SPEC 2), and cuts off a client
  whose pending write has not completed for ``send_timeout`` seconds. It
  counts writes instead of reading the clock per write, which matters on
  hosts where reading the clock is a system call (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import math

from aiohttp_sse import EventSourceResponse

from gateway.protocol import PING

# Heartbeat ticks per ping interval (or send timeout): a ping goes out after
# between 1 and 1 + 1/TICKS intervals of silence.
_TICKS = 4


class CandleEventResponse(EventSourceResponse):
    """An ``EventSourceResponse`` that writes pre-framed events, pings when idle, cuts off stalls."""

    _writes = 0  # completed writes, events and pings alike
    _write_pending = False
    cut_off = False  # set when the heartbeat cut off a client that stopped reading (for the stream's outcome)

    def _abort_transport(self) -> None:
        self.cut_off = True
        super()._abort_transport()

    async def send_frame(self, frame: bytes) -> None:
        """Write one framed event; the heartbeat aborts it if the client stops reading."""
        self._write_pending = True
        try:
            await self.write(frame)
        except ConnectionResetError:
            self.stop_streaming()
            raise
        finally:
            self._write_pending = False
        self._writes += 1

    async def _ping(self) -> None:
        # Overrides aiohttp-sse 3.0's fixed-period ping (the version is pinned).
        tick = min(self._ping_interval, self._send_timeout or math.inf) / _TICKS
        ping_after = max(1, round(self._ping_interval / tick))
        stall_after = math.inf if self._send_timeout is None else max(1, round(self._send_timeout / tick))
        quiet = stalled = 0
        seen = self._writes
        while True:
            await asyncio.sleep(tick)
            progressed, seen = self._writes != seen, self._writes
            quiet = 0 if progressed else quiet + 1
            stalled = stalled + 1 if self._write_pending and not progressed else 0
            if stalled >= stall_after:
                # A client that stopped reading: abort (it may reconnect and resume).
                self._abort_transport()
                return
            if quiet >= ping_after and not self._write_pending:
                quiet = 0
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await self.write(PING)
                except TimeoutError:
                    self._abort_transport()
                    return
                except (ConnectionResetError, RuntimeError):
                    return  # RuntimeError: writing after EOF
                self._writes += 1
                seen = self._writes
