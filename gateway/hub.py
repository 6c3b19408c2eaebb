"""One hub per followed job per process: read each change once, encode each live event once, write it to every follower.

After its snapshot, a follow stream joins its job's hub and its own task
only waits. The hub is one task (after Centrifugo's hub, a channel's
publication encoded once and written to each client); everything it
keeps changes in that task alone:

    notes, re-check timer, joins --> hub task --> pass: for each group
        group = a model stream (a fork) + the followers at its spot
        look: read once per pass, build each event once (follow.look); the looks
              of every hub woken in one loop turn go as one pipeline (sources/batch.py)
        flush: the look's frames, chunk-framed once (SharedBody), one write per
               follower (response.write_shared)

- A *group* holds the followers whose next events are byte for byte the
  same (same request, job and position, ``CandleStream.same_spot``). Its
  model stream builds each frame once; the hub writes the frames of one
  look to each member in one socket write, without waiting. Groups that
  reach one spot merge after a pass.
- The *hand-over* (``follow``): a stream joins with its snapshot sent. It
  gets a group of its own, at its position, and the hub looks for it
  before anything else is written to it, unless it registered before it
  read its snapshot and no note came since: then the snapshot is the live
  edge and it waits for the next note like everyone else. Either way, no
  gap and no duplicate: the next event written to it continues its own.
- The *byte bound*: a follower whose socket's buffer holds more than
  ``sse.BUFFER_BOUND`` after a write leaves (``BEHIND``); its task waits
  for the drain (the heartbeat cuts off a client that stalls; it resumes
  by ``Last-Event-ID``) and joins again. Past the job's last event it
  leaves ``ENDED`` instead, with nothing left to send.
- Leaving, however it happens (cancellation included), the follower's
  stream adopts the position of the last frames written to it, so its
  event ids, ``points_sent``, log line and metrics say exactly what it was
  sent.
- *Compression* (``compression.py``): a group codes each look's frames once
  per codec among its members (a shared ``LiveEncoder`` each), and writes
  identity members the frames as they are. A compressed member hands its
  own encoder over when it boards, pings through the group while aboard,
  and takes its encoder back however it leaves (docs/DECISIONS.md,
  "Compressed streams").
- Re-checks without a note fall on ticks shared by every hub of the process
  (``_next_tick``), so idle jobs' re-checks share one pipeline per tick.
- The hub's task ends when it has no follower left; the next join starts it
  again. A shutdown cancels it (``JobNotes.aclose``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from functools import partial
from typing import Final

from gateway import compression, metrics, protocol
from gateway.compression import Codec, LiveEncoder
from gateway.errors import StreamError
from gateway.follow import Reads, look
from gateway.internals.aiohttp import SharedBody
from gateway.observe import StreamWatch
from gateway.redis_client import RedisBusy, raise_if_cancelling
from gateway.sources.base import Source
from gateway.sse import CandleEventResponse, Delivery
from gateway.stream import CandleStream

log = logging.getLogger(__name__)

# Pauses of a group whose read found the pool busy: first, and longest.
_BUSY_PAUSE_S: Final = (0.05, 1.0)


def _next_tick(after: float, interval: float) -> float:
    """The first multiple of ``interval`` on the loop's clock past ``after``.

    Every hub of the process re-checks on the same ticks, so the idle
    re-checks of many jobs wake in one loop turn and go to Redis as one
    pipeline (``sources/batch.py``), not one each at scattered moments.
    """
    return (math.floor(after / interval) + 1) * interval


class Leave(enum.Enum):
    """Why a follower left its hub."""

    ENDED = "ended"  # the stream's last event was written to it
    BEHIND = "behind"  # its client does not keep up: wait for the drain, then join again
    GONE = "gone"  # its connection is closing
    STOPPED = "stopped"  # the hub stopped (a bug): the stream ends


class _Member:
    __slots__ = (
        "bytes_at", "codec", "errors_at", "events_at", "group", "heard_at", "left", "response", "settled", "source",
        "stream", "watch",
    )  # fmt: skip

    def __init__(
        self,
        stream: CandleStream,
        source: Source,
        response: CandleEventResponse,
        watch: StreamWatch,
        heard_at: int | None,
    ) -> None:
        self.stream = stream
        self.source = source
        self.response = response
        # The body's content coding; None for identity (the frames go as they are).
        self.codec: Codec | None = None if response.encoder is None else response.encoder.codec
        self.watch = watch
        self.heard_at = heard_at
        # Its task waits for this; cancelling the task cancels it (hence ``settled``).
        self.left: asyncio.Future[Leave] = asyncio.get_running_loop().create_future()
        self.settled = False
        self.group: _Group | None = None
        self.events_at = self.bytes_at = self.errors_at = 0

    def board(self, group: _Group) -> None:
        """Count from here what ``group`` writes (the member stands where its model stands)."""
        self.group = group
        self.events_at, self.bytes_at, self.errors_at = group.events, group.bytes, len(group.error_frames)

    def settle(self, why: Leave) -> None:
        """Adopt what was written to it, tell its watch, and let its task go on (once)."""
        if self.settled:
            return
        self.settled = True
        group = self.group
        if group is not None:
            group.gone += 1
            if self.codec is not None:
                group.release_coded(self)
            self.stream.adopt(group.mark)
            self.account()
            metrics.FOLLOW_RIDERS.dec()
        if not self.left.done():
            self.left.set_result(why)

    def account(self) -> None:
        """Tell the stream's watch what the group wrote to it since it boarded."""
        group = self.group
        assert group is not None
        if events := group.events - self.events_at:
            errors = group.error_frames[self.errors_at :]
            self.watch.sent_elsewhere(events, group.bytes - self.bytes_at, group.last_event, errors)


