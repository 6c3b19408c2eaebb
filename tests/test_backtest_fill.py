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

from gateway.app import create_app
from gateway.config import with_overrides
from gateway.devtools.bigquery_emulator import emulator_client
from gateway.devtools.bigquery_proxy import CountingProxy
from gateway.sources import keys
from tests.conftest import DATASET, PROJECT
from tests.helpers import expected_points, open_stream, stream
from tests.sse_client import read_stream
from tests.test_backtests import new_backtest, wait_until_cached


@pytest.fixture
def bt_sections(bq_proxy):
    return {"project": PROJECT, "dataset": DATASET, "api_endpoint": bq_proxy.url, "query_timeout_s": 5}


@pytest.fixture
def gateway(aiohttp_client, settings, redis_client, bt_sections):
    """A replica (same Redis) whose BigQuery client goes through the counting bq_proxy."""

    async def make(**sections: dict[str, Any]):
        merged = {"bigquery": {**bt_sections, **sections.pop("bigquery", {})}, **sections}
        app = create_app(with_overrides(settings, **merged), bigquery_client=emulator_client)
        return await aiohttp_client(app)

    return make


def queries(bq_proxy: CountingProxy) -> Counter[str]:
    """The billed requests only: ``query:metadata``, ``query:candles``."""
    return Counter({kind: n for kind, n in bq_proxy.counts().items() if kind.startswith("query:")})


def points_of(transcript, interval: str) -> list[dict[str, Any]]:
    return [
        p for e in transcript.named("data_chunk") if e.payload["interval"] == interval for p in e.payload["data_points"]
    ]


async def command_stats(redis_client) -> Counter[str]:
    info = await redis_client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()})


# -- issue 10: one read per interval, shared ------------------------------------


async def test_cold_stream_reads_each_uncached_interval_once_and_a_cached_one_not_at_all(gateway, bq_proxy, bq, token):
    counts = {"day": 30, "minute": 2500, "3minute": 700}
    backtest_id, stored = new_backtest(bq, counts)
    client = await gateway(bigquery={"page_rows": 1000})
    cold = await stream(client, backtest_id, token=token(), intervals="day,minute,3minute", limit=50000)
    for name in counts:
        assert points_of(cold, name) == expected_points(stored[name])
    # One metadata lookup and one query per interval; the rest of minute is pages of its result.
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 3}
    assert bq_proxy.counts()["page"] == 2  # minute's rows 1,000-1,999 and 2,000-2,499
    assert {s.query["startIndex"] for s in bq_proxy.seen if "startIndex" in s.query} == {"1000"}
    bq_proxy.clear()
    warm = await stream(client, backtest_id, token=token(), intervals="day,minute,3minute", limit=50000)
    assert [(e.event, e.payload) for e in warm.events] == [(e.event, e.payload) for e in cold.events]
    assert bq_proxy.seen == []


async def test_interval_is_cached_the_moment_its_last_page_lands(gateway, bq, token, redis_client, bq_proxy):
    backtest_id, stored = new_backtest(bq, {"minute": 1500})
    client = await gateway(bigquery={"page_rows": 500})
    await stream(client, backtest_id, token=token(), intervals="minute", limit=50000)
    # No background copy to wait for: the read that served the stream is the cache.
    complete = await redis_client.hgetall(keys.backtest_complete_key(backtest_id))
    assert complete == {b"minute": b"1500"}
    assert await redis_client.exists(keys.backtest_staging_key(backtest_id, "minute")) == 0
    down = await gateway(bigquery={"api_endpoint": "http://127.0.0.1:9", "query_timeout_s": 1})
    bq_proxy.clear()
    again = await stream(down, backtest_id, token=token(), intervals="minute", limit=50000)
    assert points_of(again, "minute") == expected_points(stored["minute"])
    assert bq_proxy.seen == []


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
    # The fill writes one page at a time (EVALSHA sha 5 keys... 7 arguments, then the page's rows).
    # (A set: redis-py sends a script's first EVALSHA again after loading it, NOSCRIPT.)
    appends = [c.split() for c in set(commands) if c.startswith("EVALSHA") and tag in c and ":staging:" in c]
    pages = [len(words) - 15 for words in appends if words[2] == "5"]
    assert sorted(pages) == [50, 200, 800, 800, 800]


