"""The jobs the benchmark streams, written as a job worker writes them (``gateway.workers.JobWriter``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import redis.asyncio as aioredis

from gateway.sources.candles import Candle
from gateway.workers import JobWriter, candle

INTERVALS: Final = ("day", "minute", "3minute")
_STEPS: Final = {"day": timedelta(days=1), "minute": timedelta(minutes=1), "3minute": timedelta(minutes=3)}
_START: Final = datetime(2020, 1, 1, tzinfo=UTC)
_APPEND_BATCH: Final = 5000  # candles per append, as a worker catching up would write them

# The candle at ``index`` of ``interval``, whose time is given.
MakeCandle = Callable[[str, int, datetime], Candle]


def steady_candle(interval: str, index: int, time: datetime) -> Candle:
    """A repeating series: cheap to make, and every run streams the same bytes."""
    return candle(time, 1000 + index % 97 * 0.25, 1001.5, 998.75, 1000.5, 1000 + index)


class RandomWalk:
    """Random-walk candles (prices move by a few ticks, volumes vary), as varied as real ones.

    Seeded, so every run streams the same bytes; each interval's walk starts at 1,000.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._interval = ""
        self._price = 1000.0

    def __call__(self, interval: str, index: int, time: datetime) -> Candle:
        if interval != self._interval:
            self._interval, self._price = interval, 1000.0
        rng, open_ = self._rng, self._price
        close = round(open_ + rng.gauss(0, 1.5), 2)
        high = round(max(open_, close) + abs(rng.gauss(0, 1)), 2)
        low = round(min(open_, close) - abs(rng.gauss(0, 1)), 2)
        self._price = close
        return candle(time, round(open_, 2), high, low, close, rng.randint(100, 900_000))


async def write_job(
    client: aioredis.Redis,
    job_id: str,
    points: int,
    *,
    status: str = "running",
    make: MakeCandle = steady_candle,
) -> None:
    """A job of 3 intervals x ``points`` candles made by ``make``, in order."""
    writer = JobWriter(client, job_id)
    await writer.create(
        user_id="bench", symbol="LTF", exchange="NSE", intervals=INTERVALS, status=status, current_bar=1
    )
    for interval in INTERVALS:
        step = _STEPS[interval]
        for first in range(0, points, _APPEND_BATCH):
            stop = min(first + _APPEND_BATCH, points)
            await writer.append(interval, [make(interval, i, _START + i * step) for i in range(first, stop)])


async def write_idle_job(client: aioredis.Redis, job_id: str) -> None:
    """A running job with one day candle that never gets another: followers of it stay idle."""
    idle = JobWriter(client, job_id)
    await idle.create(user_id="bench", symbol="LTF", exchange="NSE", intervals=["day"], status="running")
    await idle.append("day", [candle(_START, 1.0, 2.0, 0.5, 1.5, 10)])
