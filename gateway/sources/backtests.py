"""Completed backtests: from the Redis cache when it has them, else from the warehouse.

A stream first reads the metadata alone (cache, else warehouse): nothing
else is queried before the caller is authorized. Then it asks, for every
requested interval at once, its first page (which also counts the
interval's rows, ``COUNT(*) OVER ()``), so the first chunk waits for one
more query round trip however many intervals there are. Each interval
holds at most two pages (the one being sent and the next one in flight),
so memory is bounded by ``bigquery.page_rows``, not by the backtest.
Whatever was not cached is cached in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime
from functools import partial

from gateway import metrics
from gateway.errors import DataError, JobNotFound
from gateway.sources import keys
from gateway.sources.base import COMPLETED, Chunk, ChunkReader, JobInfo, JobState, ReadPlan, Snapshot
from gateway.sources.cache import BacktestCache
from gateway.sources.candles import CandleValidator
from gateway.sources.lists import ListReads
from gateway.sources.warehouse import BacktestRecord, CandlePage, Warehouse, WarehouseError, unavailable

_COMPLETED = JobState(status=COMPLETED)


class BacktestSource:
    """One stream's view of one completed backtest."""

    def __init__(
        self,
        warehouse: Warehouse,
        cache: BacktestCache,
        backtest_id: str,
        *,
        page_rows: int,
        lists: ListReads,
        job_id: str | None = None,
        record: BacktestRecord | None = None,
    ) -> None:
        self._lists = lists
        self._warehouse = warehouse
        self._cache = cache
        self.backtest_id = backtest_id
        self._page_rows = page_rows
        # Set when a completed job is served from the warehouse under its job id.
        self._job_id = job_id
        self._record = record
        self._opened: Snapshot | None = None
        self._cached: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._failures: dict[str, str] = {}
        self._first_pages: dict[str, tuple[int, asyncio.Task[CandlePage]]] = {}

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        # The metadata alone: no candle query before the caller is authorized.
        record = self._record or await self._cache.record(self.backtest_id) or await self._record_from_warehouse()
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
        # Cached intervals need no query; the others' first pages are asked
        # for at once, so a cold stream waits for one round of queries.
        job = await self.describe(intervals)
        self._cached = await self._cache.lengths(self.backtest_id, intervals)
        missing = [interval for interval in intervals if interval not in self._cached and interval in job.intervals]
        metrics.cache_lookup(hits=len(self._cached), misses=len(missing))
        self._start_first_pages(missing, plan)
        if missing:
            await self._count_from_first_pages()
            self._cache.fill_later(self.backtest_id, [i for i in missing if i not in self._failures])
        lengths = {name: n for name, n in {**self._counts, **self._cached}.items() if name in job.intervals}
        self._opened = Snapshot(job=job, lengths=lengths, failures=dict(self._failures))
        return self._opened

    async def snapshot(self, intervals: Sequence[str]) -> Snapshot:
        """Backtests never change: what ``open`` counted stays true."""
        assert self._opened is not None, "open() first"
        return self._opened

    async def _record_from_warehouse(self) -> BacktestRecord:
        try:
            record = await self._warehouse.backtest(self.backtest_id)
        except WarehouseError as exc:
            raise unavailable(exc) from exc
        if record is None:
            raise JobNotFound(f"Job '{self.backtest_id}' not found")
        await self._cache.store_record(record)
        return record

    def _start_first_pages(self, intervals: Sequence[str], plan: ReadPlan) -> None:
        for interval in intervals:
            start = plan.starts.get(interval, 0)
            # Small enough to hold for every interval at once, big enough for a fast start.
            rows = max(1, min(plan.limit - start, 2 * plan.chunk_size, self._page_rows))
            task = asyncio.create_task(self._warehouse.first_page(self.backtest_id, interval, start, rows))
            self._first_pages[interval] = (start, task)

    async def _count_from_first_pages(self) -> None:
        await asyncio.wait([task for _, task in self._first_pages.values()])
        for interval, (start, task) in self._first_pages.items():
            try:
                page = task.result()
            except WarehouseError as exc:
                self._failures[interval] = f"reading interval '{interval}' from the warehouse failed: {exc}"
                continue
            # An empty page past the start cannot count; the interval then has no more rows.
            self._counts[interval] = page.interval_rows if page.interval_rows is not None else start

    async def length(self, interval: str) -> int:
        """Backtests never change: the count taken with the snapshot stays true."""
        if interval in self._failures:
            raise DataError(self._failures[interval])
        if interval in self._cached:
            return self._cached[interval]
        return self._counts.get(interval, 0)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        if interval in self._cached:
            fetch = partial(self._read_cached, interval)
            key = keys.backtest_candles_key(self.backtest_id, interval)
            return self._lists.reader(fetch, key, interval, start, stop, chunk_size, prefetch=prefetch)
        first_page = None
        planned = self._first_pages.pop(interval, None)
        if planned is not None and planned[0] == start:
            first_page = planned[1]
        elif planned is not None:
            planned[1].cancel()
        return WarehouseChunkReader(
            self._warehouse, self.backtest_id, interval, start, stop, chunk_size,
            page_rows=self._page_rows, first_page=first_page,
        )  # fmt: skip

    async def _read_cached(self, interval: str, start: int, count: int) -> tuple[list[bytes], JobState | None]:
        return await self._cache.read_range(self.backtest_id, interval, start, count), None

    async def aclose(self) -> None:
        for _, task in self._first_pages.values():
            task.cancel()
        self._first_pages.clear()


