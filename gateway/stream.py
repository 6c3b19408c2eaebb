"""One request's walk through its intervals: events, chunks, progress, resume.

The next event is always derived from the stream's position (``position.py``)
and nothing else, so a fresh stream and a stream resumed from an event id run
the very same code: resuming cannot drift from the uninterrupted stream. The
walk knows nothing of Redis or SQL (it asks a ``Source``) and nothing of
HTTP (it hands finished frames to ``send``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec

from gateway import protocol
from gateway.errors import DataError, JobFailed, StreamError
from gateway.params import StreamRequest
from gateway.payloads import Payloads
from gateway.policy import Complete, SendChunk, Start, next_action
from gateway.position import Phase, StreamPosition, clone_position, copy_position, element_digest
from gateway.protocol import (
    DataChunk,
    ErrorEvent,
    Payload,
)
from gateway.sources.base import Chunk, ChunkReader, JobState, ReadPlan, Snapshot, Source

# Hands one finished frame on, with its event's name (so nobody has to parse it back out).
Send = Callable[[bytes, bytes], Awaitable[None]]


class StreamOver(Exception):
    """Raised by a live tail whose stream's last event went out elsewhere (its job's follow hub, ``hub.py``)."""


class Mark:
    """Where a stream stood after some events: what a follower adopts when it leaves its job's hub."""

    __slots__ = ("anchors", "last_times", "position", "state", "told_backtest_id", "went_back")

    def __init__(
        self,
        position: StreamPosition,
        state: JobState,
        last_times: dict[int, datetime],
        anchors: dict[int, bytes],
        *,
        went_back: bool,
        told_backtest_id: str | None,
    ) -> None:
        self.position = position
        self.state = state
        self.last_times = last_times
        # The last stored element sent per interval (the continuity check's anchor, ``_check_continuity``).
        self.anchors = anchors
        self.went_back = went_back
        # The backtest id the stream's last event that carries one said.
        self.told_backtest_id = told_backtest_id


