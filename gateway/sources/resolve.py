"""Which source serves an id: a job in Redis, or a backtest from the cache or warehouse."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from gateway.errors import JobNotFound, SourceUnavailable
from gateway.params import StreamRequest
from gateway.sources.backtests import BacktestSource
from gateway.sources.base import COMPLETED, ChunkReader, ReadPlan, Snapshot, Source
from gateway.sources.cache import BacktestCache
from gateway.sources.candles import ValidatedChunks
from gateway.sources.lists import ReadAheadBudget
from gateway.sources.redis_jobs import RedisJobSource
from gateway.sources.warehouse import BacktestRecord, Warehouse, WarehouseError, unavailable


class Sources:
    """Opens the right source for a request; one per application."""

    def __init__(
        self,
        client: aioredis.Redis,
        warehouse: Warehouse | None = None,
        cache: BacktestCache | None = None,
        page_rows: int = 10_000,
    ) -> None:
        self._redis = client
        self._warehouse = warehouse
        self._cache = cache
        self._page_rows = page_rows
        # Shared by every stream of this process: each stored chunk is validated once.
        self._validated = ValidatedChunks()
        self._read_ahead = ReadAheadBudget()

    def open(self, request: StreamRequest) -> Source:
        if request.is_backtest:
            return self.backtest(request.id) if self._warehouse else WarehouseNotConfigured()
        return JobSource(
            RedisJobSource(self._redis, request.id, self._validated, self._read_ahead),
            self if self._warehouse else None,
        )

    def backtest(
        self,
        backtest_id: str,
        *,
        job_id: str | None = None,
        record: BacktestRecord | None = None,
        owner: str | None = None,
    ) -> BacktestSource:
        assert self._warehouse is not None and self._cache is not None
        return BacktestSource(
            self._warehouse,
            self._cache,
            backtest_id,
            page_rows=self._page_rows,
            job_id=job_id,
            record=record,
            owner=owner,
            validated=self._validated,
            read_ahead=self._read_ahead,
        )

    async def backtest_of_job(self, job_id: str) -> BacktestRecord | None:
        assert self._warehouse is not None
        try:
            return await self._warehouse.backtest_of_job(job_id)
        except WarehouseError as exc:
            raise unavailable(exc) from exc


class JobSource:
    """A job in Redis; once it completed and its Redis keys expired, its backtest in the warehouse (SPEC 6)."""

    def __init__(self, jobs: RedisJobSource, backtests: Sources | None) -> None:
        self._jobs = jobs
        self._backtests = backtests
        self._current: Source = jobs

    async def snapshot(self, intervals: Sequence[str], plan: ReadPlan | None = None) -> Snapshot:
        if self._current is not self._jobs:
            return await self._current.snapshot(intervals, plan)
        try:
            snapshot = await self._jobs.snapshot(intervals, plan)
        except JobNotFound:
            if self._backtests is None:
                raise
            record = await self._backtests.backtest_of_job(self._jobs.job_id)
            if record is None:
                raise
            self._current = self._backtests.backtest(record.backtest_id, job_id=self._jobs.job_id, record=record)
            return await self._current.snapshot(intervals, plan)
        job = snapshot.job
        if (
            self._backtests is not None
            and job.state.status == COMPLETED
            and job.backtest_id is not None
            and not await self._jobs.has_candles(list(snapshot.lengths))
        ):
            self._current = self._backtests.backtest(job.backtest_id, job_id=job.job_id, owner=job.user_id)
            return await self._current.snapshot(intervals, plan)
        return snapshot

    async def length(self, interval: str) -> int:
        return await self._current.length(interval)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        return self._current.reader(interval, start, stop, chunk_size, prefetch=prefetch)

    async def aclose(self) -> None:
        await self._current.aclose()


class WarehouseNotConfigured:
    """The source of every ``bt_`` id when ``bigquery.project`` is empty (SPEC 9)."""

    _MESSAGE = "the warehouse is not configured (bigquery.project is empty)"

    async def snapshot(self, intervals: Sequence[str], plan: ReadPlan | None = None) -> Snapshot:
        raise SourceUnavailable(self._MESSAGE)

    async def length(self, interval: str) -> int:
        raise SourceUnavailable(self._MESSAGE)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        raise SourceUnavailable(self._MESSAGE)

    async def aclose(self) -> None:
        """Nothing held."""
