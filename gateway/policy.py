"""The ordering policy (SPEC 7): which snapshot event a stream owes next, as a pure function.

``next_action`` looks at the stream's position and nothing else, so a fresh
stream and one resumed from an event id take the very same path, and the
policy is tested without any I/O (tests/test_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.params import Order
from gateway.position import Phase, StreamPosition


@dataclass(frozen=True, slots=True)
class Start:
    """Send the interval's ``interval_start`` (or its ``interval_not_found``)."""

    index: int


@dataclass(frozen=True, slots=True)
class SendChunk:
    """Send the interval's next ``data_chunk``; ``prefetch``: read the following one ahead."""

    index: int
    prefetch: bool


@dataclass(frozen=True, slots=True)
class Complete:
    """Send the interval's ``interval_complete``."""

    index: int


Action = Start | SendChunk | Complete


def next_action(position: StreamPosition, order: Order) -> Action | None:
    """The next snapshot event, or None once every interval is complete or failed."""
    if order is Order.SEQUENTIAL:
        return _next_sequential(position)
    return _next_interleaved(position)


def _next_sequential(position: StreamPosition) -> Action | None:
    for index, interval in enumerate(position.intervals):
        if interval.phase is Phase.PENDING:
            return Start(index)
        if interval.phase is Phase.STARTED:
            if interval.points_sent < interval.total_points:
                return SendChunk(index, prefetch=True)
            return Complete(index)
    return None


def _next_interleaved(position: StreamPosition) -> Action | None:
    intervals = position.intervals
    # First every interval_start (or interval_not_found), in request order.
    for index, interval in enumerate(intervals):
        if interval.phase is Phase.PENDING:
            return Start(index)
    started = [i for i, interval in enumerate(intervals) if interval.phase is Phase.STARTED]
    if not started:
        return None
    # An interval whose last chunk just went out completes before anything else.
    for index in started:
        interval = intervals[index]
        if interval.chunks_sent and interval.points_sent >= interval.total_points:
            return Complete(index)
    # Round robin: unfinished intervals have sent r or r + 1 chunks; the
    # first (in request order) still at r is next.
    fewest = min(intervals[index].chunks_sent for index in started)
    index = next(i for i in started if intervals[i].chunks_sent == fewest)
    if intervals[index].points_sent < intervals[index].total_points:
        # No read-ahead: the next chunk of this interval is a whole round away.
        return SendChunk(index, prefetch=False)
    return Complete(index)
