"""One warehouse read per backtest interval, shared by every stream on every replica (issue 10),
and what authorization costs before it (issue 8, items 9-11), through the real endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.api_core import exceptions as google_exceptions

from gateway.app import create_app
from gateway.config import with_overrides
from gateway.devtools.bigquery_emulator import emulator_client
from gateway.sources import keys
from tests.conftest import DATASET, PROJECT
from tests.helpers import expected_points, open_stream, stream
from tests.sse_client import read_stream
from tests.test_backtests import new_backtest, wait_until_cached


class QueryLog:
    """Every query the gateways' BigQuery clients sent, with its parameters."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, dict[str, Any]]] = []
        # Queries matching this are refused as an unreachable BigQuery would.
        self.failing: str | None = None
        # Candle queries take this much longer (a slow warehouse).
        self.delay_s = 0.0

    def factory(self, settings):
        client = emulator_client(settings)
        original = client.query_and_wait

        def query_and_wait(query, **kwargs):
            parameters = {p.name: p.value for p in kwargs["job_config"].query_parameters}
            self.queries.append((query, parameters))
            if self.failing is not None and self.failing in query:
                raise google_exceptions.ServiceUnavailable("the warehouse is away")
            if "user_id" not in query:
                time.sleep(self.delay_s)  # on the executor thread, as a slow answer would keep it
            return original(query, **kwargs)

        client.query_and_wait = query_and_wait  # type: ignore[method-assign]
        return client

    def kinds(self) -> Counter[str]:
        """How many metadata lookups, first pages (with the count) and cursor pages, per interval."""
        counted: Counter[str] = Counter()
        for sql, parameters in self.queries:
            if "user_id" in sql:
                counted["metadata"] += 1
            elif "COUNT(*) OVER ()" in sql:
                counted[f"first:{parameters['interval']}"] += 1
            else:
                counted[f"after:{parameters['interval']}"] += 1
        return counted

    def clear(self) -> None:
        self.queries.clear()


@pytest.fixture
def query_log() -> QueryLog:
    return QueryLog()


@pytest.fixture
def bt_sections(emulator):
    return {"project": PROJECT, "dataset": DATASET, "api_endpoint": emulator.endpoint, "query_timeout_s": 5}


@pytest.fixture
def gateway(aiohttp_client, settings, redis_client, query_log, bt_sections):
    """A replica (same Redis) whose BigQuery client logs its queries into ``query_log``."""

    async def make(**sections: dict[str, Any]):
        merged = {"bigquery": {**bt_sections, **sections.pop("bigquery", {})}, **sections}
        app = create_app(with_overrides(settings, **merged), bigquery_client=query_log.factory)
        return await aiohttp_client(app)

    return make


def points_of(transcript, interval: str) -> list[dict[str, Any]]:
    return [
        p for e in transcript.named("data_chunk") if e.payload["interval"] == interval for p in e.payload["data_points"]
    ]


async def command_stats(redis_client) -> Counter[str]:
    info = await redis_client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()})


# -- issue 10: one read per interval, shared ------------------------------------


async def test_cold_stream_reads_each_uncached_interval_once_and_a_cached_one_not_at_all(gateway, query_log, bq, token):
    counts = {"day": 30, "minute": 2500, "3minute": 700}
    backtest_id, stored = new_backtest(bq, counts)
    client = await gateway(bigquery={"page_rows": 1000})
    cold = await stream(client, backtest_id, token=token(), intervals="day,minute,3minute", limit=50000)
    for name in counts:
        assert points_of(cold, name) == expected_points(stored[name])
    # One metadata lookup; per interval one first page (which counts) and cursor pages of 1,000 rows.
    assert query_log.kinds() == {"metadata": 1, "first:day": 1, "first:minute": 1, "after:minute": 2,
                                 "first:3minute": 1}  # fmt: skip
    query_log.clear()
    warm = await stream(client, backtest_id, token=token(), intervals="day,minute,3minute", limit=50000)
    assert [(e.event, e.payload) for e in warm.events] == [(e.event, e.payload) for e in cold.events]
    assert query_log.queries == []


async def test_interval_is_cached_the_moment_its_last_page_lands(gateway, bq, token, redis_client, query_log):
    backtest_id, stored = new_backtest(bq, {"minute": 1500})
    client = await gateway(bigquery={"page_rows": 500})
    await stream(client, backtest_id, token=token(), intervals="minute", limit=50000)
    # No background copy to wait for: the read that served the stream is the cache.
    complete = await redis_client.hgetall(keys.backtest_complete_key(backtest_id))
    assert complete == {b"minute": b"1500"}
    assert await redis_client.exists(keys.backtest_staging_key(backtest_id, "minute")) == 0
    down = await gateway(bigquery={"api_endpoint": "http://127.0.0.1:9", "query_timeout_s": 1})
    query_log.clear()
    again = await stream(down, backtest_id, token=token(), intervals="minute", limit=50000)
    assert points_of(again, "minute") == expected_points(stored["minute"])
    assert query_log.queries == []


