"""The SSE response: aiohttp-sse's response, with one write path, a process-wide heartbeat and bounded buffers.

aiohttp-sse gives the mandatory headers (``text/event-stream``,
``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` so that nginx does
not buffer), ``TCP_USER_TIMEOUT`` for a peer that is gone, and ``wait()``
/ ``stop_streaming()``; aiohttp frames the body (chunked for HTTP/1.1, a
plain body closed at the end for 1.0). Used through their public API only,
with two changes (``gateway/internals/aiohttp.py`` holds the one door):

- every byte to the client passes through ``write_frames``: finished frames
  (``protocol.frame``), written at once through aiohttp's writer, never
  waiting. A stream's own task hands its frames to ``send_frame``, which
  writes the small ones a turn of the event loop makes (a short chunk, its
  ``interval_complete``, the next ``interval_start``...) together at the
  turn's end, and the headers with the first ones; the follow hub writes
  each look's frames to each follower with one call;
- compression (``compression.py``): the handler gives a coded stream its
  ``encoder``; ``write_frames`` codes each write through it (``_coded``,
  flushed, so each event decodes on arrival) and ``write_eof`` adds its
  end. A follow hub's group writes its compressed members one shared coding
  of each look (``write_coded``), after ``hand_over``, and ``take_back``
  when they leave; meanwhile their ``: ping`` goes through the group
  (``shared_ping``);
- one heartbeat per process replaces aiohttp-sse's ping task (its interval
  is set past any stream's life) and a timeout around every write: every
  ``ping_interval / 4`` it looks at all open streams at once, sends ``:
  ping`` to those without a write for ``ping_interval`` seconds (SPEC 2),
  and cuts off a client that left a wait for the drain pending for
  ``send_timeout`` seconds (outcome ``cut_slow_client``). aiohttp-sse's
  ``TCP_USER_TIMEOUT`` is set past that (``2 x send_timeout``), so the
  kernel's abort of a peer that stopped acknowledging never pre-empts the
  cut and hides a slow client as ``client_gone``.

Memory per connection stays bounded: a stream waits for the drain once
over ``BUFFER_BOUND`` bytes wait in user space (a follower leaves its hub,
``hub.py``), and a follower's kernel send buffer is capped at
``SEND_BUFFER_BYTES`` once its snapshot is sent (autotuning grew it to
2.85 MB for a slow client).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from gateway.compression import Encoder, LiveEncoder
from gateway.internals.aiohttp import HeadersWithFirstWrite, SharedBody, write_at_once, write_body, write_shared
from gateway.protocol import PING

log = logging.getLogger(__name__)

# Heartbeat ticks per ping interval (or send timeout): a ping goes out after
# between 1 and 1 + 1/TICKS intervals of silence.
_TICKS: Final = 4
# Bytes waiting in a connection's user-space buffer past which its stream waits for the drain.
BUFFER_BOUND: Final = 64 * 1024
# The kernel's send buffer per stream (SO_SNDBUF; Linux doubles it for its bookkeeping).
SEND_BUFFER_BYTES: Final = 256 * 1024
# Frames handed over in one loop turn wait for the turn's end only while they are
# small: a chunk this big goes at once, and a system call is little next to its bytes.
_FLUSH_AT: Final = 16 * 1024
# aiohttp-sse's own ping loop sleeps this long: the heartbeat pings instead.
_NEVER_S: Final = 10.0**9


class Delivery(enum.IntEnum):
    """What became of a write."""

    SENT = 0
    BEHIND = 1  # written, but over BUFFER_BOUND waits in the buffer: wait for the drain before more
    GONE = 2  # not written: the connection is closing, or the response is over


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
                try:
                    stream.beat()
                except Exception:
                    # One stream's defect must not stop pings and stall cuts for all the others.
                    log.exception("heartbeat of one stream failed; that stream is cut off")
                    self._streams.discard(stream)
                    stream.abort()


_heartbeats: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Heartbeat]] = weakref.WeakKeyDictionary()


def _heartbeat(tick_s: float) -> _Heartbeat:
    per_loop = _heartbeats.setdefault(asyncio.get_running_loop(), {})
    if tick_s not in per_loop:
        per_loop[tick_s] = _Heartbeat(tick_s)
    return per_loop[tick_s]


class CandleEventResponse(HeadersWithFirstWrite, EventSourceResponse):
    """An ``EventSourceResponse`` that writes finished frames through one method, pings when idle, cuts off stalls."""

    def __init__(self, *, ping_interval: float, send_timeout: float | None) -> None:
        kernel_timeout = None if send_timeout is None else 2 * send_timeout
        super().__init__(ping_interval=_NEVER_S, send_timeout=kernel_timeout)
        self.ping_interval_s = ping_interval
        self.send_timeout_s = send_timeout
        self.cut_off = False  # the heartbeat cut off a client that stopped reading (the stream's outcome)
        self._writer: AbstractStreamWriter | None = None
        self._transport: asyncio.Transport | None = None
        self._over = False  # write_eof ran: nothing more may reach a kept-alive connection
        self._pending: list[bytes] = []  # frames of this loop turn, written at its end
        self._pending_size = 0
        self._gone = self._behind = False  # what the last flush found, for the stream's task
        self._writes = 0  # writes so far, events and pings alike
        self._waiting = False  # the stream's task waits for the drain
        self._seen = self._quiet = self._stalled = 0  # the heartbeat's counts
        self._heartbeat: _Heartbeat | None = None
        # Compression (issue 22, compression.py): set by the handler with Content-Encoding
        # before prepare(); None is identity. While a hub's group writes this connection
        # shared coded bytes, its ``: ping`` goes through the group (``shared_ping``).
        self.encoder: Encoder | None = None
        self.shared_ping: Callable[[], None] | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        self._writer, self._transport = writer, request.transport
        self._heartbeat = _heartbeat(min(self.ping_interval_s, self.send_timeout_s or math.inf) / _TICKS)
        self._heartbeat.add(self)
        return writer

    def bound_send_buffer(self) -> None:
        """Cap the kernel's send buffer for a long-lived stream (a follower): autotuning would grow it to MBs.

        Not for a snapshot: the snapshot's MBs go out faster through the
        autotuned buffer, and a client that stops reading one is cut off.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the client left (uvloop's socket of a closed transport has no descriptor)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, ValueError):  # closed under us: the next write finds it gone
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def write_frames(self, frames: Sequence[bytes], size: int) -> Delivery:
        """Write ``frames`` (``size`` bytes in all) now, in one socket write: the one way bytes reach the client.

        Coded by the connection's encoder first, if it has one (``_coded``).
        """
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        return self.write_coded(self._coded(data) if self.encoder is not None else data)

    def _coded(self, data: bytes) -> bytes:
        """``data`` in the body's content coding, flushed (every body byte but a shared encoder's passes here)."""
        encoder = self.encoder
        return data if encoder is None else encoder.encode(data)

    def write_coded(self, data: bytes) -> Delivery:
        """Write ``data``, already in the body's content coding, now, in one socket write (the hub's shared bytes)."""
        return self._write(data, None)

    def write_shared(self, body: SharedBody) -> Delivery:
        """``write_frames([body.plain], ...)``, its chunk framed once for many followers (the hub's flush)."""
        if self.encoder is not None:
            return self.write_coded(self.encoder.encode(body.plain))
        return self._write(body.plain, body)

    def _write(self, data: bytes, shared: SharedBody | None) -> Delivery:
        """Write ``data`` (framed once already, in ``shared``, if given) now, in one socket write."""
        transport = self._transport
        if self._over or self._writer is None or transport is None or transport.is_closing():
            return Delivery.GONE
        try:
            if not self._writes:
                write_at_once(self._writer, data)  # the first one: aiohttp sends the headers with it
            elif shared is None:
                write_body(self._writer, transport, data)
            else:
                write_shared(self._writer, transport, shared)
        except ConnectionResetError:
            return Delivery.GONE
        self._writes += 1
        return Delivery.BEHIND if transport.get_write_buffer_size() > BUFFER_BOUND else Delivery.SENT

    async def send_frame(self, frame: bytes) -> None:
        """Hand over one frame from the stream's own task: written at the end of this loop turn, or now if big.

        A client that does not keep up is waited for here (the heartbeat
        cuts off a stall), so memory stays bounded.
        """
        if self._gone:
            raise ConnectionResetError("the client's connection closed")
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame)
        self._pending_size += len(frame)
        if self._pending_size >= _FLUSH_AT:
            self._flush()
        if self._behind:
            self._behind = False
            await self.drained()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        size, self._pending_size = self._pending_size, 0
        delivery = self.write_frames(pending, size)
        if delivery is Delivery.GONE:
            self._gone = True  # the next send_frame says so to the stream
        elif delivery is Delivery.BEHIND:
            self._behind = True

    async def drained(self) -> None:
        """Wait until the client read enough of what was written (the heartbeat cuts off a stall)."""
        self._flush()
        if self._gone:
            raise ConnectionResetError("the client's connection closed")
        if self._writer is None:
            return
        self._waiting = True
        try:
            await self._writer.drain()
        finally:
            self._waiting = False
        self._writes += 1

    async def write_eof(self, data: bytes = b"") -> None:
        self._flush()  # the last events before the end of the body
        if self.encoder is not None and not self._over:
            data = self.encoder.finish() + data  # the codec's end and trailer
        try:
            await super().write_eof(data)
        finally:
            self._over = True
            self._stop_beating()

    def stop_streaming(self) -> None:
        self._stop_beating()
        super().stop_streaming()

    def _stop_beating(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.discard(self)

    def abort(self) -> None:
        """Close the connection at once (a stalled client never drains, so a graceful close would hang)."""
        if self._transport is not None:
            self._transport.abort()
        if self.prepared:
            self.stop_streaming()

    def beat(self) -> None:
        """One heartbeat tick: note progress, cut off a stall, ping when quiet."""
        tick = min(self.ping_interval_s, self.send_timeout_s or math.inf) / _TICKS
        progressed, self._seen = self._writes != self._seen, self._writes
        self._quiet = 0 if progressed else self._quiet + 1
        self._stalled = self._stalled + 1 if self._waiting and not progressed else 0
        if self.send_timeout_s is not None and self._stalled >= max(1, round(self.send_timeout_s / tick)):
            self.cut_off = True  # before the abort: the stream's task sees it when its wait fails
            self.abort()
            return
        if self._quiet >= max(1, round(self.ping_interval_s / tick)) and not self._waiting:
            self._quiet = 0
            if self.shared_ping is not None:
                self.shared_ping()  # a compressed follower in a hub: its body takes nothing of its own
            elif self.write_frames((PING,), len(PING)) is Delivery.GONE:
                self.stop_streaming()
            self._seen = self._writes

    # -- compression shared by a hub's group (compression.LiveEncoder) ------------------

    def hand_over(self) -> Encoder | None:
        """End this connection's own compression at a boundary: from here a hub writes shared coded bytes.

        What the stream handed over goes first; then the encoder's
        ``hand_over`` bytes. None for identity (nothing to hand over).
        """
        self._flush()
        encoder = self.encoder
        if encoder is None:
            return None
        if head := encoder.hand_over():
            self.write_coded(head)
        return encoder

    def take_back(self, shared: LiveEncoder) -> None:
        """Leave ``shared``: close what it began for this connection; its own encoder goes on from here."""
        self.shared_ping = None
        assert self.encoder is not None
        if tail := self.encoder.take_back(shared):
            self.write_coded(tail)