class _Group:
    """A model stream and the followers at its spot."""

    def __init__(self, stream: CandleStream, source: Source) -> None:
        self.model = stream.fork(self._collect)
        self.source = source
        self.members: dict[_Member, None] = {}  # in joining order
        self.pending: list[bytes] = []  # frames of the current look, not yet written
        self.events = self.bytes = 0  # what the model sent so far
        self.last_event = b""
        self.error_frames: list[bytes] = []
        # Members whose stream has not had a data_chunk yet (a follower of empty lists), and
        # whether the look holds one: its flush times their first (gateway_first_data_chunk_seconds).
        self.before_first_chunk: list[_Member] = []
        self.chunk_pending = False
        self.gone = 0  # members that settled since the group last let go of them (``let_go_of_the_gone``)
        self.mark = self.model.mark()  # where the last written frame left the model
        self.needs_look = True
        self.due = math.inf  # when a held-back job_status (or a busy read) wants a look
        self.pause = _BUSY_PAUSE_S[0]
        self.over = False
        # Compression (issue 22): one shared encoder per codec among the members, so each
        # look's frames are coded once per codec; how many members are coded (none: as before).
        self.live: dict[Codec, LiveEncoder] = {}
        self.coded = 0

    async def _collect(self, event: bytes, frame: bytes) -> None:
        self.pending.append(frame)
        self.events += 1
        self.bytes += len(frame)
        self.last_event = event
        if event == protocol.ERROR:
            self.error_frames.append(frame)
        elif event == protocol.DATA_CHUNK:
            self.chunk_pending = True
        if metrics.SWITCH.on:
            metrics.event_counter(event).inc(len(self.members))
            metrics.BYTES_SENT.inc(len(frame) * len(self.members))

    def admit(self, member: _Member) -> None:
        """``member`` (standing at this group's spot) rides this group from now on."""
        if member.codec is not None:
            self._board_coded(member, member.codec)
        member.board(self)
        self.members[member] = None
        if not member.watch.saw_data_chunk:
            self.before_first_chunk.append(member)

    def let_go_of_the_gone(self) -> None:
        """Drop the members that left (their tasks cancelled, say) before a look.

        A flush with frames drops them too, but a job that sends nothing new
        for long (pending, stalled) would otherwise keep every follower that
        came and went, and count it in each event's metrics.
        """
        if self.gone:
            self.gone = 0
            self.members = {member: None for member in self.members if not member.settled}
            self.before_first_chunk = [member for member in self.before_first_chunk if not member.settled]

    def flush(self) -> None:
        """Write the look's frames to every member in one pass, without waiting; let go those that cannot take more."""
        frames, self.pending = self.pending, []
        self.mark = self.model.mark()
        behind = Leave.ENDED if self.over else Leave.BEHIND
        if frames:
            data = frames[0] if len(frames) == 1 else b"".join(frames)  # joined once, not once per member
            dropped: list[tuple[_Member, Delivery]] = []
            first_chunk = self._first_chunk_for() if self.chunk_pending else []
            self.chunk_pending = False
            if self.coded:
                self._write_coded(data, dropped)
            else:
                body = SharedBody(data)  # its chunk framed once for all of them
                for member in self.members:
                    if member.settled:
                        dropped.append((member, Delivery.SENT))
                        continue
                    delivery = member.response.write_shared(body)
                    if delivery is not Delivery.SENT:
                        dropped.append((member, delivery))
            for member, delivery in dropped:
                del self.members[member]
                if delivery is not Delivery.SENT:
                    member.settle(Leave.GONE if delivery is Delivery.GONE else behind)
            if first_chunk:
                # Not its ``left`` future's result: a member whose task was just cancelled (its client
                # went away) has that future cancelled before it settles, and ``result()`` would raise
                # the cancellation in the hub's task, stopping every follower's stream.
                gone = {member for member, delivery in dropped if delivery is Delivery.GONE}
                for member in first_chunk:
                    if member not in gone:  # written to it
                        member.watch.first_chunk_written()
        if self.over:
            for member in self.members:
                member.settle(Leave.ENDED)
            self.members.clear()

    def _first_chunk_for(self) -> list[_Member]:
        """The members this flush writes their first data_chunk to (those already gone excepted)."""
        waiting, self.before_first_chunk = self.before_first_chunk, []
        return [member for member in waiting if not member.settled]

    def take(self, other: _Group) -> None:
        """Members of ``other``, at this group's spot, ride this one from now on."""
        for member in other.members:
            if not member.settled:
                member.account()
                if member.codec is not None:
                    other.release_coded(member)
                self.admit(member)
        other.members.clear()
        self.model.status_sent_at = max(self.model.status_sent_at, other.model.status_sent_at)
        self.due = min(self.due, other.due)

    # -- compression (issue 22) ------------------------------------------------------
    # Members that asked for a codec take one shared coding of each look's frames
    # (compression.LiveEncoder), the same bytes to every member of that codec: coded
    # once per codec, written many times. A member boards where the shared bytes
    # depend on nothing earlier, its own encoder handing over there, and takes its own
    # back when it leaves; while aboard, its ping goes through the group to all members
    # of its codec (its body may hold nothing the shared bytes did not).

    def _write_coded(self, data: bytes, dropped: list[tuple[_Member, Delivery]]) -> None:
        coded: dict[Codec, bytes] = {}
        sent: dict[Codec, int] = {}
        body = SharedBody(data)
        for member in self.members:
            if member.settled:
                dropped.append((member, Delivery.SENT))
                continue
            codec = member.codec
            if codec is None:
                delivery = member.response.write_shared(body)
            else:
                out = coded.get(codec)
                if out is None:
                    out = coded[codec] = self.live[codec].encode(data)
                delivery = member.response.write_coded(out)
                self._took(member, codec, data)
                sent[codec] = sent.get(codec, 0) + 1
            if delivery is not Delivery.SENT:
                dropped.append((member, delivery))
        for codec, out in coded.items():
            compression.count_shared(codec, len(data), len(out), sent[codec])

    def _took(self, member: _Member, codec: Codec, data: bytes) -> None:
        if codec is Codec.GZIP:  # its trailer's CRC-32 and length (zstd keeps no count)
            encoder = member.response.encoder
            assert encoder is not None
            encoder.took(data, self.live[codec])

    def _board_coded(self, member: _Member, codec: Codec) -> None:
        live = self.live.get(codec)
        if live is None:
            live = self.live[codec] = LiveEncoder(codec)
        if restart := live.restart():  # those aboard in this codec end what they took so far
            for other in self.members:
                if other.codec is codec and not other.settled:
                    other.response.write_coded(restart)
        member.response.hand_over()
        member.response.shared_ping = partial(self.ping, codec)
        self.coded += 1

    def release_coded(self, member: _Member) -> None:
        """``member`` leaves this group's shared coding (and may be written to on its own again)."""
        assert member.codec is not None
        self.coded -= 1
        member.response.take_back(self.live[member.codec])

    def ping(self, codec: Codec) -> None:
        """``: ping`` to every member of ``codec``: one of them was quiet for a ping interval, so all were."""
        members = [member for member in self.members if member.codec is codec and not member.settled]
        out = self.live[codec].encode(protocol.PING)
        for member in members:
            if member.response.write_coded(out) is Delivery.GONE:
                member.response.stop_streaming()
            self._took(member, codec, protocol.PING)
        compression.count_shared(codec, len(protocol.PING), len(out), len(members))


