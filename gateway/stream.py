"""One request's walk through its intervals: events, chunks, progress, resume.

The next event is always derived from the stream's position (``position.py``)
and nothing else, so a fresh stream and a stream resumed from an event id run
the very same code: resuming cannot drift from the uninterrupted stream. The
walk knows nothing of Redis or SQL (it asks a ``Source``) and nothing of
HTTP (it hands finished frames to ``send``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from functools import partial
from typing import Protocol, TypeVar

import msgspec

from gateway import protocol
from gateway.errors import DataError, JobFailed, StreamError
from gateway.params import Order, StreamRequest
from gateway.position import IntervalPosition, Phase, StreamPosition
from gateway.protocol import (
    AllComplete,
    DataChunk,
    ErrorEvent,
    IntervalComplete,
    IntervalProgress,
    IntervalStart,
    JobStatusEvent,
    Payload,
    Progress,
)
from gateway.sources.base import Chunk, ChunkReader, JobState, ReadPlan, Snapshot, Source

Send = Callable[[bytes], Awaitable[None]]
T = TypeVar("T")


class LiveFeed(Protocol):
    """What follow mode needs: wait for the job to change, then look again."""

    async def wait_for_change(self) -> None:
        """Return when a worker note arrives or the re-check timer fires."""
        ...

    async def shared(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or an identical read that another follower of the job started since the last wake-up."""
        ...


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
        live: LiveFeed | None = None,
        status_min_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._request = request
        job = snapshot.job
        self._job = job
        self._state = job.state
        self._failures = snapshot.failures
        self._source = source
        self._position = position
        self._send = send
        self._retry_ms = retry_ms
        self._live = live
        self._status_min_interval_s = status_min_interval_s
        self._chunk_size = request.chunk_size
        self._names = request.intervals
        self._exists = [name in job.intervals for name in request.intervals]
        # Stored lengths read with the job; an interval that starts before any
        # chunk has been sent may use them, later ones count again.
        self._lengths = dict(snapshot.lengths)
        self._lengths_fresh = True
        self._readers: dict[int, ChunkReader] = {}
        # Time of the last candle sent per interval: live chunks must come after it.
        self._last_times: dict[int, datetime] = {}
        self._clock = clock

    async def run(self) -> None:
        """Send every event this stream still owes; a fatal error ends it with an ``error`` event."""
        try:
            self._observe(self._state)
            while (step := self._next_step()) is not None:
                await step
            if self._live is not None and self._position.is_partial:
                await self._follow()
            await self._finish()
        except StreamError as exc:
            if exc.fatal:
                await self._error(exc, interval=None)
            else:
                raise
        finally:
            for reader in self._readers.values():
                await reader.aclose()
            self._readers.clear()

    # -- choosing the next event ------------------------------------------

    def _next_step(self) -> Awaitable[None] | None:
        """The coroutine that sends the next snapshot event, or None when the snapshot is done."""
        if self._request.order is Order.SEQUENTIAL:
            return self._next_sequential()
        return self._next_interleaved()

    def _next_sequential(self) -> Awaitable[None] | None:
        for index, interval in enumerate(self._position.intervals):
            if interval.phase is Phase.PENDING:
                return self._start(index)
            if interval.phase is Phase.STARTED:
                if interval.points_sent < interval.total_points:
                    return self._chunk(index, prefetch=True)
                return self._complete(index)
        return None

    def _next_interleaved(self) -> Awaitable[None] | None:
        intervals = self._position.intervals
        # First every interval_start (or interval_not_found), in request order.
        for index, interval in enumerate(intervals):
            if interval.phase is Phase.PENDING:
                return self._start(index)
        started = [i for i, interval in enumerate(intervals) if interval.phase is Phase.STARTED]
        if not started:
            return None
        # An interval whose last chunk just went out completes before anything else.
        for index in started:
            interval = intervals[index]
            if interval.chunks_sent and interval.points_sent >= interval.total_points:
                return self._complete(index)
        # Round robin: unfinished intervals have sent r or r + 1 chunks; the
        # first (in request order) still at r is next.
        fewest = min(intervals[index].chunks_sent for index in started)
        index = next(i for i in started if intervals[i].chunks_sent == fewest)
        if intervals[index].points_sent < intervals[index].total_points:
            # No read-ahead: the next chunk of this interval is a whole round away.
            return self._chunk(index, prefetch=False)
        return self._complete(index)

    # -- the snapshot events ----------------------------------------------

    async def _start(self, index: int) -> None:
        name = self._names[index]
        interval = self._position.intervals[index]
        if not self._exists[index]:
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
        total = min(stored, self._request.limit)
        interval.phase = Phase.STARTED
        interval.total_points = total
        job = self._job
        await self._emit(
            protocol.INTERVAL_START,
            IntervalStart(
                interval=name,
                interval_index=index,
                total_intervals=len(self._names),
                total_points=total,
                total_chunks=math.ceil(total / self._chunk_size),
                chunk_size=self._chunk_size,
                backtest_id=job.backtest_id,
                job_id=job.job_id,
                symbol=job.symbol,
                exchange=job.exchange,
                is_partial=self._position.is_partial,
                current_bar=self._state.current_bar,
                job_status=self._state.status,
            ),
        )

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
        interval = self._position.intervals[index]
        reader = self._readers.get(index)
        if reader is None:
            reader = self._source.reader(
                name, interval.points_sent, interval.total_points, self._chunk_size, prefetch=prefetch
            )
            self._readers[index] = reader
        try:
            chunk = await reader.next_chunk()
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
        interval = self._position.intervals[index]
        await self._emit(
            protocol.DATA_CHUNK,
            DataChunk(
                interval=self._names[index],
                data_points=msgspec.Raw(points),
                points_sent=interval.points_sent,
                total_points=interval.total_points,
                chunk_index=interval.chunks_sent - 1,
                is_last_chunk=is_last,
                is_partial=self._position.is_partial,
                current_bar=self._state.current_bar,
                job_status=self._state.status,
                progress=self._progress(self._names[index]),
            ),
        )

    async def _complete(self, index: int) -> None:
        interval = self._position.intervals[index]
        interval.phase = Phase.COMPLETE
        await self._emit(
            protocol.INTERVAL_COMPLETE,
            IntervalComplete(
                interval=self._names[index],
                total_points=interval.total_points,
                points_sent=interval.points_sent,
                backtest_id=self._job.backtest_id,
                job_id=self._job.job_id,
                is_partial=self._position.is_partial,
                job_status=self._state.status,
            ),
        )

    async def _finish(self) -> None:
        self._position.finished = True
        await self._emit(
            protocol.ALL_COMPLETE,
            AllComplete(
                intervals=list(self._names),
                completed_intervals=self._completed(),
                total_points={
                    name: interval.total_points for name, interval, exists in self._each_interval() if exists
                },
                backtest_id=self._job.backtest_id,
                job_id=self._job.job_id,
                job_status=self._state.status,
            ),
        )

    # -- follow mode (SPEC 6) ----------------------------------------------

    async def _follow(self) -> None:
        """After the snapshot: send what workers append until the job completes or fails."""
        assert self._live is not None
        last_status_at = -math.inf
        if self._position.job_status is None:
            # The snapshot's events already told the client this state.
            self._position.job_status = self._state.status
            self._position.current_bar = self._state.current_bar
        while True:
            # Every follower of the job woken by the same note shares this read.
            snapshot = await self._live.shared(("snapshot", self._names), partial(self._source.snapshot, self._names))
            self._observe(snapshot.job.state)
            for index, name in enumerate(self._names):
                await self._send_live_points(index, snapshot.lengths.get(name, 0))
            if not self._state.is_active:
                return  # completed: everything stored has been sent
            now = self._clock()
            if self._status_changed() and now - last_status_at >= self._status_min_interval_s:
                last_status_at = now
                await self._job_status()
            await self._live.wait_for_change()

    async def _send_live_points(self, index: int, stored: int) -> None:
        assert self._live is not None
        name = self._names[index]
        interval = self._position.intervals[index]
        stop = min(stored, self._request.limit)
        while interval.phase is Phase.COMPLETE and interval.points_sent < stop:
            start = interval.points_sent
            count = min(self._chunk_size, stop - start)
            try:
                chunk = await self._live.shared(
                    ("chunk", name, start, count), partial(self._read_once, name, start, count)
                )
                last = self._last_times.get(index)
                if last is not None and chunk.first_time is not None and chunk.first_time <= last:
                    raise DataError(f"candle {start} of interval '{name}' is not after the one before it")
            except DataError as exc:
                await self._fail(index, exc)
                return
            self._account(index, chunk)
            interval.total_points = interval.points_sent
            await self._emit_chunk(index, chunk.points, is_last=False)

    async def _read_once(self, name: str, start: int, count: int) -> Chunk:
        reader = self._source.reader(name, start, start + count, count, prefetch=False)
        try:
            return await reader.next_chunk()
        finally:
            await reader.aclose()

    def _status_changed(self) -> bool:
        return (self._position.job_status, self._position.current_bar) != (
            self._state.status,
            self._state.current_bar,
        )

    async def _job_status(self) -> None:
        self._position.job_status = self._state.status
        self._position.current_bar = self._state.current_bar
        await self._emit(
            protocol.JOB_STATUS,
            JobStatusEvent(
                job_id=self._job.job_id,
                backtest_id=self._job.backtest_id,
                job_status=self._state.status,
                current_bar=self._state.current_bar,
                is_partial=self._state.is_active,
            ),
        )

    # -- helpers -------------------------------------------------------------

    def _account(self, index: int, chunk: Chunk) -> None:
        """Adopt what a chunk says of the job, and count it as sent."""
        if chunk.state is not None:
            self._observe(chunk.state)
        if chunk.last_time is not None:
            self._last_times[index] = chunk.last_time
        interval = self._position.intervals[index]
        interval.points_sent += chunk.count
        interval.chunks_sent += 1

    async def _fail(self, index: int, exc: DataError) -> None:
        """A data_error for one interval: it is done, the stream goes on."""
        interval = self._position.intervals[index]
        interval.phase = Phase.FAILED
        await self._error(exc, interval=self._names[index], points_sent=interval.points_sent)

    def _observe(self, state: JobState) -> None:
        """Adopt the job's latest state; a failed or cancelled job ends the stream."""
        self._state = state
        if state.has_failed:
            detail = f": {state.error}" if state.error else ""
            raise JobFailed(f"Job '{self._job.job_id or self._job.backtest_id}' {state.status}{detail}")

    def _progress(self, current: str) -> Progress:
        overall: dict[str, IntervalProgress] = {}
        for name, interval, exists in self._each_interval():
            if not exists:
                continue
            if interval.phase is Phase.PENDING:
                total = min(self._lengths.get(name, 0), self._request.limit)
                overall[name] = IntervalProgress(total, math.ceil(total / self._chunk_size), 0, 0)
            else:
                total_chunks = (
                    interval.chunks_sent
                    if interval.phase is Phase.COMPLETE
                    else math.ceil(interval.total_points / self._chunk_size)
                )
                overall[name] = IntervalProgress(
                    interval.total_points, total_chunks, interval.chunks_sent, interval.points_sent
                )
        return Progress(
            total_intervals=len(self._names),
            completed_intervals=self._completed(),
            current_interval=current,
            overall_progress=overall,
        )

    def _completed(self) -> list[str]:
        return [name for name, interval, _ in self._each_interval() if interval.phase is Phase.COMPLETE]

    def _each_interval(self) -> list[tuple[str, IntervalPosition, bool]]:
        return list(zip(self._names, self._position.intervals, self._exists, strict=True))

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
        await self._emit(
            protocol.ERROR,
            ErrorEvent(
                error=code or exc.code,
                message=exc.message,
                interval=interval,
                job_id=self._job.job_id,
                backtest_id=self._job.backtest_id,
                points_sent=points_sent,
            ),
        )

    async def _emit(self, event: bytes, payload: Payload) -> None:
        frame = protocol.frame(event, payload, self._position.encode(), self._retry_ms)
        self._retry_ms = None  # only the first event of a connection carries retry
        await self._send(frame)


def read_plan(request: StreamRequest, position: StreamPosition | None) -> ReadPlan:
    """What this stream will read, for sources that fetch ahead."""
    starts = {name: 0 for name in request.intervals}
    if position is not None:
        starts = {name: p.points_sent for name, p in zip(request.intervals, position.intervals, strict=True)}
    return ReadPlan(limit=request.limit, chunk_size=request.chunk_size, starts=starts)


async def send_fatal(
    exc: StreamError,
    request: StreamRequest,
    position: StreamPosition,
    send: Send,
    *,
    retry_ms: int | None,
) -> None:
    """An ``error`` event for a stream that could not even start (job not found, ...)."""
    is_backtest = request.is_backtest
    payload = ErrorEvent(
        error=exc.code,
        message=exc.message,
        interval=None,
        job_id=None if is_backtest else request.id,
        backtest_id=request.id if is_backtest else None,
    )
    await send(protocol.frame(protocol.ERROR, payload, position.encode(), retry_ms))
