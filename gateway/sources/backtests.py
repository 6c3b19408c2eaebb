"""Completed backtests: every stream reads the Redis cache; the warehouse fills it once per interval.

``describe`` reads the metadata alone (cache, else one warehouse lookup):
nothing else is read before the caller is authorized. ``open`` then counts
the complete intervals in the cache, and for each other requested interval
joins (or starts) the one warehouse read that fills it (``cache.py``) and
waits for its row count, which that read learns with its first page. Every
chunk is one chunk-sized ``LRANGE``: of the final list when the interval is
cached, of the staging list as it grows when it is being filled. So a cold
stream holds a few chunks per interval being sent, never a warehouse page,
and a stream of a cached interval queries nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from gateway import metrics
from gateway.errors import DataError
from gateway.sources.base import COMPLETED, ChunkReader, JobInfo, JobState, ReadPlan, Snapshot, TailPlan
from gateway.sources.cache import BacktestCache
from gateway.sources.lists import ListReads
from gateway.sources.warehouse import BacktestRecord

_COMPLETED = JobState(status=COMPLETED)

# The backtest's metadata (cache, else warehouse); ``JobNotFound`` if it has none.
FindRecord = Callable[[str], Awaitable[BacktestRecord]]


class BacktestSource:
    """One stream's view of one completed backtest."""

    def __init__(
        self,
        cache: BacktestCache,
        backtest_id: str,
        *,
        find: FindRecord,
        lists: ListReads,
        job_id: str | None = None,
        record: BacktestRecord | None = None,
    ) -> None:
        self._lists = lists
        self._cache = cache
        self._find = find
        self.backtest_id = backtest_id
        # Set when a completed job is served from the warehouse under its job id.
        self._job_id = job_id
        self._record = record
        self._opened: Snapshot | None = None
        self._cached: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._failures: dict[str, str] = {}

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        # The metadata alone: no candle query before the caller is authorized.
        record = self._record or await self._find(self.backtest_id)
        self._record = record
        return JobInfo(
            # A backtest made by a job names it: both ids apply (SPEC 3).
            job_id=self._job_id or record.job_id,
            backtest_id=self.backtest_id,
            # The warehouse row's owner is the authority for warehouse data.
            user_id=record.user_id,
            symbol=record.symbol,
            exchange=record.exchange,
            intervals=record.intervals,
            state=_COMPLETED,
        )

    async def open(self, intervals: Sequence[str], plan: ReadPlan) -> Snapshot:
        # Cached intervals need no query; the others' reads start (or are
        # joined) at once, and each one's count comes with its first page.
        job = await self.describe(intervals)
        wanted = [interval for interval in dict.fromkeys(intervals) if interval in job.intervals]
        self._cached = await self._cache.lengths(self.backtest_id, wanted)
        filling = [interval for interval in wanted if interval not in self._cached]
        metrics.cache_lookup(hits=len(self._cached), misses=len(filling))
        counts = await asyncio.gather(
            *(self._cache.count(self.backtest_id, interval) for interval in filling), return_exceptions=True
        )
        for interval, count in zip(filling, counts, strict=True):
            if isinstance(count, DataError):
                self._failures[interval] = count.message
            elif isinstance(count, BaseException):
                raise count
            else:
                self._counts[interval] = count
        lengths = {**self._counts, **self._cached}
        self._opened = Snapshot(job=job, lengths=lengths, failures=dict(self._failures))
        return self._opened

    async def snapshot(self, intervals: Sequence[str], tails: TailPlan | None = None) -> Snapshot:
        """Backtests never change: what ``open`` counted stays true."""
        assert self._opened is not None, "open() first"
        return self._opened

    async def length(self, interval: str) -> int:
        """Backtests never change: the count taken with the snapshot stays true."""
        if interval in self._failures:
            raise DataError(self._failures[interval])
        if interval in self._cached:
            return self._cached[interval]
        return self._counts.get(interval, 0)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        read = self._read_cached if interval in self._cached else self._read_filling
        return self._lists.reader(partial(read, interval), interval, start, stop, chunk_size, prefetch=prefetch)

    async def _read_cached(self, interval: str, start: int, count: int) -> tuple[list[bytes], JobState | None]:
        return await self._cache.read_range(self.backtest_id, interval, start, count), None

    async def _read_filling(self, interval: str, start: int, count: int) -> tuple[list[bytes], JobState | None]:
        return await self._cache.read_filling(self.backtest_id, interval, start, count), None

    async def aclose(self) -> None:
        """Nothing held: the fills belong to the cache, and go on for the other readers."""
