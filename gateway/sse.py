"""The SSE response: aiohttp-sse's headers and stall handling, our framing and keep-alive.

aiohttp-sse gives us the mandatory headers (``text/event-stream``,
``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` so that nginx does not
buffer), chunked encoding, ``TCP_USER_TIMEOUT`` and the abort of a stalled
client. Two things differ from its defaults:

- events arrive as finished frames (``protocol.frame``), so ``send_frame``
  writes bytes instead of ``send``'s str with its per-line splitting;
- one heartbeat per process replaces both aiohttp-sse's per-stream ping task
  and a timeout around every write: every ``ping_interval / 4`` it looks at
  all open streams at once, sends ``: ping`` to those without a write for
  ``ping_interval`` seconds (SPEC 2), and cuts off a client whose pending
  write has not completed for ``send_timeout`` seconds. It counts writes
  instead of reading the clock per write, which matters on hosts where
  reading the clock is a system call (docs/PERFORMANCE.md). One sweep for all streams,
  instead of one timer per stream, is what lets ten thousand idle followers
  cost next to nothing: a stream's own task only waits for its end.
"""

from __future__ import annotations

import asyncio
import math
import weakref

from aiohttp_sse import EventSourceResponse

from gateway.protocol import PING

# Heartbeat ticks per ping interval (or send timeout): a ping goes out after
# between 1 and 1 + 1/TICKS intervals of silence.
_TICKS = 4


class _Heartbeat:
    """One task per event loop and tick length that looks after the keep-alive of every open stream."""

    def __init__(self, tick_s: float) -> None:
        self._tick_s = tick_s
        self._streams: set[CandleEventResponse] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, stream: CandleEventResponse) -> None:
        self._streams.add(stream)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sse-heartbeat")

    def discard(self, stream: CandleEventResponse) -> None:
        self._streams.discard(stream)

    async def _run(self) -> None:
        while self._streams:
            await asyncio.sleep(self._tick_s)
            for stream in list(self._streams):
                stream._beat()


_heartbeats: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Heartbeat]] = weakref.WeakKeyDictionary()


def _heartbeat(tick_s: float) -> _Heartbeat:
    per_loop = _heartbeats.setdefault(asyncio.get_running_loop(), {})
    if tick_s not in per_loop:
        per_loop[tick_s] = _Heartbeat(tick_s)
    return per_loop[tick_s]


class CandleEventResponse(EventSourceResponse):
    """An ``EventSourceResponse`` that writes pre-framed events, pings when idle, cuts off stalls."""

    _writes = 0  # completed writes, events and pings alike
    _write_pending = False
    _seen = 0  # writes at the last beat
    _quiet = 0  # beats without a write
    _stalled = 0  # beats with the same write pending
    _pinging = False
    _alive: asyncio.Future[None] | None = None
    _ping_write: asyncio.Task[None] | None = None  # kept referenced while it runs

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

    def _tick_s(self) -> float:
        return min(self._ping_interval, self._send_timeout or math.inf) / _TICKS

    async def _ping(self) -> None:
        # Overrides aiohttp-sse 3.0's per-stream ping loop (the version is
        # pinned): this task only waits for the stream's end, the process's
        # heartbeat does the work. stop_streaming() cancels it as before.
        heartbeat = _heartbeat(self._tick_s())
        self._alive = asyncio.get_running_loop().create_future()
        heartbeat.add(self)
        try:
            await self._alive
        finally:
            heartbeat.discard(self)

    def _beat(self) -> None:
        """One heartbeat tick for this stream: note progress, cut off a stall, ping when quiet."""
        tick = self._tick_s()
        ping_after = max(1, round(self._ping_interval / tick))
        stall_after = math.inf if self._send_timeout is None else max(1, round(self._send_timeout / tick))
        progressed, self._seen = self._writes != self._seen, self._writes
        self._quiet = 0 if progressed else self._quiet + 1
        self._stalled = self._stalled + 1 if self._write_pending and not progressed else 0
        if self._stalled >= stall_after:
            # A client that stopped reading: abort (it may reconnect and resume).
            self._abort_transport()
            self._end()
            return
        if self._quiet >= ping_after and not self._write_pending and not self._pinging:
            self._quiet = 0
            self._pinging = True
            self._ping_write = asyncio.get_running_loop().create_task(self._send_ping())

    async def _send_ping(self) -> None:
        try:
            async with asyncio.timeout(self._send_timeout):
                await self.write(PING)
        except TimeoutError:
            self._abort_transport()
            self._end()
            return
        except (ConnectionResetError, RuntimeError):
            self._end()  # RuntimeError: writing after EOF
            return
        finally:
            self._pinging = False
        self._writes += 1
        self._seen = self._writes

    def _end(self) -> None:
        """The keep-alive is over (as when aiohttp-sse's ping task returns)."""
        if self._alive is not None and not self._alive.done():
            self._alive.set_result(None)
