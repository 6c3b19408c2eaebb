"""Follow mode (SPEC 6): after the snapshot, send what workers append until the job ends.

The tail runs on a ``CandleStream`` whose snapshot is complete: it looks at
the job whenever its ``LiveFeed`` wakes it (a worker's note, or the job's
re-check found a change), sends every new point in chunks that continue each
interval's counts, and sends coalesced ``job_status`` events. It returns
when the job is completed (the stream then sends ``all_complete``); a failed
or cancelled job ends the stream with ``job_error`` through ``check_state``.

Reads, and the frames built from them, are shared with the job's other
followers (``live.py``). A read that finds every connection busy
(``RedisBusy``) is tried again after a pause: the follower keeps its stream.
Redis being unreachable still ends it with ``connection_error`` (SPEC 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Final, Protocol, TypeVar

from gateway.broadcast import Leave, Seat
from gateway.errors import DataError
from gateway.position import Phase
from gateway.redis_client import RedisBusy
from gateway.sources.base import Chunk, Snapshot, Source, TailPlan
from gateway.stream import CandleStream, FrameStore, StreamOver

T = TypeVar("T")
log = logging.getLogger(__name__)

# Pauses of a follower whose read found the pool busy: first, and longest.
_BUSY_PAUSE_S: Final = (0.05, 1.0)


class LiveFeed(Protocol):
    """What follow mode needs: wait for the job to change, then look again."""

    async def wait_for_change(self) -> None:
        """Return when a worker note arrives or the re-check timer fires."""
        ...

    async def shared(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or an identical read that another follower of the job started since the last wake-up."""
        ...

    @property
    def frames(self) -> FrameStore:
        """Encoded events shared by the job's followers."""
        ...

    async def ride(self, stream: CandleStream, seat: Seat, lead: LeadWith) -> Leave | None:
        """Wait for changes riding a cohort of the job's followers (``broadcast.py``); None if it cannot board now."""
        ...

    def watch(self, key: Hashable, probe: Callable[[], Awaitable[object]]) -> None:
        """Have the job's re-check run ``probe`` (the shared read under ``key``) and wake us when it changes."""
        ...

    def looked(self) -> None:
        """A look is over and its events were handed to the sockets (for the note-to-written metric)."""
        ...

    def unwatch(self, key: Hashable) -> None:
        """Undo ``watch``."""
        ...


# Runs a cohort's leader stream (a fork of the boarding stream) on a feed of its own.
LeadWith = Callable[[CandleStream, "LiveFeed"], Awaitable[None]]


class LiveTail:
    """The live part of one follow stream.

    With a ``seat`` (the stream's response and watch), a caught-up stream
    rides a cohort instead of waiting on its own (``broadcast.py``): the
    cohort's leader, itself a ``LiveTail`` without a seat, writes the events
    to every rider's socket, until the stream ends or the rider falls behind
    and goes on here.
    """

    def __init__(
        self,
        stream: CandleStream,
        source: Source,
        feed: LiveFeed,
        *,
        status_min_interval_s: float,
        seat: Seat | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._source = source
        self._feed = feed
        self._status_min_interval_s = status_min_interval_s
        self._seat = seat
        self._clock = clock

    async def run(self, *, caught_up: bool = False) -> None:
        """Send new points and status changes until the job is no longer active.

        ``caught_up``: the stream has everything its feed did not wake it for
        (a cohort's new leader; a new stream of a job the process already
        heard): wait for a change, riding a cohort if it can, before the
        first look.
        """
        stream = self._stream
        names = stream.request.intervals
        key = ("snapshot", names)
        read_snapshot = partial(self._source.snapshot, names)
        stream.mark_status_sent_with_snapshot()
        stream.share_frames(self._feed.frames)
        self._feed.watch(key, read_snapshot)
        try:
            if caught_up:
                await self._wait_for_change()
            await self._follow(key)
        finally:
            self._feed.unwatch(key)

    async def _lead(self, leader: CandleStream, feed: LiveFeed) -> None:
        """Run a cohort's leader: this tail's settings, the leader's stream and feed, no seat."""
        tail = LiveTail(
            leader, self._source, feed, status_min_interval_s=self._status_min_interval_s, clock=self._clock
        )
        await leader.run(live_tail=partial(tail.run, caught_up=True))

    async def _wait_for_change(self) -> None:
        """Wait for the job to change: riding a cohort when the stream can, else on this task."""
        # Python 3.11's asyncio.wait_for, which redis-py wraps around every socket
        # write (on a cluster's connections still; redis_client.InPlaceWriteConnection
        # elsewhere), can swallow a cancellation that lands as the write completes
        # (bpo-42130). A client that went away during a look would leave its stream
        # parked here, holding its slot, until a ping found the socket closed.
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise asyncio.CancelledError
        if self._seat is not None:
            left = await self._feed.ride(self._stream, self._seat, self._lead)
            if left is Leave.GONE:
                raise ConnectionResetError("the client's connection closed")
            if left is Leave.ENDED or left is Leave.BEHIND:
                await self._seat.response.wait_until_drained()
            if left is Leave.ENDED:
                raise StreamOver
            if left is not None:
                return  # SET_DOWN or BEHIND: look again on this task
        await self._feed.wait_for_change()

    async def _follow(self, key: Hashable) -> None:
        stream = self._stream
        pause = _BUSY_PAUSE_S[0]
        while True:
            try:
                snapshot = await self._look(key)
                stream.check_state(snapshot.job.state)
                for index in range(len(stream.request.intervals)):
                    await self._catch_up(index, snapshot)
            except RedisBusy:
                # Every connection is taken (a burst of new streams): Redis is
                # fine, so keep the stream and look again shortly.
                log.info("follower of %s waits for a free Redis connection", stream.request.id)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _BUSY_PAUSE_S[1])
                continue
            pause = _BUSY_PAUSE_S[0]
            if not snapshot.job.state.is_active:
                # Completed when the lengths were read, so they were final and all is sent.
                # (Not the stream's state: a chunk read may have seen "completed" after
                # this snapshot counted, with points appended in between still unsent.)
                return
            held_back = math.inf
            if stream.status_changed():
                now = self._clock()
                if now - stream.status_sent_at >= self._status_min_interval_s:
                    stream.status_sent_at = now
                    await stream.send_job_status()
                else:  # coalesced: send it when the interval is over, change or not
                    held_back = stream.status_sent_at + self._status_min_interval_s - now
            stream.round_over()
            self._feed.looked()
            if held_back == math.inf:
                await self._wait_for_change()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._feed.wait_for_change(), held_back)

    async def _look(self, key: Hashable) -> Snapshot:
        """The job, its counts and, in the same round trip, up to a chunk of each live interval's new points.

        Every follower of the job at this position woken by the same note shares the read.
        """
        stream = self._stream
        starts = {
            name: interval.points_sent
            for name, interval in zip(stream.request.intervals, stream.position.intervals, strict=True)
            if interval.phase is Phase.COMPLETE
        }
        plan = TailPlan(starts=starts, count=stream.request.chunk_size)
        read = partial(self._source.snapshot, stream.request.intervals, plan)
        return await self._feed.shared((key, tuple(starts.items())), read)

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
        tail = snapshot.tails.get(name)  # the first chunk, if the look read it along
        while interval.phase is Phase.COMPLETE and interval.points_sent < stop:
            start = interval.points_sent
            count = min(chunk_size, stop - start)
            if tail is not None and tail[0] == start and tail[1].count == count:
                chunk, tail = tail[1], None
            else:
                try:
                    chunk = await self._feed.shared(
                        ("chunk", name, start, count), partial(self._read, name, start, count)
                    )
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
