"""Follow mode (SPEC 6): after the snapshot, send what workers append until the job ends.

A follow stream sends its snapshot on its own task, then hands itself to
its job's hub (``hub.py``) and waits: the hub looks at the job for all its
followers and writes the events. This module holds both halves:

- ``follow_live``, the stream's side: join the hub, and after leaving it
  (fell behind, or the job's end went out) do what the protocol asks;
- ``look``, what the hub does for one group of followers that stand at one
  spot: read the job, its counts and, in the same round trip, up to a chunk
  of each live interval's new points; send every new point in chunks that
  continue each interval's counts; send coalesced ``job_status`` events.

A failed or cancelled job ends the stream with ``job_error`` through
``check_state``; Redis being unreachable ends it with ``connection_error``
(SPEC 5).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import DataError
from gateway.position import Phase
from gateway.redis_client import raise_if_cancelling
from gateway.sources.base import Chunk, Snapshot, Source, TailPlan
from gateway.stream import CandleStream, StreamOver

if TYPE_CHECKING:
    from gateway.hub import Hub
    from gateway.observe import StreamWatch
    from gateway.sse import CandleEventResponse

T = TypeVar("T")


async def follow_live(
    stream: CandleStream,
    hub: Hub,
    source: Source,
    response: CandleEventResponse,
    watch: StreamWatch,
    heard_at: int | None,
) -> None:
    """The live part of one follow stream: in its job's hub until the stream is over.

    ``heard_at``: the hub's count of notes when the stream registered, if it
    registered before it read its snapshot (``JobNotes.hears``).
    """
    from gateway.hub import Leave

    stream.mark_status_sent_with_snapshot()
    response.bound_send_buffer()  # a follower lives long: its kernel buffer stays small
    while True:
        # A client that went away during the snapshot must not park here (raise_if_cancelling).
        raise_if_cancelling()
        left = await hub.follow(stream, source, response, watch, heard_at)
        heard_at = None
        if left is Leave.GONE:
            raise ConnectionResetError("the client's connection closed")
        if left is Leave.STOPPED:
            raise RuntimeError("the job's follow hub stopped")
        await response.drained()  # the client read what the hub wrote (the heartbeat cuts off a stall)
        if left is Leave.ENDED:
            raise StreamOver
        # BEHIND: it caught up with its socket; the hub looks again for it when it rejoins.


class Reads:
    """One pass of a hub: each read done once for every group that asks, through the process's gate."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self._gate = gate
        self._done: dict[Hashable, Any] = {}

    async def read(self, key: Hashable, read: Callable[[], Awaitable[T]], *, gated: bool = True) -> T:
        if key in self._done:
            result: T = self._done[key]
            return result
        if not gated:  # it bounds its own round trips (a job's look: sources/batch.py)
            result = await read()
        else:
            async with self._gate:  # waiting here holds no Redis connection
                result = await read()
        self._done[key] = result
        return result


async def look(stream: CandleStream, source: Source, reads: Reads, status_min_interval_s: float, now: float) -> float:
    """Send what is new for ``stream``; when a held-back ``job_status`` is due (inf if none; -inf: the job ended).

    At -inf everything was sent: the lengths were read with a completed
    job, so they were final. (Not the stream's state: a chunk read may have
    seen "completed" after the look counted, with points appended in between
    still unsent.)
    """
    names = stream.request.intervals
    starts = {
        name: interval.points_sent
        for name, interval in zip(names, stream.position.intervals, strict=True)
        if interval.phase is Phase.COMPLETE
    }
    plan = TailPlan(starts=starts, count=stream.request.chunk_size)
    # Not through the gate: the looks of every job woken in one loop turn go to Redis as one
    # pipeline, a few of them in flight at most (sources/batch.py), so a burst of notes costs
    # a round trip, not one per job queued sixteen at a time.
    snapshot = await reads.read(
        ("snapshot", names, tuple(starts.items())), partial(source.snapshot, names, plan), gated=False
    )
    stream.check_state(snapshot.job.state)
    for index in range(len(names)):
        await _catch_up(stream, source, reads, index, snapshot)
    if not snapshot.job.state.is_active:
        return -math.inf
    if not stream.status_changed():
        return math.inf
    if now - stream.status_sent_at >= status_min_interval_s:
        stream.status_sent_at = now
        await stream.send_job_status()
        return math.inf
    return stream.status_sent_at + status_min_interval_s  # coalesced: sent then, change or not


async def _catch_up(stream: CandleStream, source: Source, reads: Reads, index: int, snapshot: Snapshot) -> None:
    """Send what was appended to one interval since it was last looked at."""
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
                chunk = await reads.read(("chunk", name, start, count), partial(_read, source, name, start, count))
            except DataError as exc:
                await stream.fail_live(index, exc)
                return
        await stream.send_live_chunk(index, chunk)


async def _read(source: Source, name: str, start: int, count: int) -> Chunk:
    reader = source.reader(name, start, start + count, count, prefetch=False)
    try:
        return await reader.next_chunk()
    finally:
        await reader.aclose()
