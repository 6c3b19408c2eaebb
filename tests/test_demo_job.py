"""``make run``'s demo job on a real Valkey: it keeps producing, and a restart continues it.

The console's side (an open page resumes across a restart) is in
tests/js/browser.test.mjs, run by tests/test_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import redis.asyncio as aioredis

from gateway.devtools.devserver import DEMO_INTERVALS, DEMO_JOB, MINUTES_PER_DAY, write_demo_job
from gateway.devtools.embedded_redis import EmbeddedRedis
from gateway.sources import keys
from tests.helpers import make_candles

FAST: dict[str, Any] = {"tick_s": 0.002, "backfill_minutes": 400, "minutes_per_tick": 20, "steady_minutes_per_tick": 1}


async def stored(client: aioredis.Redis) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [msgspec.json.decode(raw) for raw in await client.lrange(keys.candles_key(DEMO_JOB, name), 0, -1)]
        for name in DEMO_INTERVALS
    }


async def run_until(client: aioredis.Redis, done: Callable[[int], bool], timeout_s: float = 30) -> None:
    """Run the demo writer until the minute list's length satisfies ``done``, then cancel it (a Ctrl-C)."""
    task = asyncio.create_task(write_demo_job(client, **FAST))
    try:
        async with asyncio.timeout(timeout_s):
            while not done(int(await client.llen(keys.candles_key(DEMO_JOB, "minute")))):
                assert not task.done(), task
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def assert_consistent(series: dict[str, list[dict[str, Any]]]) -> None:
    """Minutes one apart within a session, and every aggregate made of exactly its minutes."""
    minutes = series["minute"]
    times = [datetime.fromisoformat(candle["time"]) for candle in minutes]
    assert all(later > earlier for earlier, later in itertools.pairwise(times)), "strictly ascending"
    assert times[0] == datetime(2025, 4, 1, 9, 15, tzinfo=UTC)
    for size, name in ((3, "3minute"), (MINUTES_PER_DAY, "day")):
        # A cancel between the minute append and the aggregates' leaves them one tick behind (a restart
        # writes them with its first tick): at most one tick's minutes' worth of aggregates missing.
        one_tick = -(-FAST["minutes_per_tick"] // size)
        assert len(minutes) // size - one_tick <= len(series[name]) <= len(minutes) // size, name
        for index, aggregate in enumerate(series[name]):
            group = minutes[index * size : (index + 1) * size]
            assert (aggregate["open"], aggregate["close"]) == (group[0]["open"], group[-1]["close"]), (name, index)
            assert aggregate["volume"] == sum(candle["volume"] for candle in group), (name, index)


async def test_the_demo_job_keeps_running_past_its_fast_start(redis_client: aioredis.Redis):
    await run_until(redis_client, lambda length: length >= 400 + 60)
    assert (await redis_client.hget(keys.job_key(DEMO_JOB), "status")) == b"running"
    series = await stored(redis_client)
    assert_consistent(series)
    assert len(series["day"]) >= 1


async def test_a_restarted_demo_appends_to_its_job_and_never_rewrites_it(redis_client: aioredis.Redis):
    await run_until(redis_client, lambda length: length >= 430)
    first = await stored(redis_client)
    first_length = len(first["minute"])
    await run_until(redis_client, lambda length: length >= first_length + 400)  # past a day boundary
    second = await stored(redis_client)
    for name in DEMO_INTERVALS:
        assert second[name][: len(first[name])] == first[name], f"{name}: what was stored is unchanged"
        assert len(second[name]) > len(first[name]), f"{name}: and it grew"
    assert_consistent(second)
    assert (await redis_client.hget(keys.job_key(DEMO_JOB), "status")) == b"running"
    # The bar count follows each append in its own write, so the cancel that ends the run can land
    # between the two: it may lag the list by one tick's minutes, never more.
    current_bar = int(await redis_client.hget(keys.job_key(DEMO_JOB), "current_bar") or 0)
    assert len(second["minute"]) - FAST["minutes_per_tick"] <= current_bar <= len(second["minute"])
    assert current_bar > first_length


async def test_a_demo_job_of_another_series_is_written_afresh(redis_client: aioredis.Redis, writer: Any):
    job = writer(DEMO_JOB)
    await job.create(user_id="demo", symbol="LTF", exchange="NSE", intervals=list(DEMO_INTERVALS), status="completed")
    await job.append("minute", make_candles(50, step=timedelta(minutes=1)))
    await run_until(redis_client, lambda length: length >= 100)
    assert_consistent(await stored(redis_client))


async def test_make_runs_valkey_keeps_the_demo_job_across_a_restart(tmp_path):
    """``make run``'s embedded Valkey persists in its state directory: the next run continues the job."""
    lengths = []
    for _run in range(2):
        server = EmbeddedRedis(tmp_path / "valkey", persist=True)
        url = await asyncio.to_thread(server.start)
        client = aioredis.Redis.from_url(url)
        try:
            before = int(await client.llen(keys.candles_key(DEMO_JOB, "minute")))
            target = before + 430
            await run_until(client, lambda length: length >= target)  # noqa: B023 (called before the loop moves on)
            lengths.append((before, await stored(client)))
        finally:
            await client.aclose()
            await asyncio.to_thread(server.stop)
    (first_before, first), (second_before, second) = lengths
    assert first_before == 0
    assert second_before == len(first["minute"]), "the second run found what the first one wrote"
    assert second["minute"][: len(first["minute"])] == first["minute"]
    assert_consistent(second)
