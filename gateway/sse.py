"""The SSE response: aiohttp-sse's headers and stall handling, our framing and keep-alive.

aiohttp-sse gives us the mandatory headers (``text/event-stream``,
``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` so that nginx does not
buffer), chunked encoding, ``TCP_USER_TIMEOUT`` and the abort of a stalled
client. Three things differ from its defaults:

- events arrive as finished frames (``protocol.frame``), so ``send_frame``
  writes bytes instead of ``send``'s str with its per-line splitting;
- the headers go out with the first event, and the small events a stream
  hands over within one turn of the event loop (a short chunk, its
  ``interval_complete``, the next ``interval_start``...) leave in one
  socket write at the end of that turn, not one each: a write is a system
  call, and a new follow stream used to make four (docs/PERFORMANCE.md);
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
import enum
import math
import weakref
from collections.abc import Sequence
from typing import Final

from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from gateway.protocol import PING

# Heartbeat ticks per ping interval (or send timeout): a ping goes out after
# between 1 and 1 + 1/TICKS intervals of silence.
_TICKS = 4
# A stream written to directly (DirectWire) with more than this waiting in its
# socket's buffer has fallen behind: aiohttp's own write waits for a drain there.
DIRECT_BUFFER_LIMIT: Final = 64 * 1024
# Frames handed over in one loop turn wait for the turn's end only while they are
# small: a chunk this big goes at once (a stream whose next chunk is read ahead
# would otherwise hold it back while it validates that one), and a system call
# is little next to its bytes.
_FLUSH_AT: Final = 16 * 1024


class Delivery(enum.IntEnum):
    """What became of a direct write."""

    SENT = 0
    BEHIND = 1  # written, but the client is not keeping up: stop writing directly, wait for a drain
    GONE = 2  # not written: the connection is closing


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

    # aiohttp writes a StreamResponse's headers at prepare() unless told to hold
    # them for the first body write: one system call fewer per stream.
    _send_headers_immediately = False

    _writes = 0  # completed writes, events and pings alike
    # Frames handed over in this turn of the loop, written together at its end (``_flush``).
    _pending: list[bytes] | None = None
    _pending_size = 0
    _wire: DirectWire | None = None  # how ``_flush`` writes, once the headers are out
    _gone = False  # a flush found the connection closing
    _behind = False  # a flush left more than DIRECT_BUFFER_LIMIT in the socket's buffer
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
        """Hand over one framed event: written at the end of this loop turn with the turn's others, or now if big.

        The first one goes through aiohttp at once (it carries the headers).
        A client that does not keep up is waited for here, as aiohttp's own
        write would (the heartbeat aborts a stall), so memory stays bounded.
        """
        if self._gone:
            self.stop_streaming()
            raise ConnectionResetError("the client's connection closed")
        if self._wire is None:
            await self._write_now(frame)
            self._wire = self.direct_wire()  # None (compression, closing): every frame at once, as aiohttp writes
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = []
            asyncio.get_running_loop().call_soon(self._flush)
        pending.append(frame)
        self._pending_size += len(frame)
        if self._pending_size >= _FLUSH_AT:
            self._flush()
        if self._behind:
            self._behind = False
            await self.wait_until_drained()

    async def _write_now(self, frame: bytes) -> None:
        self._write_pending = True
        try:
            await self.write(frame)
        except ConnectionResetError:
            self.stop_streaming()
            raise
        finally:
            self._write_pending = False
        self._writes += 1

    def _flush(self) -> None:
        """Write the frames handed over since the last flush, as one chunk."""
        pending, self._pending = self._pending, None
        if not pending:
            return
        size, self._pending_size = self._pending_size, 0
        assert self._wire is not None
        delivery = self._wire.write_frames(pending, size)
        if delivery is Delivery.GONE:
            self._gone = True  # the next send_frame says so to the stream
        elif delivery is Delivery.BEHIND:
            self._behind = True

    async def write_eof(self, data: bytes = b"") -> None:
        self._flush()  # the last events before the end of the body
        await super().write_eof(data)

    def direct_wire(self) -> DirectWire | None:
        """A way to write this stream's next frames without its task, if the response allows it."""
        self._flush()  # what the stream handed over goes first
        writer = self._payload_writer
        transport = None if writer is None else writer.transport
        if transport is None or transport.is_closing() or self.compression or self.content_length is not None:
            return None
        assert writer is not None
        if not self._headers_out():
            return None
        return DirectWire(self, transport, writer)

    def _headers_out(self) -> bool:
        # aiohttp holds the headers back to send them with the first body write.
        return self._writes > 0

    async def wait_until_drained(self) -> None:
        """After direct writes left the socket's buffer full: wait for the client (the heartbeat cuts off a stall)."""
        writer = self._payload_writer
        if writer is None:
            return
        self._write_pending = True
        try:
            await writer.drain()
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
            wire = self.direct_wire()
            if wire is not None and wire.idle():
                # The usual case: nothing waits in the socket's buffer, so the ping
                # goes straight out, without a task of its own.
                wire.write_frames((PING,), len(PING))
                self._seen = self._writes
                return
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


