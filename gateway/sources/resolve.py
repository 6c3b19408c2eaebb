"""Which source serves an id: a job in Redis, or a backtest from the warehouse."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from gateway.errors import SourceUnavailable
from gateway.params import StreamRequest
from gateway.sources.base import ChunkReader, Snapshot, Source
from gateway.sources.redis_jobs import RedisJobSource


class Sources:
    """Opens the right source for a request; one per application."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    def open(self, request: StreamRequest) -> Source:
        if request.is_backtest:
            return WarehouseNotConfigured()
        return RedisJobSource(self._redis, request.id)


class WarehouseNotConfigured:
    """The source of every ``bt_`` id when ``bigquery.project`` is empty (SPEC 9)."""

    _MESSAGE = "the warehouse is not configured (bigquery.project is empty)"

    async def snapshot(self, intervals: Sequence[str]) -> Snapshot:
        raise SourceUnavailable(self._MESSAGE)

    async def length(self, interval: str) -> int:
        raise SourceUnavailable(self._MESSAGE)

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ChunkReader:
        raise SourceUnavailable(self._MESSAGE)

    async def aclose(self) -> None:
        pass
