"""Finding a backtest's metadata at the least cost to the warehouse, whoever asks.

The cache answers first. The warehouse is asked only for ids the cache does
not know, and then:

- a miss is remembered in Redis for ``bigquery.missing_ttl_s``, so probing
  one unknown id again costs no query on any replica;
- one user may cause at most ``bigquery.max_lookups_per_user_per_s`` lookups
  a second (a counter per user and second in Redis, counted and given its
  expiry in one script); beyond that the request
  is answered 429 before any query (``TooManyLookups``);
- concurrent lookups of one id in one process share one query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions

from gateway.errors import JobNotFound, RequestError
from gateway.sources import keys
from gateway.sources.cache import BacktestCache
from gateway.sources.warehouse import BacktestRecord, Warehouse, WarehouseError, warehouse_unavailable

log = logging.getLogger(__name__)

_WINDOW_S: Final = 1
# One step, so the counter is never without its expiry: an INCR that found the
# key gone between a separate SET NX and itself would make one for good (and a
# counter left so by an older gateway gets its expiry back).
_SPEND: Final = """
local spent = redis.call('INCR', KEYS[1])
if spent == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return spent
"""


class TooManyLookups(RequestError):
    """The user caused more warehouse lookups this second than allowed: 429 with ``Retry-After``."""

    status = 429
    code = "too_many_requests"
    retry_after_s = _WINDOW_S


class LookupLimit:
    """Warehouse lookups per user and second, counted across replicas in Redis."""

    def __init__(self, client: aioredis.Redis, per_second: int) -> None:
        self._per_second = per_second
        self._spend = client.register_script(_SPEND)

    async def spend(self, user_id: str) -> None:
        """Count one lookup for ``user_id``; ``TooManyLookups`` beyond the limit."""
        if not self._per_second:
            return
        key = keys.warehouse_lookups_key(user_id)
        try:
            spent = await self._spend(keys=[key], args=[_WINDOW_S * 1000])
        except redis.exceptions.RedisError:
            return  # the lookup itself does not need Redis: a broken counter does not refuse it
        if spent > self._per_second:
            raise TooManyLookups(
                f"more than {self._per_second} lookups of uncached backtests a second; retry in {_WINDOW_S} s"
            )


class LookupTicket:
    """One request's share of its user's lookup budget: at most one lookup spent, whichever path asks.

    A lookup the request causes spends it, and so does a ``job_not_found``
    answer that caused none (someone else's job, an id whose miss is
    remembered): every request that ends in ``job_not_found`` costs its user
    one lookup, so the 429 beyond the budget tells an existing id from an
    unknown one no more than the answer itself does.
    """

    __slots__ = ("_limit", "_user_id", "spent")

    def __init__(self, limit: LookupLimit, user_id: str) -> None:
        self._limit = limit
        self._user_id = user_id
        self.spent = False

    async def spend(self) -> None:
        """Spend this request's one lookup (``TooManyLookups`` beyond the budget); later calls cost nothing."""
        if self.spent:
            return
        self.spent = True
        await self._limit.spend(self._user_id)


class BacktestLookups:
    """The metadata of backtests, from the cache or (bounded, misses remembered) the warehouse; one per application."""

    def __init__(self, warehouse: Warehouse, cache: BacktestCache, client: aioredis.Redis) -> None:
        self._warehouse = warehouse
        self._cache = cache
        self._limit = LookupLimit(client, warehouse.settings.max_lookups_per_user_per_s)
        self._in_flight: dict[tuple[str, str], asyncio.Future[BacktestRecord | None]] = {}

    def ticket(self, user_id: str) -> LookupTicket:
        """A request's share of ``user_id``'s lookup budget."""
        return LookupTicket(self._limit, user_id)

    async def backtest(self, backtest_id: str, ticket: LookupTicket) -> BacktestRecord:
        """The ``backtests`` row of ``backtest_id``; ``JobNotFound`` if there is none."""
        record, missing = await self._cache.record(backtest_id)
        if record is not None:
            return record
        if not missing:
            record = await self._shared(("backtest", backtest_id), ticket, lambda: self._find(backtest_id))
        if record is None:
            raise JobNotFound(f"Job '{backtest_id}' not found")
        return record

    async def backtest_of_job(self, job_id: str, ticket: LookupTicket) -> BacktestRecord | None:
        """The newest backtest a job produced, or None."""
        backtest_id, missing = await self._cache.job_backtest(job_id)
        if missing:
            return None
        if backtest_id is not None:
            record, _ = await self._cache.record(backtest_id)
            if record is not None:
                return record

        async def find() -> BacktestRecord | None:
            record = await self._warehouse.backtest_of_job(job_id)
            if record is None:
                await self._cache.remember_missing(keys.job_backtest_missing_key(job_id))
            else:
                await self._cache.store_job_backtest(job_id, record)
            return record

        return await self._shared(("job", job_id), ticket, find)

    async def _find(self, backtest_id: str) -> BacktestRecord | None:
        record = await self._warehouse.backtest(backtest_id)
        if record is None:
            await self._cache.remember_missing(keys.backtest_missing_key(backtest_id))
        else:
            await self._cache.store_record(record)
        return record

    def _done(self, key: tuple[str, str], pending: asyncio.Future[BacktestRecord | None]) -> None:
        self._in_flight.pop(key, None)
        if not pending.cancelled():
            pending.exception()  # retrieved here, in case every caller went away

    async def _shared(
        self, key: tuple[str, str], ticket: LookupTicket, find: Callable[[], Awaitable[BacktestRecord | None]]
    ) -> BacktestRecord | None:
        """One warehouse query per id at a time in this process; only the user who causes it spends a lookup."""
        pending = self._in_flight.get(key)
        if pending is None:
            await ticket.spend()
            pending = self._in_flight.get(key)  # another caller may have started it meanwhile
        if pending is None:
            pending = asyncio.ensure_future(find())
            self._in_flight[key] = pending
            pending.add_done_callback(partial(self._done, key))
        try:
            # shield: one caller going away must not cancel the others' query.
            return await asyncio.shield(pending)
        except WarehouseError as exc:
            raise warehouse_unavailable(exc) from exc