class CandleStream:
    """Emits the events of one stream, from ``position`` on, through ``send``."""

    def __init__(
        self,
        request: StreamRequest,
        snapshot: Snapshot,
        source: Source,
        position: StreamPosition,
        send: Send,
        *,
        retry_ms: int | None,
    ) -> None:
        self.request = request
        job = snapshot.job
        self._job = job
        self._state = job.state
        self._failures = snapshot.failures
        self._source = source
        self.position = position
        self._send = send
        self._retry_ms = retry_ms
        self._chunk_size = request.chunk_size
        self._names = request.intervals
        self._payloads = Payloads(request, job)
        # Stored lengths read with the job; an interval that starts before any
        # chunk has been sent may use them, later ones count again.
        self._lengths = dict(snapshot.lengths)
        self._lengths_fresh = True
        self._readers: dict[int, ChunkReader] = {}
        # Time of the last candle sent per interval: live chunks must come after it.
        self._last_times: dict[int, datetime] = {}
        # The last stored element sent of each interval, to check the next read's element before it.
        self._anchors: dict[int, bytes] = {}
        self._went_back = False  # a completed job said it runs again: reported once, then not adopted
        # The backtest id its events said so far (the job's as described): a follower
        # whose job is given one later gets a job_status saying so (``status_changed``).
        self._told_backtest_id = job.backtest_id
        # When follow mode last sent a job_status (its clock), for coalescing.
        self.status_sent_at = -math.inf
        # Set just before the stream's last event (all_complete or a fatal error) is handed to send.
        self.sending_last_event = False
        # What a live event's bytes depend on besides its id, the state and the chunk.
        self._shape = (request.intervals, request.limit, request.chunk_size, request.order, self._payloads.exists)
        # What the payloads say of the job besides its state.
        self._identity = (job.job_id, job.backtest_id, job.symbol, job.exchange)

    @property
    def state(self) -> JobState:
        """The job's state as last read."""
        return self._state

    async def run(self, live_tail: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send every event this stream still owes; a fatal error ends it with an ``error`` event.

        ``live_tail`` (follow mode) runs between the snapshot and ``all_complete``.
        """
        try:
            self.check_state(self._state)
            while (action := next_action(self.position, self.request.order)) is not None:
                match action:
                    case Start(index):
                        await self._start(index)
                    case SendChunk(index, prefetch):
                        await self._chunk(index, prefetch=prefetch)
                    case Complete(index):
                        await self._complete(index)
            if live_tail is not None and self.position.is_partial:
                await live_tail()
            await self.finish()
        except StreamOver:
            return
        except StreamError as exc:
            await self.end_with(exc)
        finally:
            for reader in self._readers.values():
                await reader.aclose()
            self._readers.clear()

    # -- the snapshot events ----------------------------------------------

    async def _start(self, index: int) -> None:
        name = self._names[index]
        interval = self.position.intervals[index]
        if not self._payloads.exists[index]:
            interval.phase = Phase.FAILED
            kind = "backtest" if self._job.job_id is None else "job"
            await self._error(
                StreamError(f"Interval '{name}' not found in {kind} configuration"),
                interval=name,
                code="interval_not_found",
            )
            return
        try:
            stored = await self._stored_length(name)
        except DataError as exc:
            await self._fail(index, exc)
            return
        interval.phase = Phase.STARTED
        interval.total_points = min(stored, self.request.limit)
        await self._emit(protocol.INTERVAL_START, self._payloads.interval_start(self.position, self._state, index))

    async def _stored_length(self, name: str) -> int:
        if name in self._failures:
            raise DataError(self._failures[name])
        if self._lengths_fresh and name in self._lengths:
            return self._lengths[name]
        stored = await self._source.length(name)
        self._lengths[name] = stored
        return stored

    async def _chunk(self, index: int, *, prefetch: bool) -> None:
        name = self._names[index]
        interval = self.position.intervals[index]
        reader = self._readers.get(index)
        if reader is None:
            reader = self._source.reader(
                name, interval.points_sent, interval.total_points, self._chunk_size, prefetch=prefetch
            )
            self._readers[index] = reader
        try:
            chunk = await reader.next_chunk()
            self._check_continuity(index, chunk)
        except DataError as exc:
            await self._close_reader(index)
            await self._fail(index, exc)
            return
        self._account(index, chunk)
        is_last = interval.points_sent >= interval.total_points
        if is_last:
            await self._close_reader(index)
        self._lengths_fresh = False
        await self._emit_chunk(index, chunk.points, is_last=is_last)

    async def _emit_chunk(self, index: int, points: bytes, *, is_last: bool) -> None:
        await self._emit(protocol.DATA_CHUNK, self._chunk_payload(index, points, is_last=is_last))

    def _chunk_payload(self, index: int, points: bytes, *, is_last: bool) -> DataChunk:
        return self._payloads.data_chunk(
            self.position, self._state, index, points, is_last=is_last, lengths=self._lengths
        )

    async def _complete(self, index: int) -> None:
        self.position.intervals[index].phase = Phase.COMPLETE
        await self._emit(
            protocol.INTERVAL_COMPLETE, self._payloads.interval_complete(self.position, self._state, index)
        )

    async def finish(self) -> None:
        """``all_complete``: the stream's last event."""
        self.position.finished = True
        self.sending_last_event = True
        await self._emit(protocol.ALL_COMPLETE, self._payloads.all_complete(self.position, self._state))

    # -- what follow mode (follow.py) drives ----------------------------------

    async def send_live_chunk(self, index: int, chunk: Chunk) -> None:
        """A chunk appended after the snapshot: counts continue, ``total_points`` grows with them."""
        name = self._names[index]
        interval = self.position.intervals[index]
        last = self._last_times.get(index)
        if last is not None and chunk.first_time is not None and chunk.first_time <= last:
            await self.fail_live(
                index, DataError(f"candle {interval.points_sent} of interval '{name}' is not after the one before it")
            )
            return
        try:
            self._check_continuity(index, chunk)
        except DataError as exc:
            await self.fail_live(index, exc)
            return
        self._account(index, chunk)
        interval.total_points = interval.points_sent
        await self._emit(protocol.DATA_CHUNK, self._chunk_payload(index, chunk.points, is_last=False))

    async def end_with(self, exc: StreamError) -> None:
        """A fatal error ends the stream with an ``error`` event (a non-fatal one is raised again)."""
        if not exc.fatal:
            raise exc
        self.sending_last_event = True
        await self._error(exc, interval=None)

    async def fail_live(self, index: int, exc: DataError) -> None:
        """A data_error for an interval being followed: no more points for it."""
        await self._fail(index, exc)

    def mark_status_sent_with_snapshot(self) -> None:
        """The snapshot's events already told the client the job's state: no job_status for it."""
        if self.position.job_status is None:
            self.position.job_status = self._state.status
            self.position.current_bar = self._state.current_bar

    def status_changed(self) -> bool:
        """Whether the job's status, bar or backtest id differ from what the client was last told."""
        return (self.position.job_status, self.position.current_bar) != (
            self._state.status,
            self._state.current_bar,
        ) or self._payloads.backtest_id(self._state) != self._told_backtest_id

    async def send_job_status(self) -> None:
        self.position.job_status = self._state.status
        self.position.current_bar = self._state.current_bar
        await self._emit(protocol.JOB_STATUS, self._payloads.job_status(self._state))

    # -- what a follow hub (hub.py) needs ----------------------------------------

    @property
    def first_event_sent(self) -> bool:
        """Whether the connection's first event (the one with ``retry:``) went out."""
        return self._retry_ms is None

    def same_spot(self, other: CandleStream) -> bool:
        """Whether ``other``'s next events are byte for byte this stream's (same request, job, position)."""
        return (
            self._shape == other._shape
            and self._identity == other._identity
            and self.position == other.position
            and self._last_times == other._last_times
            and self._anchors == other._anchors
            and self._went_back == other._went_back
            and self._told_backtest_id == other._told_backtest_id
        )

    def fork(self, send: Send) -> CandleStream:
        """A stream at this one's position and state, writing through ``send`` (a hub's model of its followers).

        It shares the source, and may outlive this stream: follow mode runs on
        running jobs, whose source holds nothing per stream (closing it is a no-op).
        """
        twin = CandleStream(
            self.request,
            Snapshot(job=self._job, lengths=self._lengths, failures=self._failures),
            self._source,
            StreamPosition.start(self.request, is_partial=self.position.is_partial),
            send,
            retry_ms=None,
        )
        twin.adopt(self.mark())
        twin.status_sent_at = self.status_sent_at
        return twin

    def mark(self) -> Mark:
        """Where this stream stands now, kept apart from it."""
        return Mark(
            clone_position(self.position),
            self._state,
            dict(self._last_times),
            dict(self._anchors),
            went_back=self._went_back,
            told_backtest_id=self._told_backtest_id,
        )

    def adopt(self, mark: Mark) -> None:
        """Take over ``mark`` (where a hub's model stood): what it sent went to this stream's client too.

        The continuity anchors travel with it: a group's model checks each
        live read against the element its members were last sent, and a
        member that leaves goes on checking from there.
        """
        copy_position(mark.position, self.position)
        self._state = mark.state
        self._last_times = dict(mark.last_times)
        self._anchors = dict(mark.anchors)
        self._went_back = mark.went_back
        self._told_backtest_id = mark.told_backtest_id

    # -- helpers -------------------------------------------------------------

    def _account(self, index: int, chunk: Chunk) -> None:
        """Adopt what a chunk says of the job, and count it as sent."""
        if chunk.state is not None and not (self._went_back and chunk.state.is_active):
            self.check_state(chunk.state)
        if chunk.last_time is not None:
            self._last_times[index] = chunk.last_time
        interval = self.position.intervals[index]
        if chunk.last is not None:
            self._anchors[index] = chunk.last
            interval.sent_digest = element_digest(chunk.last)
        elif chunk.count:
            # Data that never changes (the warehouse's, for a job whose lists expired
            # since the stream began): the anchor and digest of a list read before
            # would be stale, and a later list read would be checked against them.
            interval.sent_digest = None
            self._anchors.pop(index, None)
        interval.points_sent += chunk.count
        interval.chunks_sent += 1

    def _check_continuity(self, index: int, chunk: Chunk) -> None:
        """``DataError`` if the stored candle before ``chunk`` is not the one this stream sent there.

        Workers never remove or rewrite elements of a running job's list
        (SPEC 6); one that trims its head and appends, or rewrites the list,
        would otherwise shift or mix what every reader gets, in silence. One
        element more per read and one comparison of bytes.
        """
        state = chunk.state
        if state is not None and state.is_active and self._state.status == "completed" and not self._went_back:
            # A completed job's data is final (SPEC 6); the stream keeps the state it started with.
            self._went_back = True
            raise DataError(
                f"job status went back from completed to {state.status} while this stream read it:"
                " a completed job must not change (workers broke the contract)"
            )
        sent = self._anchors.get(index)
        if chunk.before is None or chunk.before == sent:
            return
        name = self._names[index]
        interval = self.position.intervals[index]
        position = interval.points_sent
        if sent is None:
            # Resumed: the element is not in memory, its digest came with the event id.
            if interval.sent_digest is None or element_digest(chunk.before) == interval.sent_digest:
                return
            raise DataError(
                f"interval '{name}' changed before this stream's resume position: the candle at position"
                f" {position - 1} (now the one at {stored_time(chunk.before)}) is not the one this stream sent"
                " there (the list was trimmed, shifted or rewritten); workers must only append to a running job's list"
            )
        was, now = stored_time(sent), stored_time(chunk.before)
        if was == now:
            change = f"the candle at {now} was rewritten (same time, other values)"
        else:
            change = f"it was the candle at {was}, it is now the one at {now} (the list was trimmed or shifted)"
        raise DataError(
            f"interval '{name}' changed under this stream at position {position - 1}: {change};"
            " workers must only append to a running job's list"
        )

    async def _fail(self, index: int, exc: DataError) -> None:
        """A data_error for one interval: it is done, the stream goes on."""
        interval = self.position.intervals[index]
        interval.phase = Phase.FAILED
        await self._error(exc, interval=self._names[index], points_sent=interval.points_sent)

    def check_state(self, state: JobState) -> None:
        """Adopt the job's latest state; a failed or cancelled job ends the stream."""
        self._state = state
        if state.has_failed:
            detail = f": {state.error}" if state.error else ""
            raise JobFailed(f"Job '{self._job.job_id or self._job.backtest_id}' {state.status}{detail}")

    async def _close_reader(self, index: int) -> None:
        reader = self._readers.pop(index, None)
        if reader is not None:
            await reader.aclose()

    async def _error(
        self,
        exc: StreamError,
        *,
        interval: str | None,
        code: str | None = None,
        points_sent: int | None = None,
    ) -> None:
        payload = self._payloads.error(exc, self._state, interval=interval, code=code, points_sent=points_sent)
        await self._emit(protocol.ERROR, payload)

    async def _emit(self, event: bytes, payload: Payload) -> None:
        if event != protocol.DATA_CHUNK:  # every other event names the backtest (as last read)
            self._told_backtest_id = self._payloads.backtest_id(self._state)
        frame = protocol.frame(event, payload, self.position.encode(), self._retry_ms)
        self._retry_ms = None  # only the first event of a connection carries retry
        await self._send(event, frame)


def read_plan(request: StreamRequest, position: StreamPosition | None) -> ReadPlan:
    """What this stream will read, for sources that fetch ahead."""
    starts = {name: 0 for name in request.intervals}
    if position is not None:
        starts = {name: p.points_sent for name, p in zip(request.intervals, position.intervals, strict=True)}
    return ReadPlan(limit=request.limit, chunk_size=request.chunk_size, starts=starts)


async def send_start_error(
    exc: StreamError,
    request: StreamRequest,
    position: StreamPosition,
    send: Send,
    *,
    retry_ms: int | None,
) -> None:
    """The one ``error`` event of a stream that could not start (job not found, ...)."""
    is_backtest = request.is_backtest
    payload = ErrorEvent(
        error=exc.code,
        message=exc.message,
        interval=None,
        job_id=None if is_backtest else request.id,
        backtest_id=request.id if is_backtest else None,
    )
    await send(protocol.ERROR, protocol.frame(protocol.ERROR, payload, position.encode(), retry_ms))


def stored_time(element: bytes) -> str:
    """The ``time`` a stored candle says it has, for a message (as stored, or ``?``)."""
    try:
        time = msgspec.json.decode(element, type=_StoredTime).time
    except (msgspec.DecodeError, RecursionError):
        return "?"
    return time if isinstance(time, str) else "?"


class _StoredTime(msgspec.Struct):
    time: object = None