class Hub:
    """The followers of one job in this process, and the one task that feeds them."""

    def __init__(
        self,
        gate: asyncio.Semaphore,
        *,
        recheck_interval_s: float,
        status_min_interval_s: float,
        running: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self._gate = gate
        # The process's running hub tasks (``JobNotes``), which a shutdown stops.
        self._running = set() if running is None else running
        self._recheck_interval_s = recheck_interval_s
        self._status_min_interval_s = status_min_interval_s
        self.notes_heard = 0  # notes of the job heard so far (a registration's mark)
        self._noted = False  # a note came since the last pass
        self._quiet_interval = True  # no note during the current re-check interval
        self._note_at: float | None = None  # when the earliest note not yet answered came (loop clock)
        self._joins: list[_Member] = []
        self.groups: list[_Group] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def followers(self) -> int:
        return sum(len(group.members) for group in self.groups) + len(self._joins)

    def noted(self, at: float) -> None:
        """A worker's note: look again."""
        self.notes_heard += 1
        self._noted = True
        self._quiet_interval = False
        if self._note_at is None:
            self._note_at = at
        self._wake.set()

    async def follow(
        self,
        stream: CandleStream,
        source: Source,
        response: CandleEventResponse,
        watch: StreamWatch,
        heard_at: int | None,
    ) -> Leave:
        """Hand ``stream`` (its snapshot sent) to the hub until it leaves, standing where its last frame left it."""
        member = _Member(stream, source, response, watch, heard_at)
        self._joins.append(member)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="follow-hub")
            self._running.add(self._task)
            self._task.add_done_callback(self._running.discard)
        try:
            return await member.left
        finally:
            member.settle(Leave.STOPPED)  # cancelled: the hub drops it at its next write

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        recheck_at = _next_tick(loop.time(), self._recheck_interval_s)
        try:
            while self._joins or self.groups:
                # Cancelled (a shutdown): end, even if a Redis call swallowed it (bpo-42130;
                # call_redis raises those of its calls, this covers any other).
                raise_if_cancelling()
                deadline = min([recheck_at, *(group.due for group in self.groups)])
                if not self._wake.is_set():
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                self._wake.clear()
                now = loop.time()
                look_all, self._noted = self._noted, False
                if now >= recheck_at:
                    # Notes cover the interval, or else the re-check looks (a lost note is found late, never lost).
                    look_all = look_all or self._quiet_interval
                    self._quiet_interval = True
                    recheck_at = _next_tick(now, self._recheck_interval_s)
                await self._pass(look_all, now)
        except Exception:
            log.exception("follow hub stopped; its followers' streams end")
        finally:
            self._task = None
            for group in self.groups:
                for member in group.members:
                    member.settle(Leave.STOPPED)
            for member in self._joins:
                member.settle(Leave.STOPPED)
            self.groups, self._joins = [], []

    async def _pass(self, look_all: bool, now: float) -> None:
        joins, self._joins = self._joins, []
        for member in joins:
            if member.settled:
                continue
            needs_look = member.heard_at is None or member.heard_at != self.notes_heard
            # Caught up (its snapshot is the live edge): it boards a group at its spot if there is one.
            group = None if needs_look else self._at_spot(member.stream)
            if group is None:
                group = _Group(member.stream, member.source)
                group.needs_look = needs_look
                self.groups.append(group)
            else:
                group.model.status_sent_at = max(group.model.status_sent_at, member.stream.status_sent_at)
            group.admit(member)
            metrics.FOLLOW_RIDERS.inc()
        reads = Reads(self._gate)
        for group in list(self.groups):
            # Only groups that look: a pass for a join costs nothing per member of the others.
            if look_all or group.needs_look or group.due <= now:
                group.let_go_of_the_gone()
                if group.members:
                    await self._look(group, reads, now)
                else:
                    group.over = True  # nobody left to write to: stop reading for them
                group.flush()
        self.groups = [group for group in self.groups if not group.over]
        self._merge()
        if self._note_at is not None and look_all:
            if metrics.SWITCH.on:
                metrics.NOTE_TO_WRITTEN_SECONDS.observe(asyncio.get_running_loop().time() - self._note_at)
            self._note_at = None

    async def _look(self, group: _Group, reads: Reads, now: float) -> None:
        model = group.model
        try:
            due = await look(model, group.source, reads, self._status_min_interval_s, now)
        except RedisBusy:
            # Every connection is taken (a burst of new streams): Redis is fine, so look again shortly.
            log.info("follow hub of %s waits for a free Redis connection", model.request.id)
            group.due = now + group.pause
            group.pause = min(group.pause * 2, _BUSY_PAUSE_S[1])
            return
        except StreamError as exc:
            await model.end_with(exc)  # job_error, connection_error: the stream's last event
            group.over = True
            return
        group.needs_look = False
        group.pause = _BUSY_PAUSE_S[0]
        if due == -math.inf:
            await model.finish()
            group.over = True
        else:
            group.due = due

    def _at_spot(self, stream: CandleStream) -> _Group | None:
        """A group whose next events are byte for byte ``stream``'s (between passes, nothing waits to be written)."""
        return next((group for group in self.groups if not group.over and group.model.same_spot(stream)), None)

    def _merge(self) -> None:
        """Groups that reached one spot become one."""
        kept: list[_Group] = []
        for group in self.groups:
            same = next((other for other in kept if other.model.same_spot(group.model)), None)
            if same is None:
                kept.append(group)
            else:
                same.take(group)
        self.groups = kept