class WarehouseChunkReader:
    """Chunks of one interval from warehouse pages: one page buffered, the next one in flight."""

    def __init__(
        self,
        warehouse: Warehouse,
        backtest_id: str,
        interval: str,
        start: int,
        stop: int,
        chunk_size: int,
        *,
        page_rows: int,
        first_page: asyncio.Task[CandlePage] | None,
    ) -> None:
        self._warehouse = warehouse
        self._backtest_id = backtest_id
        self._interval = interval
        self._stop = stop
        self._chunk_size = chunk_size
        self._page_rows = page_rows
        self._validator = CandleValidator(interval, position=start)
        self._position = start
        self._buffer: list[bytes] = []
        self._fetched = start  # position after the last fetched candle
        self._cursor: datetime | None = None
        self._pending: asyncio.Task[CandlePage] | None = first_page
        self._error: str | None = None

    async def next_chunk(self) -> Chunk:
        count = min(self._chunk_size, self._stop - self._position)
        while len(self._buffer) < count:
            if self._error is not None:
                raise DataError(self._error)
            await self._take_page()
        stored, self._buffer = self._buffer[:count], self._buffer[count:]
        self._position += count
        points = self._validator.to_json_array(stored)
        return Chunk(points, count, None, self._validator.first_time, self._validator.last_time)

    async def _take_page(self) -> None:
        task = self._pending or self._fetch_next()
        self._pending = None
        try:
            page = await task
        except WarehouseError as exc:
            raise DataError(f"reading interval '{self._interval}' from the warehouse failed: {exc}") from exc
        candles = page.candles
        if self._cursor is not None:
            candles = candles[1:]  # the cursor's own candle, already sent (see page_after)
        self._buffer.extend(candles)
        self._fetched += len(candles)
        self._cursor = page.last_time
        if page.error is not None:
            self._error = page.error
        elif not candles:
            self._error = f"interval '{self._interval}' has fewer rows than it had when counted"
        elif self._fetched < self._stop:
            self._pending = self._fetch_next()

    def _fetch_next(self) -> asyncio.Task[CandlePage]:
        rows = min(self._page_rows, self._stop - self._fetched)
        if self._cursor is None:
            fetch = self._warehouse.first_page(self._backtest_id, self._interval, self._fetched, rows)
        else:
            fetch = self._warehouse.page_after(self._backtest_id, self._interval, self._cursor, self._fetched, rows)
        return asyncio.create_task(fetch)

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending
            self._pending = None