async def test_concurrent_cold_streams_on_two_replicas_share_one_read_per_interval(gateway, bq_proxy, bq, token):
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
    kinds = queries(bq_proxy)
    # One lookup per replica at most (concurrent lookups in one process share one query).
    assert kinds.pop("query:metadata") <= 2
    assert kinds == {"query:candles": 3}  # one per interval, for 10 streams on two replicas


async def _failed_mid_read(gateway, bq_proxy, bq, token, redis_client):
    """A cold stream whose warehouse stops answering after minute's first page: every page request is cut."""
    backtest_id, stored = new_backtest(bq, {"day": 10, "minute": 1200})
    broken = await gateway(bigquery={"page_rows": 500, "query_timeout_s": 2})
    bq_proxy.cut_pages = 10_000  # the query and its first page come; the client's retries of page 2 all fail
    params = {"intervals": "minute,day", "limit": 50000, "chunk_size": 250}
    first = await stream(broken, backtest_id, token=token(), **params)
    assert bq_proxy.cuts >= 1
    assert first.names == ["interval_start"] + ["data_chunk"] * 2 + ["error"] + [
        "interval_start", "data_chunk", "interval_complete", "all_complete"
    ]  # fmt: skip
    error = first.events[3].payload
    assert (error["error"], error["interval"], error["points_sent"]) == ("data_error", "minute", 500)
    assert "warehouse" in error["message"]
    # The partial entry is not the cache: day is complete, minute is not.
    assert await redis_client.hgetall(keys.backtest_complete_key(backtest_id)) == {b"day": b"10"}
    (minute_query,) = bq_proxy.queries("candles", interval="minute")
    bq_proxy.cut_pages = 0
    bq_proxy.clear()
    return backtest_id, stored, params, first, minute_query.job_id


async def test_read_failed_mid_interval_resumes_from_the_same_result_without_a_query(
    gateway, bq_proxy, bq, token, redis_client
):
    backtest_id, stored, params, first, job_id = await _failed_mid_read(gateway, bq_proxy, bq, token, redis_client)
    # The client reconnects after the last chunk it got; the read goes on from the same result.
    healthy = await gateway(bigquery={"page_rows": 500})
    resumed = await stream(healthy, backtest_id, token=token(), headers={"Last-Event-ID": first.events[2].id}, **params)
    minute = points_of(first, "minute") + points_of(resumed, "minute")
    assert minute == expected_points(stored["minute"])
    assert queries(bq_proxy) == {}  # no metadata (cached), no candle query: the result still exists
    pages = [s for s in bq_proxy.seen if s.kind == "page"]
    assert {page.job_id for page in pages} == {job_id}
    assert pages[0].query["startIndex"] == "500"  # after the staged rows: none read twice


async def test_read_whose_result_is_gone_runs_one_query_from_the_cursor(gateway, bq_proxy, bq, token, redis_client):
    backtest_id, stored, params, first, job_id = await _failed_mid_read(gateway, bq_proxy, bq, token, redis_client)
    bq.delete_job_metadata(job_id)  # BigQuery drops a result after about a day: the emulator, at once
    healthy = await gateway(bigquery={"page_rows": 500})
    resumed = await stream(healthy, backtest_id, token=token(), headers={"Last-Event-ID": first.events[2].id}, **params)
    assert points_of(first, "minute") + points_of(resumed, "minute") == expected_points(stored["minute"])
    (query,) = bq_proxy.queries()
    assert query.purpose == "candles"
    assert "time > @after" in query.sql  # from the last staged candle on, not from the start