async def test_cold_stream_reads_chunk_sized_ranges_and_the_fill_writes_one_page_at_a_time(
    gateway, bq, token, redis_url
):
    backtest_id, stored = new_backtest(bq, {"day": 50, "minute": 2600})
    client = await gateway(bigquery={"page_rows": 800})
    commands: list[str] = []
    watching = asyncio.Event()

    async def watch() -> None:
        monitor_client = aioredis.Redis.from_url(redis_url)
        try:
            async with monitor_client.monitor() as monitor:
                watching.set()
                while True:
                    commands.append((await monitor.next_command())["command"])
        finally:
            await monitor_client.aclose()

    watcher = asyncio.create_task(watch())
    await watching.wait()
    try:
        transcript = await stream(
            client, backtest_id, token=token(), intervals="minute,day", limit=50000, chunk_size=200
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert points_of(transcript, "minute") == expected_points(stored["minute"])
    tag = f"bt:{{{backtest_id}}}"
    ranges = [c.split() for c in commands if c.startswith("LRANGE") and tag in c]
    # Every stream read is one chunk (200 points) at most: memory is a few chunks, not a page per interval.
    assert ranges and max(int(stop) - int(start) + 1 for _, _, start, stop in ranges) <= 200
    # The fill writes one page at a time (EVALSHA sha 5 keys... 6 arguments, then the page's rows).
    # (A set: redis-py sends a script's first EVALSHA again after loading it, NOSCRIPT.)
    appends = [c.split() for c in set(commands) if c.startswith("EVALSHA") and tag in c and ":staging:" in c]
    pages = [len(words) - 14 for words in appends if words[2] == "5"]
    assert sorted(pages) == [50, 200, 800, 800, 800]


async def test_concurrent_cold_streams_on_two_replicas_share_one_read_per_interval(gateway, query_log, bq, token):
    counts = {"day": 40, "minute": 1800, "3minute": 600}
    backtest_id, stored = new_backtest(bq, counts)
    replicas = [await gateway(bigquery={"page_rows": 500}, server={"max_streams_per_user": 0}) for _ in range(2)]
    transcripts = await asyncio.gather(
        *(
            stream(replicas[n % 2], backtest_id, token=token(), intervals="day,minute,3minute", limit=50000,
                   chunk_size=200, order="interleaved" if n % 3 else "sequential")
            for n in range(10)
        )
    )  # fmt: skip
    for transcript in transcripts:
        assert transcript.names[-1] == "all_complete"
        for name in counts:
            assert points_of(transcript, name) == expected_points(stored[name])
    kinds = query_log.kinds()
    # One lookup per replica at most (concurrent lookups in one process share one query).
    assert kinds.pop("metadata") <= 2
    assert kinds == {"first:day": 1, "first:minute": 1, "after:minute": 3, "first:3minute": 1, "after:3minute": 1}


async def test_warehouse_failure_mid_read_is_data_error_and_a_reconnect_resumes_the_read(
    gateway, query_log, bq, token, redis_client
):
    backtest_id, stored = new_backtest(bq, {"day": 10, "minute": 1200})
    broken = await gateway(bigquery={"page_rows": 500})
    query_log.failing = "time >= @after"  # the first page comes, the next ones do not
    params = {"intervals": "minute,day", "limit": 50000, "chunk_size": 250}
    first = await stream(broken, backtest_id, token=token(), **params)
    assert first.names == ["interval_start"] + ["data_chunk"] * 2 + ["error"] + [
        "interval_start", "data_chunk", "interval_complete", "all_complete"
    ]  # fmt: skip
    error = first.events[3].payload
    assert (error["error"], error["interval"], error["points_sent"]) == ("data_error", "minute", 500)
    assert "warehouse" in error["message"]
    # The partial entry is not the cache: day is complete, minute is not.
    assert await redis_client.hgetall(keys.backtest_complete_key(backtest_id)) == {b"day": b"10"}
    # The client reconnects after the last chunk it got; the read resumes after the staged rows.
    query_log.failing = None
    query_log.clear()
    healthy = await gateway(bigquery={"page_rows": 500})
    resumed = await stream(healthy, backtest_id, token=token(), headers={"Last-Event-ID": first.events[2].id}, **params)
    minute = points_of(first, "minute") + points_of(resumed, "minute")
    assert minute == expected_points(stored["minute"])
    assert query_log.kinds() == {"after:minute": 2}  # no metadata (cached), no count again, no row twice
    assert [parameters["rows"] for _, parameters in query_log.queries] == [501, 201]  # each with the cursor's row


async def test_dead_fillers_lock_lapses_and_a_reader_takes_over_after_what_it_staged(
    gateway, query_log, bq, token, redis_client
):
    backtest_id, stored = new_backtest(bq, {"minute": 900})
    # What a replica that died mid-read leaves: its lock, the count, 300 staged rows.
    client = await gateway(bigquery={"page_rows": 300, "fill_lock_ttl_s": 1.0})
    await stream(client, backtest_id, token=token(), intervals="minute", limit=1)  # caches the metadata
    await wait_until_cached(redis_client, backtest_id, ["minute"])
    final = keys.backtest_candles_key(backtest_id, "minute")
    rows = await redis_client.lrange(final, 0, 299)
    await redis_client.delete(final, keys.backtest_complete_key(backtest_id))
    await redis_client.rpush(keys.backtest_staging_key(backtest_id, "minute"), *rows)
    await redis_client.hset(keys.backtest_fill_key(backtest_id, "minute"), "count", 900)
    await redis_client.set(keys.backtest_fill_lock_key(backtest_id, "minute"), "dead-replica", px=1000)
    query_log.clear()
    started = asyncio.get_running_loop().time()
    transcript = await stream(client, backtest_id, token=token(), intervals="minute", limit=50000, chunk_size=100)
    assert 0.5 < asyncio.get_running_loop().time() - started < 15  # waited for the lapse; no hang
    assert transcript.names[-1] == "all_complete"
    assert points_of(transcript, "minute") == expected_points(stored["minute"])
    assert query_log.kinds() == {"after:minute": 2}  # resumed after row 300: no count, no row read twice


async def test_a_read_slower_than_the_lock_ttl_keeps_its_lock_and_is_not_read_twice(gateway, query_log, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 20, "minute": 600})
    sections = {"bigquery": {"page_rows": 250, "fill_lock_ttl_s": 1.0}, "server": {"max_streams_per_user": 0}}
    replicas = [await gateway(**sections), await gateway(**sections)]
    query_log.delay_s = 1.3  # every page outlives the lock's TTL: only the refresh keeps it
    transcripts = await asyncio.gather(
        *(stream(replicas[n % 2], backtest_id, token=token(), intervals="day,minute", limit=50000) for n in range(4))
    )
    for transcript in transcripts:
        assert points_of(transcript, "minute") == expected_points(stored["minute"])
    assert query_log.kinds() - Counter(metadata=2) == {"first:day": 1, "first:minute": 1, "after:minute": 2}


