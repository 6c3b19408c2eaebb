"""The Redis cache of completed backtests, and the one warehouse read per interval that fills it.

Completed backtests never change, so each interval is read from the
warehouse once, by one replica, and every stream of it on every replica
reads the same Redis list:

- The first stream of an uncached interval takes a short lock (refreshed
  while the read goes on, so a dead replica's lapses within
  ``bigquery.fill_lock_ttl_s``) and runs the interval's one query, then
  reads its result page by page into the staging list. The result's row
  count lands in the fill hash together with the first page, so every
  reader knows the interval's total before its ``interval_start``; the
  query's job lands there too, so a read that fails goes on later from the
  same result.
- Every stream of the interval, the filler's own included, reads
  chunk-sized ``LRANGE``s of the staging list as it grows (polling, with a
  bound on how long it may stall), as a follower reads a running job.
- The last page renames staging into place and marks the interval complete
  in one script, so a partial list is never taken for a complete one; later
  streams read the final list alone, with no query at all.

A filler that fails records the error (its readers report a data_error) and
lets go of the lock; one that dies lets the lock lapse. Either way the next
reader that finds no lock takes over, after the rows already staged: from
the same query result while BigQuery keeps it (no query), else with one new
query for the rows after the last one staged. Every write checks the lock
inside its script, so two fillers never append. All keys of a backtest
share its hash tag: every script stays in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any, Final, NamedTuple, TypeVar

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from gateway import metrics
from gateway.errors import DataError, GatewayError
from gateway.redis_client import call_redis, raise_if_cancelling
from gateway.sources import keys
from gateway.sources.candles import Candle
from gateway.sources.warehouse import (
    BacktestRecord,
    CandlePage,
    IntervalRead,
    ResultHandle,
    Warehouse,
    WarehouseError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows of a read's first page: few, so the count and the first chunks come soon.
_FIRST_PAGE_ROWS: Final = 1000
# A dead filler's staging list and fill hash stay this long for the next filler to resume.
_STAGING_TTL_S: Final = 600
# Readers look at the staging list this often at first, backing off to the longest;
# a fill running in this process wakes its readers at once instead.
_POLL_FIRST_S: Final = 0.002
_POLL_LONGEST_S: Final = 0.05
# Beyond the query timeout and the lock's TTL: how long a reader waits for rows that do not come.
_STALL_SLACK_S: Final = 5.0

_encode_record = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(BacktestRecord).decode
_decode_candle = msgspec.json.Decoder(Candle).decode
_encode_handle = msgspec.json.Encoder().encode
_decode_handle = msgspec.json.Decoder(ResultHandle).decode

# KEYS: lock, fill hash, complete hash, final list. ARGV: writer, lock TTL (ms), interval.
# No lock for an interval already cached whole (a stream that looked just before the last
# page landed must not read it again); a new filler clears the last one's error.
_ACQUIRE: Final = """
local done = redis.call('HGET', KEYS[3], ARGV[3])
if done and (tonumber(done) == 0 or redis.call('LLEN', KEYS[4]) == tonumber(done)) then
  return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HDEL', KEYS[2], 'error')
  return 1