async def test_page_cut_mid_answer_is_fetched_again_from_the_same_result(gateway, bq_proxy, bq, token):
    backtest_id, stored = new_backtest(bq, {"minute": 3000})
    client = await gateway(bigquery={"page_rows": 1000})
    bq_proxy.cut_pages = 1  # the first page request after the query: half its answer, then the socket is aborted
    transcript = await stream(client, backtest_id, token=token(), intervals="minute", limit=50000)
    assert bq_proxy.cuts == 1
    assert transcript.names[-1] == "all_complete"
    assert points_of(transcript, "minute") == expected_points(stored["minute"])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 1}
    pages = [(s.job_id, s.query.get("startIndex"), s.query.get("pageToken")) for s in bq_proxy.seen if s.kind == "page"]
    assert len(pages) == len(set(pages)) + 1  # one page asked for twice, nothing else


async def test_jobless_answers_cost_one_query_per_interval_too(gateway, bq_proxy, bq, token, redis_client):
    backtest_id, stored = new_backtest(bq, {"day": 30, "minute": 2500})
    bq_proxy.jobless = True  # as BigQuery's JOB_CREATION_OPTIONAL: a result that fits its answer has no job
    client = await gateway(bigquery={"page_rows": 1000})
    transcript = await stream(client, backtest_id, token=token(), intervals="day,minute", limit=50000)
    for name in ("day", "minute"):
        assert points_of(transcript, name) == expected_points(stored[name])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 2}
    # day came whole with its answer, without a job; minute's query had more pages, so it kept its job.
    (day,), (minute,) = bq_proxy.queries("candles", interval="day"), bq_proxy.queries("candles", interval="minute")
    assert day.job_id is None and minute.job_id is not None
    assert {page.job_id for page in bq_proxy.seen if page.kind == "page"} == {minute.job_id}
    assert await redis_client.hgetall(keys.backtest_complete_key(backtest_id)) == {b"day": b"30", b"minute": b"2500"}


async def test_query_still_running_when_answered_is_waited_for_without_a_second_query(gateway, bq_proxy, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 30, "minute": 2500})
    bq_proxy.still_running = True  # every answer: "job not complete", no rows (a query past its timeoutMs)
    client = await gateway(bigquery={"page_rows": 1000})
    transcript = await stream(client, backtest_id, token=token(), intervals="day,minute", limit=50000)
    assert transcript.names[-1] == "all_complete"
    for name in ("day", "minute"):
        assert points_of(transcript, name) == expected_points(stored[name])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 2}


async def test_dead_fillers_lock_lapses_and_a_reader_takes_over_after_what_it_staged(
    gateway, bq_proxy, bq, token, redis_client
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
    bq_proxy.clear()
    started = asyncio.get_running_loop().time()
    transcript = await stream(client, backtest_id, token=token(), intervals="minute", limit=50000, chunk_size=100)
    assert 0.5 < asyncio.get_running_loop().time() - started < 15  # waited for the lapse; no hang
    assert transcript.names[-1] == "all_complete"
    assert points_of(transcript, "minute") == expected_points(stored["minute"])
    # No result to go on from (the dead filler never wrote one): one query from row 300's time on.
    (query,) = bq_proxy.queries()
    assert query.purpose == "candles" and "time > @after" in query.sql


async def test_a_read_slower_than_the_lock_ttl_keeps_its_lock_and_is_not_read_twice(gateway, bq_proxy, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 20, "minute": 600})
    sections = {"bigquery": {"page_rows": 250, "fill_lock_ttl_s": 1.0}, "server": {"max_streams_per_user": 0}}
    replicas = [await gateway(**sections), await gateway(**sections)]
    bq_proxy.delay_s = 1.3  # every query and page outlives the lock's TTL: only the refresh keeps it
    transcripts = await asyncio.gather(
        *(stream(replicas[n % 2], backtest_id, token=token(), intervals="day,minute", limit=50000) for n in range(4))
    )
    for transcript in transcripts:
        assert points_of(transcript, "minute") == expected_points(stored["minute"])
    assert queries(bq_proxy) - Counter({"query:metadata": 2}) == {"query:candles": 2}


async def test_partial_staging_is_never_served_as_complete(gateway, bq_proxy, bq, token, redis_client):
    backtest_id, stored = new_backtest(bq, {"day": 8})
    staging = keys.backtest_staging_key(backtest_id, "day")
    # Rows staged without a count (a filler that died before it knew it): started over.
    await redis_client.rpush(staging, b'{"bogus": 1}')
    client = await gateway()
    transcript = await stream(client, backtest_id, token=token(), intervals="day")
    assert points_of(transcript, "day") == expected_points(stored["day"])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 1}


