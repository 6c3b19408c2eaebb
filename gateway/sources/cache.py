"""The Redis cache of completed backtests: metadata and one candle list per interval.

Completed backtests never change, so an interval read from the warehouse
once can be served from Redis by every replica afterwards. A cached list is
written under a staging key and renamed into place only when complete, so a
partly written entry is never served; the fill runs in the background, one
page at a time, and never slows the stream that triggered it. Any Redis
failure here is a cache miss: the warehouse still answers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from gateway import metrics
from gateway.errors import DataError
from gateway.sources import keys
from gateway.sources.warehouse import BacktestRecord, Warehouse, WarehouseError

log = logging.getLogger(__name__)

# A fill that has not finished by then is presumed dead; another may start.
_FILL_LOCK_TTL_S: Final = 600
# Fills running at once per replica: they share the warehouse thread pool with streams.
_MAX_CONCURRENT_FILLS: Final = 2

_encode_record = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(BacktestRecord).decode


class BacktestCache:
    """Reads and fills the cache; one per application."""

    def __init__(self, client: aioredis.Redis, warehouse: Warehouse, ttl_s: int, page_rows: int) -> None:
        self._redis = client
        self._warehouse = warehouse
        self._ttl_s = ttl_s
        self._page_rows = page_rows
        self._fills: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._fill_slots = asyncio.Semaphore(_MAX_CONCURRENT_FILLS)

    async def record(self, backtest_id: str) -> BacktestRecord | None:
        """The cached metadata, or None on a miss (or an unreachable cache)."""
        try:
            blob = await self._redis.get(keys.backtest_meta_key(backtest_id))
            return _decode_record(blob) if blob else None
        except (redis.exceptions.RedisError, msgspec.DecodeError):
            log.warning("backtest cache unreadable for %s; asking the warehouse", backtest_id)
            return None

    async def store_record(self, record: BacktestRecord) -> None:
        try:
            await self._redis.set(keys.backtest_meta_key(record.backtest_id), _encode_record(record), ex=self._ttl_s)
        except redis.exceptions.RedisError:
            log.warning("could not cache backtest %s", record.backtest_id)

    async def lengths(self, backtest_id: str, intervals: Sequence[str]) -> dict[str, int]:
        """Candles cached per interval, for the intervals whose cache is complete only."""
        if not intervals:
            return {}
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys.backtest_complete_key(backtest_id), list(intervals))
            for interval in intervals:
                pipe.llen(keys.backtest_candles_key(backtest_id, interval))
            complete, *lengths = await pipe.execute()
        except redis.exceptions.RedisError:
            log.warning("backtest cache unreachable for %s; asking the warehouse", backtest_id)
            return {}
        # Complete means: marked complete, and the list (which may expire alone) still whole.
        return {
            interval: length
            for interval, count, length in zip(intervals, complete, lengths, strict=True)
            if count is not None and int(count) == length
        }

    async def read_range(self, backtest_id: str, interval: str, start: int, count: int) -> list[bytes]:
        """``count`` cached candles from ``start``."""
        key = keys.backtest_candles_key(backtest_id, interval)
        try:
            stored: list[bytes] = await self._redis.lrange(key, start, start + count - 1)  # type: ignore[assignment]
        except redis.exceptions.RedisError as exc:
            raise DataError(f"cached interval '{interval}' became unreadable: {exc}") from exc
        if len(stored) != count:
            raise DataError(f"cached interval '{interval}' expired while it was read; reconnect to resume")
        return stored

    def fill_later(self, backtest_id: str, intervals: Sequence[str]) -> None:
        """Start filling these intervals in the background (once per replica, see the lock)."""
        for interval in intervals:
            key = (backtest_id, interval)
            if key not in self._fills:
                task = asyncio.create_task(self._fill(backtest_id, interval), name=f"cache-fill {key}")
                self._fills[key] = task
                task.add_done_callback(partial(self._forget_fill, key))

    def _forget_fill(self, key: tuple[str, str], _: asyncio.Task[None]) -> None:
        self._fills.pop(key, None)

    async def aclose(self) -> None:
        for task in list(self._fills.values()):
            task.cancel()
        await asyncio.gather(*self._fills.values(), return_exceptions=True)

    async def _fill(self, backtest_id: str, interval: str) -> None:
        final = keys.backtest_candles_key(backtest_id, interval)
        writer = uuid.uuid4().hex
        staging = keys.backtest_staging_key(backtest_id, interval, writer)
        lock = keys.backtest_staging_key(backtest_id, interval, "lock")
        async with self._fill_slots:
            try:
                # One replica fills; the others keep reading the warehouse meanwhile.
                if not await self._redis.set(lock, writer, nx=True, ex=_FILL_LOCK_TTL_S):
                    return
                if interval in await self.lengths(backtest_id, [interval]):
                    await self._forget(staging, lock, writer)  # cached meanwhile: release the lock
                    return
                written = await self._copy(backtest_id, interval, staging)
                complete = keys.backtest_complete_key(backtest_id)
                pipe = self._redis.pipeline(transaction=True)
                if written:  # Redis has no empty lists: an empty interval is only marked
                    pipe.rename(staging, final)
                    pipe.expire(final, self._ttl_s)
                pipe.hset(complete, interval, written)
                pipe.expire(complete, self._ttl_s)
                pipe.delete(lock)
                await pipe.execute()
                log.info("cached %d candles of %s %s", written, backtest_id, interval)
                metrics.cache_fill("ok")
            except (WarehouseError, DataError, redis.exceptions.RedisError) as exc:
                log.warning("could not cache %s %s: %s", backtest_id, interval, exc)
                metrics.cache_fill("failed")
                await self._forget(staging, lock, writer)
            except asyncio.CancelledError:
                await self._forget(staging, lock, writer)
                raise

    async def _copy(self, backtest_id: str, interval: str, staging: str) -> int:
        """Every candle of the interval into ``staging``, page by page; returns how many."""
        page = await self._warehouse.first_page(backtest_id, interval, 0, self._page_rows)
        written = 0
        while page.candles or page.error:
            if page.error is not None:
                raise DataError(page.error)  # a broken interval is never cached
            await self._redis.rpush(staging, *page.candles)
            await self._redis.expire(staging, _FILL_LOCK_TTL_S)
            written += len(page.candles)
            if len(page.candles) < self._page_rows or page.last_time is None:
                break
            page = await self._warehouse.page_after(backtest_id, interval, page.last_time, written, self._page_rows)
            page = msgspec.structs.replace(page, candles=page.candles[1:])
        return written

    async def _forget(self, staging: str, lock: str, writer: str) -> None:
        try:
            await self._redis.delete(staging)
            if await self._redis.get(lock) == writer.encode():
                await self._redis.delete(lock)
        except redis.exceptions.RedisError:
            pass  # both keys expire by themselves
