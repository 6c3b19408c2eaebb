"""The small typed interface where sources and the stream meet.

A source knows nothing about SSE; the stream knows nothing about Redis
commands or SQL. Sources raise only ``gateway.errors`` exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final, Protocol

import msgspec

ACTIVE_STATUSES: Final = frozenset({"queued", "running", "paused"})
FAILED_STATUSES: Final = frozenset({"failed", "cancelled"})
COMPLETED: Final = "completed"
JOB_STATUSES: Final = ACTIVE_STATUSES | FAILED_STATUSES | {COMPLETED}


class JobState(msgspec.Struct, frozen=True):
    """What changes while a job runs: its status, current bar, error text and the backtest it became."""

    status: str
    current_bar: int | None = None
    error: str | None = None
    # A worker may give a running or completing job its backtest id: read with the
    # state, so a stream's events name it from then on (None: none, or a source without).
    backtest_id: str | None = None

    @property
    def is_active(self) -> bool:
        """More points may still arrive (the SPEC's ``is_partial``)."""
        return self.status in ACTIVE_STATUSES

    @property
    def has_failed(self) -> bool:
        return self.status in FAILED_STATUSES


class JobInfo(msgspec.Struct, frozen=True):
    """What a stream needs to know of a job or backtest before its first event."""

    job_id: str | None
    backtest_id: str | None
    user_id: str
    symbol: str
    exchange: str
    intervals: tuple[str, ...]
    state: JobState


class Chunk(msgspec.Struct, frozen=True):
    """``count`` validated candles as one canonical JSON array."""

    points: bytes
    count: int
    # The job's state read together with the chunk; None if the source has
    # nothing fresher than what it said before.
    state: JobState | None = None
    # Times of the first and last candle, to check order where readers meet.
    first_time: datetime | None = None
    last_time: datetime | None = None
    # The stored element just before the chunk's first point, read in the same
    # LRANGE (None: not read), and the chunk's own last stored element: a stream
    # checks that the one before is still the one it sent there (continuity).
    before: bytes | None = None
    last: bytes | None = None


class TailPlan(msgspec.Struct, frozen=True):
    """Follow mode's look at a running job: also read up to ``count`` points of each interval from ``starts``."""

    starts: Mapping[str, int]
    count: int


class Snapshot(msgspec.Struct, frozen=True):
    """The job and the points stored per requested interval, read at one moment."""

    job: JobInfo
    # Points stored now, for each requested interval the job is configured with.
    lengths: Mapping[str, int]
    # Intervals that could not even be counted, with the reason (a data_error each).
    failures: Mapping[str, str] = msgspec.field(default_factory=dict)
    # With a TailPlan: per interval, its start and the chunk of points stored from there
    # (up to the plan's count; intervals with nothing new or that failed to validate are left out).
    tails: Mapping[str, tuple[int, Chunk]] = msgspec.field(default_factory=dict)


class ReadPlan(msgspec.Struct, frozen=True):
    """What the stream will read, so a source may fetch ahead (the warehouse does)."""

    limit: int
    chunk_size: int
    # The position each interval's reading starts from (non-zero when resuming).
    starts: Mapping[str, int]


class ChunkReader(Protocol):
    """Consecutive chunks of one interval, from a start position to a stop position."""

    async def next_chunk(self) -> Chunk:
        """The next chunk; raises ``DataError`` or ``SourceUnavailable``."""
        ...

    async def aclose(self) -> None:
        """Stop any read in flight and release what the reader holds."""
        ...


class Source(Protocol):
    """A job in Redis, a backtest in the warehouse, or one served from the cache.

    A stream asks in three steps, so that nothing costly happens for a caller
    who may not read the id: ``describe`` (one cheap read: the owner, the
    configured intervals, the state), then the caller authorizes, then
    ``open`` (counts, first pages, read-ahead, cache fills).
    """

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        """Who owns the id and what it holds; raises ``JobNotFound`` or ``SourceUnavailable``."""
        ...

    async def open(self, intervals: Sequence[str], plan: ReadPlan) -> Snapshot:
        """After authorization: count stored points and start reading; only after ``describe``."""
        ...

    async def snapshot(self, intervals: Sequence[str], tails: TailPlan | None = None) -> Snapshot:
        """The job and its stored counts read again now (follow mode's look at a running job).

        With ``tails``, a source may also return the points stored from each
        interval's start in the same read (``Snapshot.tails``); one that does
        not leaves them out and the caller reads chunks as usual.
        """
        ...

    async def length(self, interval: str) -> int:
        """Points stored now for one configured interval; ``DataError`` if it cannot be counted."""
        ...

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        """Chunks of positions ``start`` to ``stop`` (exclusive), ``chunk_size`` each but the last."""
        ...

    async def aclose(self) -> None:
        """Release what the source holds for this stream."""
        ...