# -- issue 8, items 9-11: nothing before the owner check, misses remembered, lookups bounded --


async def test_non_owner_of_a_backtest_causes_only_the_metadata_lookup(gateway, bq_proxy, bq, token, redis_client):
    backtest_id, _ = new_backtest(bq, {"day": 5, "minute": 50}, user_id="bob")
    client = await gateway()
    before = await command_stats(redis_client)
    transcript = await stream(client, backtest_id, token=token("alice"), intervals="day,minute")
    after = await command_stats(redis_client)
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert queries(bq_proxy) == {"query:metadata": 1}
    # No count, no list read, no fill script: only the describe read (and the stream slot, the lookup budget).
    used = after - before
    assert not {"llen", "lrange", "lindex", "hget", "hmget", "rpush", "rename"} & set(used), used
    assert sorted(await redis_client.keys(f"bt:{{{backtest_id}}}*")) == [keys.backtest_meta_key(backtest_id).encode()]
    # And again, now that the metadata is cached: no query at all.
    bq_proxy.clear()
    again = await stream(client, backtest_id, token=token("alice"), intervals="day,minute")
    assert again.events[0].payload["error"] == "job_not_found"
    assert bq_proxy.seen == []


async def test_non_owner_of_a_completed_job_served_from_the_warehouse_causes_only_its_lookup(
    gateway, bq_proxy, bq, token, redis_client
):
    new_backtest(bq, {"day": 5}, user_id="bob", job_id="bobs-gone-job")
    client = await gateway()
    transcript = await stream(client, "bobs-gone-job", token=token("alice"), intervals="day")
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert queries(bq_proxy) == {"query:metadata": 1}
    assert await redis_client.keys("bt:*staging*") == await redis_client.keys("bt:*fill*") == []


async def test_job_hash_naming_someone_elses_backtest_hands_over_nothing(gateway, bq_proxy, bq, token, writer):
    backtest_id, _ = new_backtest(bq, {"day": 5}, user_id="bob", job_id="bobs-job")
    w = writer("alices-job")
    await w.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"], status="completed")
    await w.update(backtest_id=backtest_id)  # no candle lists: served from the warehouse
    client = await gateway()
    transcript = await stream(client, "alices-job", token=token("alice"), intervals="day")
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "job_not_found"
    assert queries(bq_proxy) == {"query:metadata": 1}


async def test_unknown_ids_are_looked_up_once_per_missing_ttl_on_any_replica(gateway, bq_proxy, token):
    replicas = [await gateway(), await gateway()]
    for n in range(4):
        for name in ("bt_404.000", "no-such-job"):
            transcript = await stream(replicas[n % 2], name, token=token(), intervals="day")
            assert transcript.events[0].payload["error"] == "job_not_found"
    assert queries(bq_proxy) == {"query:metadata": 2}  # one per id, not one per request


async def test_lookups_beyond_the_per_user_rate_are_refused_with_429(gateway, bq_proxy, token):
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
    assert queries(bq_proxy)["query:metadata"] == statuses.count(200) <= 6
    # Another user is not slowed by the prober.
    other = await stream(client, "bt_42.000", token=token("someone"), intervals="day")
    assert other.events[0].payload["error"] == "job_not_found"


async def test_a_job_found_in_the_warehouse_by_its_job_id_is_looked_up_once(gateway, bq_proxy, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 4}, job_id="gone-job")
    client = await gateway()
    for _ in range(3):
        transcript = await stream(client, "gone-job", token=token(), intervals="day")
        assert transcript.events[0].payload["backtest_id"] == backtest_id
        assert points_of(transcript, "day") == expected_points(stored["day"])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 1}


# -- issue 20, item 11: the lookup budget tells an existing job id from an unknown one no more --


async def test_someone_elses_job_costs_a_lookup_like_an_unknown_id(gateway, bq_proxy, token, writer):
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