end
return 0
"""
# KEYS: lock, staging, fill hash. ARGV: writer, lock TTL (ms), staging TTL (s).
_REFRESH: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""
# KEYS: lock, staging, fill hash, final, complete hash.
# ARGV: writer, staged length expected, count, staging TTL (s), interval, cache TTL (s),
# the query result's handle (JSON, or empty), rows...
# The page that completes the interval renames staging into place and marks it
# complete in the same script: no reader ever sees the last rows before the mark.
# Lua's unpack() stops near 8,000 values, hence the batches.
_APPEND: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local expected = tonumber(ARGV[2])
if expected == 0 then
  redis.call('DEL', KEYS[2])
elseif redis.call('LLEN', KEYS[2]) ~= expected then
  return -2
end
redis.call('HSET', KEYS[3], 'count', ARGV[3])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'result', ARGV[7]) end
for i = 8, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local staged = redis.call('LLEN', KEYS[2])
if staged < tonumber(ARGV[3]) then
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return staged
end
if staged > 0 then
  redis.call('RENAME', KEYS[2], KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
else
  redis.call('DEL', KEYS[4])
end
redis.call('HSET', KEYS[5], ARGV[5], staged)
redis.call('EXPIRE', KEYS[5], ARGV[6])
redis.call('DEL', KEYS[3], KEYS[1])
return staged
"""
# KEYS: lock, fill hash. ARGV: writer, error text, staging TTL (s).
_FAIL: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'error', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[1])
return 1
"""
# KEYS: lock. ARGV: writer.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _stored_handle(blob: bytes | None) -> ResultHandle | None:
    """The query result a fill hash names, if any (one that does not decode is as good as none)."""
    if not blob:
        return None
    try:
        return _decode_handle(blob)
    except msgspec.DecodeError:
        return None


class _LostLock(Exception):
    """Another filler holds the interval now (ours lapsed): stop writing."""


class _FillKeys(NamedTuple):
    lock: str
    staging: str
    fill: str
    final: str
    complete: str

    @classmethod
    def of(cls, backtest_id: str, interval: str) -> _FillKeys:
        return cls(
            keys.backtest_fill_lock_key(backtest_id, interval),
            keys.backtest_staging_key(backtest_id, interval),
            keys.backtest_fill_key(backtest_id, interval),
            keys.backtest_candles_key(backtest_id, interval),
            keys.backtest_complete_key(backtest_id),
        )


class _Look(NamedTuple):
    """One look at an interval being filled: the range asked for, and where the read stands."""

    staged: list[bytes]
    final: list[bytes]
    staged_length: int
    final_length: int
    complete: int | None  # the completion mark
    rows: int | None  # the interval's rows, once the read knows them
    error: str | None
    locked: bool

    @property
    def is_complete(self) -> bool:
        return self.complete is not None and self.complete == self.final_length


class BacktestCache:
    """Reads the cache and runs this replica's share of the fills; one per application."""

    def __init__(self, client: aioredis.Redis, warehouse: Warehouse, ttl_s: int, page_rows: int) -> None:
        settings = warehouse.settings
        self._redis = client
        self._warehouse = warehouse
        self._ttl_s = ttl_s
        self._page_rows = page_rows
        self._missing_ttl_s = settings.missing_ttl_s
        self._lock_ttl_ms = max(500, round(settings.fill_lock_ttl_s * 1000))
        # A page takes at most the query timeout; a dead filler's lock lapses within its TTL.
        self._stall_s = settings.query_timeout_s + settings.fill_lock_ttl_s + _STALL_SLACK_S
        self._fills: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Set (and dropped) by a fill of this process whenever it wrote: its readers look at once.
        self._notes: weakref.WeakValueDictionary[tuple[str, str], asyncio.Event] = weakref.WeakValueDictionary()
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._append = client.register_script(_APPEND)
        self._fail = client.register_script(_FAIL)
        self._release = client.register_script(_RELEASE)

    # -- metadata, and what the warehouse said it does not have --------------

    async def record(self, backtest_id: str) -> tuple[BacktestRecord | None, bool]:
        """The cached metadata (None on a miss), and whether the warehouse lately said the id does not exist.

        ``RedisUnreachable`` if the cache does not answer: every candle goes
        through it, so the warehouse is not asked for what could not be served.
        """

        blob, missing = await self._value_or_miss(
            keys.backtest_meta_key(backtest_id), keys.backtest_missing_key(backtest_id)
        )
        try:
            return (_decode_record(blob) if blob else None), bool(missing)
        except msgspec.DecodeError:
            log.warning("cached metadata of %s does not decode; asking the warehouse", backtest_id)
            return None, False

    async def store_record(self, record: BacktestRecord) -> None:
        try:
            await self._redis.set(keys.backtest_meta_key(record.backtest_id), _encode_record(record), ex=self._ttl_s)
        except redis.exceptions.RedisError:
            log.warning("could not cache backtest %s", record.backtest_id)

    async def job_backtest(self, job_id: str) -> tuple[str | None, bool]:
        """The backtest id a job produced as cached (None on a miss), and whether the warehouse lately had none."""

        backtest_id, missing = await self._value_or_miss(
            keys.job_backtest_key(job_id), keys.job_backtest_missing_key(job_id)
        )
        return (backtest_id.decode() if backtest_id else None), missing

    async def _value_or_miss(self, key: str, missing_key: str) -> tuple[bytes | None, bool]:
        """A cached value, and whether the warehouse lately said there is none (one round trip)."""

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(key)
            pipe.exists(missing_key)
            return await pipe.execute()

        value, missing = await call_redis(read, "reading the backtest cache")
        return value, bool(missing)

    async def store_job_backtest(self, job_id: str, record: BacktestRecord) -> None:
        await self.store_record(record)
        try:
            await self._redis.set(keys.job_backtest_key(job_id), record.backtest_id, ex=self._ttl_s)
        except redis.exceptions.RedisError:
            log.warning("could not cache the backtest of job %s", job_id)

    async def remember_missing(self, key: str) -> None:
        """Remember a warehouse miss for ``bigquery.missing_ttl_s``."""
        try:
            await self._redis.set(key, b"1", ex=self._missing_ttl_s)
        except redis.exceptions.RedisError:
            log.warning("could not remember a warehouse miss")

    # -- complete intervals ----------------------------------------------------

    async def lengths(self, backtest_id: str, intervals: Sequence[str]) -> dict[str, int]:
        """Candles cached per interval, for the intervals whose cache is complete only."""
        if not intervals:
            return {}

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys.backtest_complete_key(backtest_id), list(intervals))
            for interval in intervals:
                pipe.llen(keys.backtest_candles_key(backtest_id, interval))
            return await pipe.execute()

        complete, *lengths = await call_redis(read, "reading the backtest cache")
        # Complete means: marked complete, and the list (which may expire alone) still whole.
        return {
            interval: length
            for interval, count, length in zip(intervals, complete, lengths, strict=True)
            if count is not None and int(count) == length
        }

    async def read_range(self, backtest_id: str, interval: str, start: int, count: int) -> list[bytes]:
        """``count`` cached candles from ``start``."""
        key = keys.backtest_candles_key(backtest_id, interval)
        stored: list[bytes] = await call_redis(
            lambda: self._redis.lrange(key, start, start + count - 1),  # type: ignore[arg-type,return-value]
            f"reading cached interval '{interval}'",
        )
        if len(stored) != count:
            raise DataError(f"cached interval '{interval}' expired while it was read; reconnect to resume")
        return stored

    # -- intervals being filled --------------------------------------------------

    async def count(self, backtest_id: str, interval: str) -> int:
        """The interval's rows, once the one read of it knows them; starts that read if none runs.

        ``DataError`` if the read failed, or knew nothing for too long.
        """
        await self._claim(backtest_id, interval)
        look = await self._wait(backtest_id, interval, 0, 0, lambda look: look.rows is not None or look.is_complete)
        if look.is_complete:
            assert look.complete is not None
            return look.complete
        assert look.rows is not None
        return look.rows

    async def read_filling(self, backtest_id: str, interval: str, start: int, count: int) -> list[bytes]:
        """``count`` candles from ``start`` of an interval being filled, as soon as they are staged."""

        def arrived(look: _Look) -> bool:
            return (len(look.final) == count and look.is_complete) or len(look.staged) == count

        look = await self._wait(backtest_id, interval, start, count, arrived)
        if len(look.final) == count and look.is_complete:
            return look.final
        return look.staged

    async def _wait(
        self, backtest_id: str, interval: str, start: int, count: int, done: Callable[[_Look], bool]
    ) -> _Look:
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        staged = -1
        pause = _POLL_FIRST_S
        while True:
            look = await self._look(backtest_id, interval, start, count)
            if done(look):
                return look
            if look.is_complete:
                assert look.complete is not None
                raise DataError(
                    f"interval '{interval}' holds {look.complete} points, fewer than the {start + count} counted"
                )
            if look.error is not None:
                raise DataError(look.error)
            if not look.locked:
                await self._claim(backtest_id, interval)  # the filler died: take over
            if look.staged_length != staged:
                staged, progress_at, pause = look.staged_length, loop.time(), _POLL_FIRST_S
            elif loop.time() - progress_at > self._stall_s:
                raise DataError(f"reading interval '{interval}' from the warehouse stalled; reconnect to resume")
            await self._pause(backtest_id, interval, pause)
            pause = min(pause * 2, _POLL_LONGEST_S)

    async def _pause(self, backtest_id: str, interval: str, seconds: float) -> None:
        """Until the fill of this process writes again, or ``seconds`` (a fill elsewhere writes unseen)."""
        note = self._notes.get((backtest_id, interval))
        if note is None:
            note = self._notes[(backtest_id, interval)] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await note.wait()

    def _wake(self, backtest_id: str, interval: str) -> None:
        note = self._notes.pop((backtest_id, interval), None)
        if note is not None:
            note.set()

    async def _look(self, backtest_id: str, interval: str, start: int, count: int) -> _Look:
        k = _FillKeys.of(backtest_id, interval)

        async def read() -> list[Any]:
            # Staging before final: the rename happens between two reads at worst, and
            # then the staging range was already whole, or the final one is.
            pipe = self._redis.pipeline(transaction=False)
            if count:
                pipe.lrange(k.staging, start, start + count - 1)
                pipe.lrange(k.final, start, start + count - 1)
            pipe.llen(k.staging)
            pipe.llen(k.final)
            pipe.hget(k.complete, interval)
            pipe.hmget(k.fill, ["count", "error"])
            pipe.exists(k.lock)
            return await pipe.execute()

        replies = await call_redis(read, f"reading interval '{interval}' being cached")
        staged, final = (replies[0], replies[1]) if count else ([], [])
        staged_length, final_length, complete, (counted, error), locked = replies[-5:]
        return _Look(
            staged=staged,
            final=final,
            staged_length=staged_length,
            final_length=final_length,
            complete=None if complete is None else int(complete),
            rows=None if counted is None else int(counted),
            error=None if error is None else error.decode(errors="replace"),
            locked=bool(locked),
        )

    async def _claim(self, backtest_id: str, interval: str) -> None:
        """Start the interval's read here, unless it runs here or elsewhere already."""
        key = (backtest_id, interval)
        if key in self._fills:
            return
        k = _FillKeys.of(backtest_id, interval)
        writer = uuid.uuid4().hex
        won = await call_redis(
            lambda: self._acquire(
                keys=[k.lock, k.fill, k.complete, k.final], args=[writer, self._lock_ttl_ms, interval]
            ),
            f"starting to cache interval '{interval}'",
        )
        if won and key not in self._fills:
            task = asyncio.create_task(self._fill(backtest_id, interval, writer), name=f"cache-fill {key}")
            self._fills[key] = task
            task.add_done_callback(partial(self._forget_fill, key))

    def _forget_fill(self, key: tuple[str, str], _: asyncio.Task[None]) -> None:
        self._fills.pop(key, None)

    async def aclose(self) -> None:
        for task in list(self._fills.values()):
            task.cancel()
        await asyncio.gather(*self._fills.values(), return_exceptions=True)

    # -- the filler ---------------------------------------------------------------

    async def _fill(self, backtest_id: str, interval: str, writer: str) -> None:
        k = _FillKeys.of(backtest_id, interval)
        fill = asyncio.current_task()
        assert fill is not None
        keeper = asyncio.create_task(self._keep_lock(k, writer, fill), name=f"cache-fill-lock {backtest_id} {interval}")
        try:
            written = await self._copy(backtest_id, interval, k, writer)
            log.info("cached %d candles of %s %s", written, backtest_id, interval)
            metrics.cache_fill("ok")
        except WarehouseError as exc:
            await self._give_up(k, writer, f"reading interval '{interval}' from the warehouse failed: {exc}")
        except DataError as exc:
            await self._give_up(k, writer, exc.message)
        except (_LostLock, GatewayError, redis.exceptions.RedisError) as exc:
            # Readers see no progress; the next one to find no lock takes over.
            log.warning("stopped caching %s %s: %s", backtest_id, interval, exc)
            metrics.cache_fill("abandoned")
            await self._let_go(k, writer)
        except asyncio.CancelledError:
            await self._let_go(k, writer)
            raise
        finally:
            keeper.cancel()
            self._wake(backtest_id, interval)

    async def _copy(self, backtest_id: str, interval: str, k: _FillKeys, writer: str) -> int:
        """The interval's result, page by page, into staging after what is staged already; then into place."""
        staged, count, read = await self._open_read(backtest_id, interval, k)
        page = read.first if read is not None else CandlePage(candles=[], last_time=None)
        while True:
            candles = page.candles[: count - staged]
            handle = _encode_handle(read.handle) if read is not None and read.handle is not None else b""
            staged = await self._script(
                self._append,
                [k.lock, k.staging, k.fill, k.final, k.complete],
                [writer, staged, count, _STAGING_TTL_S, interval, self._ttl_s, handle, *candles],
            )
            self._wake(backtest_id, interval)
            if page.error is not None:
                raise DataError(page.error)  # the rows before it are staged for the readers
            if staged >= count:
                return staged  # renamed into place and marked complete with the last rows
            assert read is not None
            next_page = await read.next_page(f"backtest {backtest_id}, interval {interval}")
            if next_page is None:
                # The query's own answer was its first page: the rest comes from its result.
                read = await self._continue(backtest_id, interval, read.handle, staged, count, page.last_time)
                next_page = read.first
            if not next_page.candles and next_page.error is None:
                raise DataError(f"interval '{interval}' has fewer rows than it had when counted")
            page = next_page

    async def _open_read(self, backtest_id: str, interval: str, k: _FillKeys) -> tuple[int, int, IntervalRead | None]:
        """Where this read starts: after the rows a failed or dead filler staged, or with the interval's query."""

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.llen(k.staging)
            pipe.hmget(k.fill, ["count", "result"])
            pipe.lindex(k.staging, -1)
            return await pipe.execute()

        staged, (count, result), last = await call_redis(read, f"resuming to cache interval '{interval}'")
        if staged and count is not None and last is not None:
            if staged >= int(count):  # every row staged, none left to read: the append completes it
                return staged, int(count), None
            cursor = _decode_candle(last).time
            resumed = await self._continue(
                backtest_id, interval, _stored_handle(result), staged, int(count), cursor, failed_before=True
            )
            return staged, int(count), resumed
        first = await self._warehouse.read_interval(
            backtest_id, interval, first_rows=min(self._page_rows, _FIRST_PAGE_ROWS)
        )
        return 0, first.total_rows, first

    async def _continue(
        self,
        backtest_id: str,
        interval: str,
        handle: ResultHandle | None,
        staged: int,
        count: int,
        cursor: datetime | None,
        *,
        failed_before: bool = False,
    ) -> IntervalRead:
        """The rows after the ``staged`` ones: from the same result while it exists, else one new query.

        ``failed_before``: this read takes over from one that failed or died (counted as a resume).
        """
        if handle is not None:
            resumed = await self._warehouse.resume(handle, backtest_id, interval, staged, self._page_rows)
            if resumed is not None:
                if resumed.total_rows != count:
                    raise DataError(f"interval '{interval}' holds {resumed.total_rows} rows, not the {count} counted")
                if failed_before:
                    metrics.warehouse_resume("same_result")
                return resumed
        if cursor is None:
            raise DataError(f"interval '{interval}' has fewer rows than it had when counted")
        # The result is gone (or there never was a job): the rows after the last one staged.
        metrics.warehouse_resume("new_query")
        read = await self._warehouse.read_interval(
            backtest_id, interval, first_rows=self._page_rows, after=cursor, position=staged
        )
        if read.total_rows != count - staged:
            # ``time >`` the cursor: a second candle at the cursor's time is not read
            # again, and shows here as a count that no longer adds up (never skipped silently).
            raise DataError(
                f"interval '{interval}' changed while it was read: {read.total_rows} rows after"
                f" the {staged} staged, not {count - staged}"
            )
        return read

    async def _script(self, script: Callable[..., Awaitable[Any]], script_keys: list[str], args: list[Any]) -> int:
        result = int(await call_redis(lambda: script(keys=script_keys, args=args), "caching an interval"))
        if result < 0:
            raise _LostLock("the fill lock lapsed and another replica took over")
        return result

    async def _keep_lock(self, k: _FillKeys, writer: str, fill: asyncio.Task[None]) -> None:
        """Refresh the lock while the read runs; a lock found lost stops the read."""
        while True:
            await asyncio.sleep(self._lock_ttl_ms / 3000)
            try:
                held = await self._refresh(keys=[k.lock, k.staging, k.fill], args=[writer, self._lock_ttl_ms,
                                                                                   _STAGING_TTL_S])  # fmt: skip
            except redis.exceptions.RedisError:
                raise_if_cancelling()
                continue  # the next refresh may get through before the lock lapses
            # Stopped with its read, even if the refresh's write swallowed the cancellation (bpo-42130):
            # a keeper left running would hold the lock of a read nobody makes.
            raise_if_cancelling()
            if not held:
                fill.cancel()
                return

    async def _give_up(self, k: _FillKeys, writer: str, message: str) -> None:
        """Tell the readers why the read failed, and let the next stream try again."""
        log.warning("could not cache %s: %s", k.final, message)
        metrics.cache_fill("failed")
        with contextlib.suppress(redis.exceptions.RedisError):
            await self._fail(keys=[k.lock, k.fill], args=[writer, message, _STAGING_TTL_S])

    async def _let_go(self, k: _FillKeys, writer: str) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            await self._release(keys=[k.lock], args=[writer])  # else it lapses by itself
