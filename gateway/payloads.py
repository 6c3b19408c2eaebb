"""Every event's payload (SPEC 3), built from what the stream knows at that moment: pure, no I/O.

``stream.py`` decides *when* an event goes out and keeps the position and
the job's state; this module says *what* each event holds, so the rules of
the payloads (totals, chunk counts, progress, which intervals count as
completed) live in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from gateway.errors import StreamError
from gateway.params import StreamRequest
from gateway.position import Phase, StreamPosition
from gateway.protocol import (
    AllComplete,
    DataChunk,
    ErrorEvent,
    IntervalComplete,
    IntervalProgress,
    IntervalStart,
    JobStatusEvent,
    Progress,
)
from gateway.sources.base import JobInfo, JobState


class Payloads:
    """Builds the payloads of one stream's events."""

    def __init__(self, request: StreamRequest, job: JobInfo) -> None:
        self._request = request
        self._job = job
        self._names = request.intervals
        self._chunk_size = request.chunk_size
        # Which requested intervals the job is configured with.
        self.exists = tuple(name in job.intervals for name in request.intervals)

    def interval_start(self, position: StreamPosition, state: JobState, index: int) -> IntervalStart:
        total = position.intervals[index].total_points
        job = self._job
        return IntervalStart(
            interval=self._names[index],
            interval_index=index,
            total_intervals=len(self._names),
            total_points=total,
            total_chunks=math.ceil(total / self._chunk_size),
            chunk_size=self._chunk_size,
            backtest_id=self.backtest_id(state),
            job_id=job.job_id,
            symbol=job.symbol,
            exchange=job.exchange,
            is_partial=position.is_partial,
            current_bar=state.current_bar,
            job_status=state.status,
        )

    def data_chunk(
        self,
        position: StreamPosition,
        state: JobState,
        index: int,
        points: bytes,
        *,
        is_last: bool,
        lengths: Mapping[str, int],
    ) -> DataChunk:
        """A chunk already counted in ``position``; ``lengths`` counts the intervals not started yet."""
        interval = position.intervals[index]
        return DataChunk(
            interval=self._names[index],
            data_points=msgspec.Raw(points),
            points_sent=interval.points_sent,
            total_points=interval.total_points,
            chunk_index=interval.chunks_sent - 1,
            is_last_chunk=is_last,
            is_partial=position.is_partial,
            current_bar=state.current_bar,
            job_status=state.status,
            progress=self._progress(position, self._names[index], lengths),
        )

    def interval_complete(self, position: StreamPosition, state: JobState, index: int) -> IntervalComplete:
        interval = position.intervals[index]
        return IntervalComplete(
            interval=self._names[index],
            total_points=interval.total_points,
            points_sent=interval.points_sent,
            backtest_id=self.backtest_id(state),
            job_id=self._job.job_id,
            is_partial=position.is_partial,
            job_status=state.status,
        )

    def all_complete(self, position: StreamPosition, state: JobState) -> AllComplete:
        return AllComplete(
            intervals=list(self._names),
            completed_intervals=self._completed(position),
            total_points={
                name: interval.total_points
                for name, interval, exists in zip(self._names, position.intervals, self.exists, strict=True)
                if exists
            },
            backtest_id=self.backtest_id(state),
            job_id=self._job.job_id,
            job_status=state.status,
        )

    def job_status(self, state: JobState) -> JobStatusEvent:
        return JobStatusEvent(
            job_id=self._job.job_id,
            backtest_id=self.backtest_id(state),
            job_status=state.status,
            current_bar=state.current_bar,
            is_partial=state.is_active,
        )

    def error(
        self,
        exc: StreamError,
        state: JobState,
        *,
        interval: str | None,
        code: str | None = None,
        points_sent: int | None = None,
    ) -> ErrorEvent:
        return ErrorEvent(
            error=code or exc.code,
            message=exc.message,
            interval=interval,
            job_id=self._job.job_id,
            backtest_id=self.backtest_id(state),
            points_sent=points_sent,
        )

    def backtest_id(self, state: JobState) -> str | None:
        """The backtest the job became, as last read (a worker may set it while the job runs or completes)."""
        return state.backtest_id or self._job.backtest_id

    def _progress(self, position: StreamPosition, current: str, lengths: Mapping[str, int]) -> Progress:
        overall: dict[str, IntervalProgress] = {}
        for name, interval, exists in zip(self._names, position.intervals, self.exists, strict=True):
            if not exists:
                continue
            if interval.phase is Phase.PENDING:
                total = min(lengths.get(name, 0), self._request.limit)
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
            completed_intervals=self._completed(position),
            current_interval=current,
            overall_progress=overall,
        )

    def _completed(self, position: StreamPosition) -> list[str]:
        return [
            name
            for name, interval in zip(self._names, position.intervals, strict=True)
            if interval.phase is Phase.COMPLETE
        ]
