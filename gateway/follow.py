"""Follow mode (SPEC 6): after the snapshot, send what workers append until the job ends.

The tail runs on a ``CandleStream`` whose snapshot is complete: it looks at
the job whenever its ``LiveFeed`` wakes it (a worker's note, or the re-check
timer), sends every new point in chunks that continue each interval's
counts, and sends coalesced ``job_status`` events. It returns when the job
is completed (the stream then sends ``all_complete``); a failed or
cancelled job ends the stream with ``job_error`` through ``check_state``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Protocol, TypeVar

from gateway.errors import DataError
from gateway.position import Phase
from gateway.sources.base import Chunk, Snapshot, Source
from gateway.stream import CandleStream

T = TypeVar("T")


class LiveFeed(Protocol):
    """What follow mode needs: wait for the job to change, then look again."""

    async def wait_for_change(self) -> None:
        """Return when a worker note arrives or the re-check timer fires."""
        ...

    async def shared(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or an identical read that another follower of the job started since the last wake-up."""
        ...


class LiveTail:
    """The live part of one follow stream."""

    def __init__(
        self,
        stream: CandleStream,
        source: Source,
        feed: LiveFeed,
        *,
        status_min_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._source = source
        self._feed = feed
        self._status_min_interval_s = status_min_interval_s
        self._clock = clock

    async def run(self) -> None:
        """Send new points and status changes until the job is no longer active."""
        stream = self._stream
        names = stream.request.intervals
        last_status_at = -math.inf
        stream.mark_status_sent_with_snapshot()
        while True:
            # Every follower of the job woken by the same note shares this read.
            snapshot = await self._feed.shared(("snapshot", names), partial(self._source.snapshot, names))
            stream.check_state(snapshot.job.state)
            for index in range(len(names)):
                await self._catch_up(index, snapshot)
            if not stream.state.is_active:
                return  # completed: everything stored has been sent
            now = self._clock()
            if stream.status_changed() and now - last_status_at >= self._status_min_interval_s:
                last_status_at = now
                await stream.send_job_status()
            await self._feed.wait_for_change()

    async def _catch_up(self, index: int, snapshot: Snapshot) -> None:
        """Send what was appended to one interval since it was last looked at."""
        stream = self._stream
        name = stream.request.intervals[index]
        interval = stream.position.intervals[index]
        if interval.phase is not Phase.COMPLETE:
            return  # failed or not found: nothing more for this interval
        if name in snapshot.failures:
            await stream.fail_live(index, DataError(snapshot.failures[name]))
            return
        stored = snapshot.lengths.get(name, 0)
        if stored < interval.points_sent:
            # Workers never remove elements while a job runs (SPEC 6): a
            # shorter list means points were lost; never skip them silently.
            await stream.fail_live(
                index,
                DataError(
                    f"interval '{name}' holds {stored} points, fewer than the"
                    f" {interval.points_sent} already sent: the list was cut or rewritten"
                ),
            )
            return
        stop = min(stored, stream.request.limit)
        chunk_size = stream.request.chunk_size
        while interval.phase is Phase.COMPLETE and interval.points_sent < stop:
            start = interval.points_sent
            count = min(chunk_size, stop - start)
            try:
                chunk = await self._feed.shared(("chunk", name, start, count), partial(self._read, name, start, count))
            except DataError as exc:
                await stream.fail_live(index, exc)
                return
            await stream.send_live_chunk(index, chunk)

    async def _read(self, name: str, start: int, count: int) -> Chunk:
        reader = self._source.reader(name, start, start + count, count, prefetch=False)
        try:
            return await reader.next_chunk()
        finally:
            await reader.aclose()
