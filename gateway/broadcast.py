"""Encode once, write many: follow streams of one job at one position ride one cohort.

Followers of a job that are caught up, made the same request and stand at
the same position would send the very same bytes for every event to come.
Instead of each waking up, reading, building and writing on its own task, a
caught-up follower *boards* a cohort: one task (the cohort's leader, a
``CandleStream`` with its own ``LiveTail``) reads the job, builds each event
once and writes its frame straight into every rider's socket
(``sse.DirectWire``): per rider and event, one ``transport.write`` and no
task switch. That is what lets one process feed ten thousand followers.

A rider's own task meanwhile waits for the cohort to let it go:

- ``ENDED``: the leader sent the stream's last event (``all_complete`` or a
  fatal ``error``); the rider's stream adopts the leader's position and
  returns without sending anything more;
- ``BEHIND``: its client did not keep up (its socket's buffer went over the
  limit); it adopts the leader's position (the frame that filled the buffer
  was written) and goes on by itself, waiting for the drain first;
- ``GONE``: its connection is closing; its task ends as a failed write would;
- ``SET_DOWN``: the cohort stopped for any other reason (cancelled, a bug);
  the rider adopts the position and goes on by itself.

However it leaves (cancellation included: a drain stops a rider like any
waiting stream), the rider's stream adopts the leader's position, so the
client's last event id, the stream's log line and its metrics say exactly
what it was sent. Equality of everything a frame's bytes depend on is
checked when a follower boards (``CandleStream.same_spot``); a follower that
matches no cohort starts one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from gateway import compression, metrics, protocol
from gateway.compression import Codec, Encoder, LiveEncoder
from gateway.observe import StreamWatch
from gateway.sse import CandleEventResponse, Delivery, DirectWire, chunked, write_each
from gateway.stream import CandleStream

log = logging.getLogger(__name__)


class Leave(enum.Enum):
    """Why a rider left its cohort."""

    ENDED = "ended"
    BEHIND = "behind"
    GONE = "gone"
    SET_DOWN = "set_down"


class Seat:
    """What a stream brings to a cohort: its response (written to directly) and its watch (told what it was sent)."""

    def __init__(self, response: CandleEventResponse, watch: StreamWatch) -> None:
        self.response = response
        self.watch = watch


def wire_for(stream: CandleStream, seat: Seat) -> DirectWire | None:
    """How a cohort would write to ``stream``, or None if it cannot board now.

    Not before its first event went out (that one carries ``retry:``) nor
    before its first data_chunk (its watch measures the time to it).
    """
    if not stream.first_event_sent or not seat.watch.saw_data_chunk:
        return None
    return seat.response.direct_wire()


class _Rider:
    __slots__ = (
        "bytes_at_boarding",
        "encoder",
        "errors_at_boarding",
        "events_at_boarding",
        "left",
        "seat",
        "stream",
        "wire",
    )

    def __init__(self, stream: CandleStream, seat: Seat, wire: DirectWire, cohort: Cohort) -> None:
        self.stream = stream
        self.seat = seat
        self.wire = wire
        self.left: asyncio.Future[Leave] = asyncio.get_running_loop().create_future()
        self.events_at_boarding = cohort.events
        self.bytes_at_boarding = cohort.bytes
        self.errors_at_boarding = len(cohort.error_frames)
        self.encoder: Encoder | None = seat.response.encoder


class Cohort:
    """One leader stream and the riders it writes to."""

    def __init__(
        self,
        template: CandleStream,
        run_leader: Callable[[CandleStream], Awaitable[None]],
        on_over: Callable[[Cohort], None],
    ) -> None:
        self.leader = template.fork(self._broadcast, self._flush)
        self._riders: dict[_Rider, None] = {}  # in boarding order
        self._on_over = on_over
        self.over = False
        # What the leader sent so far, for the riders' watches when they leave.
        self.events = 0
        self.bytes = 0
        self.last_event = b""
        self.error_frames: list[bytes] = []
        self._pending: list[tuple[bytes, bytes]] = []  # (event, frame) sent by the leader, not yet written
        # Compression (issue 22): one shared encoder per codec among the riders, and
        # how many riders are compressed (none: the frames go as they are, as before).
        self._live: dict[Codec, LiveEncoder] = {}
        self._coded_riders = 0
        self._task = asyncio.create_task(self._run(run_leader), name="follow-cohort")

    def __len__(self) -> int:
        return len(self._riders)

    def accepts(self, stream: CandleStream) -> bool:
        """Whether ``stream`` would send exactly what the leader sends from now on."""
        return not self.over and self.leader.same_spot(stream)

    async def ride(self, stream: CandleStream, seat: Seat, wire: DirectWire) -> Leave:
        """The leader writes ``stream``'s events through ``wire`` until it lets go; the stream adopts its position."""
        # Coalescing holds for every rider: the next job_status waits for the latest one any of them was sent.
        self.leader.status_sent_at = max(self.leader.status_sent_at, stream.status_sent_at)
        # The stream already sent what the leader has queued (it stands where the leader stands).
        self._flush()
        rider = _Rider(stream, seat, wire, self)
        if rider.encoder is not None:
            self._board_coded(rider)
        self._riders[rider] = None
        metrics.FOLLOW_RIDERS.inc()
        try:
            return await rider.left
        finally:
            self._let_go(rider, Leave.SET_DOWN)  # only if still aboard (its task was cancelled)

    def _let_go(self, rider: _Rider, why: Leave) -> None:
        if rider not in self._riders:
            return
        self._flush()  # what the leader already sent goes to this rider too (a no-op while flushing)
        if rider not in self._riders:
            return  # that flush found it gone or behind and let it go already
        del self._riders[rider]
        metrics.FOLLOW_RIDERS.dec()
        if rider.encoder is not None:
            self._leave_coded(rider, why)
        # (A rider that is GONE did not get the last frame; its client resumes
        # from the id it received, so only its log line counts one event more.)
        rider.stream.adopt(self.leader)
        self._tell_watch(rider)
        if not rider.left.done():
            rider.left.set_result(why)
        if not self._riders and not self.over:
            self._task.cancel()  # nobody left to write to: the leader stops reading

    def _tell_watch(self, rider: _Rider) -> None:
        events = self.events - rider.events_at_boarding
        if events:
            rider.seat.watch.sent_elsewhere(
                events,
                self.bytes - rider.bytes_at_boarding,
                self.last_event,
                self.error_frames[rider.errors_at_boarding :],
            )

    async def _broadcast(self, event: bytes, frame: bytes) -> None:
        """The leader's ``send``: queue the frame; the whole round's frames go out together.

        A round (one wake-up of the leader) often makes two events (a
        data_chunk and a job_status): written together, they cost each rider
        one socket write instead of two. They go out when the leader's look
        is over (``round_over``, in the same step), or else (the snapshot's
        last events, the stream's end) as soon as the leader waits.
        """
        self.events += 1
        self.bytes += len(frame)
        self.last_event = event
        if event == protocol.ERROR:
            self.error_frames.append(frame)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((event, frame))

    def _flush(self) -> None:
        """Write the queued frames to every rider's socket, in one pass, without waiting."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        frames = pending[0][1] if len(pending) == 1 else b"".join(frame for _, frame in pending)
        # After the stream's last event a rider that fell behind has nothing left to catch up with.
        behind = Leave.ENDED if self.leader.sending_last_event else Leave.BEHIND
        riders = list(self._riders)
        if self._coded_riders:
            dropped = self._write_coded(riders, frames, behind)
        else:
            chunk = chunked(frames)
            dropped = [
                (riders[position], behind if delivery is Delivery.BEHIND else Leave.GONE)
                for position, delivery in write_each([rider.wire for rider in riders], frames, chunk)
            ]
        delivered = len(self._riders) - sum(why is Leave.GONE for _, why in dropped)
        if metrics.SWITCH.on and delivered:
            for event, frame in pending:
                metrics.event_counter(event).inc(delivered)
                metrics.BYTES_SENT.inc(len(frame) * delivered)
        for rider, why in dropped:
            self._let_go(rider, why)

    # -- compression (issue 22) ------------------------------------------------------
    # Riders that asked for a codec take one shared encoding of each write
    # (compression.LiveEncoder), written to all of them as the frames are: encode
    # once per codec, write many. A rider boards at a point after which the shared
    # bytes depend on nothing earlier, and its own encoder hands over there.

    def _write_coded(self, riders: list[_Rider], data: bytes, behind: Leave) -> list[tuple[_Rider, Leave]]:
        """Write ``data`` to every rider in its codec: the same bytes to all riders of one codec."""
        dropped: list[tuple[_Rider, Leave]] = []
        for codec, group in _by_codec(riders).items():
            live = self._live.get(codec)
            coded = data if live is None else live.encode(data)
            for position, delivery in write_each([rider.wire for rider in group], coded, chunked(coded)):
                dropped.append((group[position], behind if delivery is Delivery.BEHIND else Leave.GONE))
            if live is not None:
                if codec is Codec.GZIP:  # its trailer's CRC-32 and length (zstd riders keep no count)
                    for rider in group:
                        assert rider.encoder is not None
                        rider.encoder.took(data, live)
                compression.count_shared(codec, len(data), len(coded), len(group))
        return dropped

    def _board_coded(self, rider: _Rider) -> None:
        """Bring a compressed rider onto its codec's shared encoder, at a point that depends on nothing before."""
        assert rider.encoder is not None
        codec = rider.encoder.codec
        live = self._live.get(codec)
        if live is None:
            live = self._live[codec] = LiveEncoder(codec)
        restart = live.restart()
        if restart:  # those already aboard in this codec end what they took so far
            aboard = [other for other in self._riders if other.encoder is not None and other.encoder.codec is codec]
            write_each([other.wire for other in aboard], restart, chunked(restart))
        head = rider.encoder.hand_over()
        if head:
            rider.wire.write_frames((head,), len(head))
        self._coded_riders += 1
        rider.seat.response.shared_ping = lambda: self._ping(codec)

    def _leave_coded(self, rider: _Rider, why: Leave) -> None:
        assert rider.encoder is not None
        self._coded_riders -= 1
        rider.seat.response.shared_ping = None
        tail = rider.encoder.take_back(self._live[rider.encoder.codec])
        if tail and why is not Leave.GONE:
            rider.wire.write_frames((tail,), len(tail))

    def _ping(self, codec: Codec) -> None:
        """A ``: ping`` to every rider of ``codec``: one of them was quiet for a ping interval, so all were."""
        self._flush()
        live = self._live[codec]
        group = [rider for rider in self._riders if rider.encoder is not None and rider.encoder.codec is codec]
        coded = live.encode(protocol.PING)
        dropped = write_each([rider.wire for rider in group], coded, chunked(coded))
        for rider in group:
            assert rider.encoder is not None
            rider.encoder.took(protocol.PING, live)
        compression.count_shared(codec, len(protocol.PING), len(coded), len(group))
        for position, delivery in dropped:
            self._let_go(group[position], Leave.BEHIND if delivery is Delivery.BEHIND else Leave.GONE)

    async def _run(self, run_leader: Callable[[CandleStream], Awaitable[None]]) -> None:
        try:
            await run_leader(self.leader)
        except asyncio.CancelledError:
            pass  # its last rider left
        except Exception:
            log.exception("follow cohort stopped; its streams go on by themselves")
        finally:
            self.over = True
            why = Leave.ENDED if self.leader.sending_last_event else Leave.SET_DOWN
            for rider in list(self._riders):
                self._let_go(rider, why)
            self._on_over(self)


def _by_codec(riders: list[_Rider]) -> dict[Codec, list[_Rider]]:
    groups: dict[Codec, list[_Rider]] = {}
    for rider in riders:
        codec = Codec.IDENTITY if rider.encoder is None else rider.encoder.codec
        groups.setdefault(codec, []).append(rider)
    return groups