async def test_partial_staging_is_never_served_as_complete(gateway, query_log, bq, token, redis_client):
    backtest_id, stored = new_backtest(bq, {"day": 8})
    staging = keys.backtest_staging_key(backtest_id, "day")
    # Rows staged without a count (a filler that died before it knew it): started over.
    await redis_client.rpush(staging, b'{"bogus": 1}')
    client = await gateway()
    transcript = await stream(client, backtest_id, token=token(), intervals="day")
    assert points_of(transcript, "day") == expected_points(stored["day"])
    assert query_log.kinds() == {"metadata": 1, "first:day": 1}


# -- issue 8, items 9-11: nothing before the owner check, misses remembered, lookups bounded --


async def test_non_owner_of_a_backtest_causes_only_the_metadata_lookup(gateway, query_log, bq, token, redis_client):
    backtest_id, _ = new_backtest(bq, {"day": 5, "minute": 50}, user_id="bob")
    client = await gateway()
    before = await command_stats(redis_client)
    transcript = await stream(client, backtest_id, token=token("alice"), intervals="day,minute")
    after = await command_stats(redis_client)
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert query_log.kinds() == {"metadata": 1}
    # No count, no list read, no fill script: only the describe read (and the stream slot, the lookup budget).
    used = after - before
    assert not {"llen", "lrange", "lindex", "hget", "hmget", "rpush", "rename"} & set(used), used
    assert sorted(await redis_client.keys(f"bt:{{{backtest_id}}}*")) == [keys.backtest_meta_key(backtest_id).encode()]
    # And again, now that the metadata is cached: no query at all.
    query_log.clear()
    again = await stream(client, backtest_id, token=token("alice"), intervals="day,minute")
    assert again.events[0].payload["error"] == "job_not_found"
    assert query_log.queries == []