class DirectWire:
    """Writes into one stream's socket from outside its task: a follow cohort's broadcast (``broadcast.py``).

    One frame goes to many streams in one pass, with no task switch per
    stream. A write never waits: the bytes go to the socket, or to its
    buffer, and the caller learns whether the client has fallen behind (more
    than ``DIRECT_BUFFER_LIMIT`` buffered) or is gone. It keeps what aiohttp's
    own write keeps: the chunked framing, the byte count, and the write count
    the heartbeat reads (so a stream written to this way gets no ping).
    """

    __slots__ = ("_chunked", "_response", "_transport", "_writer")

    def __init__(
        self, response: CandleEventResponse, transport: asyncio.WriteTransport, writer: AbstractStreamWriter
    ) -> None:
        self._response = response
        self._transport = transport
        self._writer = writer
        # What the writer frames, not what the response asked for: aiohttp-sse enables
        # chunked encoding after the headers, and aiohttp chunks only for HTTP/1.1.
        self._chunked = bool(getattr(writer, "chunked", response.chunked))

    def idle(self) -> bool:
        """Whether nothing waits in the socket's buffer (the client read everything sent so far)."""
        return self._transport.get_write_buffer_size() == 0

    def write_frames(self, frames: Sequence[bytes], size: int) -> Delivery:
        """Write ``frames`` (``size`` bytes in all) as one chunk, in one system call, without copying them."""
        transport = self._transport
        if transport.is_closing():
            return Delivery.GONE
        if self._chunked:
            head = b"%x\r\n" % size
            transport.writelines((head, *frames, b"\r\n"))
            size += len(head) + 2
        else:
            transport.writelines(frames)
        self._writer.output_size += size
        self._response._writes += 1
        return Delivery.BEHIND if transport.get_write_buffer_size() > DIRECT_BUFFER_LIMIT else Delivery.SENT


def write_each(wires: Sequence[DirectWire], frame: bytes, chunked_frame: bytes) -> list[tuple[int, Delivery]]:
    """Write one frame to every wire in one pass; the positions of those it was not plainly SENT to, and why.

    One loop with everything local rather than a method call per wire: at
    50,000 writes a second the Python around each ``send`` is measurable
    (about 1.9 µs a write that way, 1.2 µs this way, against 13-18 µs for
    the system call, over 10,000 loopback sockets).
    """
    missed: list[tuple[int, Delivery]] = []
    chunked_size, plain_size = len(chunked_frame), len(frame)
    limit = DIRECT_BUFFER_LIMIT
    for position, wire in enumerate(wires):
        transport = wire._transport
        if transport.is_closing():
            missed.append((position, Delivery.GONE))
            continue
        if wire._chunked:
            transport.write(chunked_frame)
            wire._writer.output_size += chunked_size
        else:
            transport.write(frame)
            wire._writer.output_size += plain_size
        wire._response._writes += 1
        if transport.get_write_buffer_size() > limit:
            missed.append((position, Delivery.BEHIND))
    return missed


def chunked(frame: bytes) -> bytes:
    """``frame`` as one chunk of HTTP/1.1 chunked transfer encoding (what aiohttp's writer would send)."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)
