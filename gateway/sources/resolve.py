"""Which source serves an id, and the authorization step every source goes through."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from gateway.auth import User
from gateway.errors import JobNotFound, SourceUnavailable
from gateway.params import StreamRequest
from gateway.sources.backtests import BacktestSource
from gateway.sources.base import COMPLETED, ChunkReader, JobInfo, ReadPlan, Snapshot, Source, TailPlan
from gateway.sources.batch import PipelineBatch
from gateway.sources.cache import BacktestCache
from gateway.sources.fresh import FreshReads
from gateway.sources.lists import ListReads
from gateway.sources.lookups import BacktestLookups
from gateway.sources.redis_jobs import SNAPSHOT_READ, RedisJobSource, job_not_found
from gateway.sources.warehouse import BacktestRecord, Warehouse


class Warehoused:
    """The warehouse and its Redis cache: present when ``bigquery.project`` is set."""

    def __init__(self, warehouse: Warehouse, cache: BacktestCache, page_rows: int) -> None:
        self.warehouse = warehouse
        self.cache = cache
        self.page_rows = page_rows  # the cache's fills use it (given to it directly)


class Sources:
    """Opens the right source for a request, for a user who may read it; one per application."""

    def __init__(self, client: aioredis.Redis, warehoused: Warehoused | None = None) -> None:
        self._redis = client
        self._warehoused = warehoused
        self._lists = ListReads()
        self._fresh = FreshReads()
        self._batch = PipelineBatch(client, SNAPSHOT_READ)  # every job's snapshot reads of a loop turn: one pipeline
        self._lookups = BacktestLookups(warehoused.warehouse, warehoused.cache, client) if warehoused else None

    async def open_for(self, user: User, request: StreamRequest, plan: ReadPlan) -> tuple[Source, Snapshot]:
        """Describe the id, authorize ``user``, and only then open it (counts, reads, fills)."""
        source, backtests = self._source(request, user)
        try:
            try:
                job = await source.describe(request.intervals)
                if not may_read(user, job):
                    raise job_not_found(request.id)
            except JobNotFound:
                # Someone else's id costs a lookup like an unknown one (lookups.LookupTicket).
                if backtests is not None:
                    await backtests.ticket.spend()
                raise
            snapshot = await source.open(request.intervals, plan)
        except BaseException:
            await source.aclose()
            raise
        return source, snapshot

    def _source(self, request: StreamRequest, user: User) -> tuple[Source, UserBacktests | None]:
        if self._warehoused is None or self._lookups is None:
            if request.is_backtest:
                return WarehouseNotConfigured(), None
            return JobSource(self._job(request), None), None
        backtests = UserBacktests(self._warehoused.cache, self._lookups, self._lists, user)
        if request.is_backtest:
            return backtests.backtest(request.id), backtests
        return JobSource(self._job(request), backtests), backtests

    def _job(self, request: StreamRequest) -> RedisJobSource:
        return RedisJobSource(self._redis, request.id, self._lists, self._fresh, self._batch)


class UserBacktests:
    """The completed backtests one request may reach; the warehouse lookups it causes count against its user."""

    def __init__(self, cache: BacktestCache, lookups: BacktestLookups, lists: ListReads, user: User) -> None:
        self._cache = cache
        self._lookups = lookups
        self._lists = lists
        self.ticket = lookups.ticket(user.uid)

    def backtest(self, backtest_id: str, *, job_id: str | None = None, record: BacktestRecord | None = None) -> Source:
        return BacktestSource(
            self._cache, backtest_id, find=self._find, job_id=job_id, record=record, lists=self._lists
        )

    async def backtest_of_job(self, job_id: str) -> BacktestRecord | None:
        """The backtest a job produced, found by its job id."""
        return await self._lookups.backtest_of_job(job_id, self.ticket)

    async def _find(self, backtest_id: str) -> BacktestRecord:
        return await self._lookups.backtest(backtest_id, self.ticket)


def may_read(user: User, job: JobInfo) -> bool:
    """Owners read their jobs, admins read all; anyone else sees job_not_found."""
    return user.is_admin or (bool(job.user_id) and job.user_id == user.uid)


class JobSource:
    """A job in Redis; once it completed and its Redis keys expired, its backtest in the warehouse (SPEC 6).

    When the warehouse serves it, the warehouse row's owner is the authority:
    a job hash naming someone else's backtest hands over nothing.
    """

    def __init__(self, jobs: RedisJobSource, backtests: UserBacktests | None) -> None:
        self._jobs = jobs
        self._backtests = backtests
        self._current: Source = jobs

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        try:
            job = await self._jobs.describe(intervals)
        except JobNotFound:
            if self._backtests is None:
                raise
            record = await self._backtests.backtest_of_job(self._jobs.job_id)
            if record is None:
                raise
            self._current = self._backtests.backtest(record.backtest_id, job_id=self._jobs.job_id, record=record)
            return await self._current.describe(intervals)
        if (
            self._backtests is not None
            and job.state.status == COMPLETED
            and job.backtest_id is not None
            and not any((await self._jobs.open(intervals, _NO_PLAN)).lengths.values())
        ):
            # Redis has no empty lists: no length means the lists expired.
            self._current = self._backtests.backtest(job.backtest_id, job_id=job.job_id)
            return await self._current.describe(intervals)
        return job

    async def open(self, intervals: Sequence[str], plan: ReadPlan) -> Snapshot:
        return await self._current.open(intervals, plan)

    async def snapshot(self, intervals: Sequence[str], tails: TailPlan | None = None) -> Snapshot:
        return await self._current.snapshot(intervals, tails)

    async def length(self, interval: str) -> int:
        return await self._current.length(interval)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        return self._current.reader(interval, start, stop, chunk_size, prefetch=prefetch)

    async def aclose(self) -> None:
        await self._current.aclose()


_NO_PLAN = ReadPlan(limit=0, chunk_size=1, starts={})


class WarehouseNotConfigured:
    """The source of every ``bt_`` id when ``bigquery.project`` is empty (SPEC 9)."""

    _MESSAGE = "the warehouse is not configured (bigquery.project is empty)"

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        raise SourceUnavailable(self._MESSAGE)

    async def open(self, intervals: Sequence[str], plan: ReadPlan) -> Snapshot:
        raise SourceUnavailable(self._MESSAGE)

    async def snapshot(self, intervals: Sequence[str], tails: TailPlan | None = None) -> Snapshot:
        raise SourceUnavailable(self._MESSAGE)

    async def length(self, interval: str) -> int:
        raise SourceUnavailable(self._MESSAGE)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        raise SourceUnavailable(self._MESSAGE)

    async def aclose(self) -> None:
        """Nothing held."""