async def test_non_owner_of_a_completed_job_served_from_the_warehouse_causes_only_its_lookup(
    gateway, query_log, bq, token, redis_client
):
    new_backtest(bq, {"day": 5}, user_id="bob", job_id="bobs-gone-job")
    client = await gateway()
    transcript = await stream(client, "bobs-gone-job", token=token("alice"), intervals="day")
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert query_log.kinds() == {"metadata": 1}
    assert await redis_client.keys("bt:*staging*") == await redis_client.keys("bt:*fill*") == []


async def test_job_hash_naming_someone_elses_backtest_hands_over_nothing(gateway, query_log, bq, token, writer):
    backtest_id, _ = new_backtest(bq, {"day": 5}, user_id="bob", job_id="bobs-job")
    w = writer("alices-job")
    await w.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"], status="completed")
    await w.update(backtest_id=backtest_id)  # no candle lists: served from the warehouse
    client = await gateway()
    transcript = await stream(client, "alices-job", token=token("alice"), intervals="day")
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert query_log.kinds() == {"metadata": 1}


async def test_unknown_ids_are_looked_up_once_per_missing_ttl_on_any_replica(gateway, query_log, token):
    replicas = [await gateway(), await gateway()]
    for n in range(4):
        for name in ("bt_404.000", "no-such-job"):
            transcript = await stream(replicas[n % 2], name, token=token(), intervals="day")
            assert transcript.events[0].payload["error"] == "job_not_found"
    assert query_log.kinds() == {"metadata": 2}  # one per id, not one per request


async def test_lookups_beyond_the_per_user_rate_are_refused_with_429(gateway, query_log, token):
    client = await gateway(bigquery={"max_lookups_per_user_per_s": 3}, server={"max_streams_per_user": 0})

    async def probe(n: int) -> int:
        response = await open_stream(client, f"bt_9{n}.000", token=token("prober"), intervals="day")
        if response.status == 429:
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"] == "too_many_requests"
        else:
            assert (await read_stream(response)).events[0].payload["error"] == "job_not_found"
        return response.status

    # At once: the counts fall within two one-second windows at most, so at least two are refused.
    statuses = await asyncio.gather(*(probe(n) for n in range(8)))
    assert statuses.count(429) >= 2
    assert query_log.kinds()["metadata"] == statuses.count(200) <= 6
    # Another user is not slowed by the prober.
    other = await stream(client, "bt_42.000", token=token("someone"), intervals="day")
    assert other.events[0].payload["error"] == "job_not_found"


async def test_a_job_found_in_the_warehouse_by_its_job_id_is_looked_up_once(gateway, query_log, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 4}, job_id="gone-job")
    client = await gateway()
    for _ in range(3):
        transcript = await stream(client, "gone-job", token=token(), intervals="day")
        assert transcript.events[0].payload["backtest_id"] == backtest_id
        assert points_of(transcript, "day") == expected_points(stored["day"])
    assert query_log.kinds() == {"metadata": 1, "first:day": 1}


# -- issue 20, item 11: the lookup budget tells an existing job id from an unknown one no more --


async def test_someone_elses_job_costs_a_lookup_like_an_unknown_id(gateway, query_log, token, writer):
    """Past the per-user budget, an existing job of someone else is 429 as an unknown id is, not job_not_found."""
    from tests.helpers import seed_job

    client = await gateway(bigquery={"max_lookups_per_user_per_s": 3}, server={"max_streams_per_user": 0})
    await seed_job(writer("someone-elses-job"), user_id="owner", counts={"day": 3})

    async def probe(job_id: str) -> int:
        response = await open_stream(client, job_id, token=token("prober"), intervals="day")
        if response.status == 200:
            assert (await read_stream(response)).events[0].payload["error"] == "job_not_found"
        return response.status

    for attempt in range(5):
        started = time.monotonic()
        # The budget spent: three unknown job ids, each looked up in the warehouse.
        spent = [await probe(f"unknown-job-{attempt}-{n}") for n in range(3)]
        existing = await probe("someone-elses-job")
        remembered = await probe(f"unknown-job-{attempt}-0")  # its miss is remembered: no lookup, still a cost
        if time.monotonic() - started < 0.5:  # all within one counting window
            break
        await asyncio.sleep(1.1)
    assert spent == [200, 200, 200]
    assert existing == 429, "someone else's job answered beyond the budget: it tells existing from unknown"
    assert remembered == 429
    # The owner is not charged for their own job.
    own = await open_stream(client, "someone-elses-job", token=token("owner"), intervals="day")
    assert own.status == 200
