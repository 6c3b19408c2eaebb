"""Completed backtests from the BigQuery emulator, cached in Redis (SPEC 8), through the real endpoint."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, date, datetime

import pytest

from gateway.devtools.bigquery_emulator import (
    insert_backtest,
    insert_candles,
)
from gateway.sources import keys
from tests.conftest import DATASET, PROJECT
from tests.helpers import STEPS, expected_points, make_candles, open_stream, stream

_ids = itertools.count(1)


@pytest.fixture
def bt_settings(emulator):
    return {
        "bigquery": {
            "project": PROJECT,
            "dataset": DATASET,
            "api_endpoint": emulator.endpoint,
            "query_timeout_s": 5,
        }
    }


@pytest.fixture
async def bt_client(make_gateway, bt_settings):
    return await make_gateway(**bt_settings)


@pytest.fixture
def down_warehouse_gateway(make_gateway, unused_tcp_port):
    """Another replica, same Redis, whose warehouse address answers nothing."""
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    settings = {"project": PROJECT, "dataset": DATASET, "api_endpoint": dead, "query_timeout_s": 2}
    return lambda: make_gateway(bigquery=settings)


def new_backtest(bq, counts: dict[str, int], *, user_id="alice", intervals=None, job_id=None) -> tuple[str, dict]:
    """A backtest with ``counts`` candles per interval, inserted through the official client."""
    backtest_id = f"bt_{1737530000 + next(_ids)}.123"
    insert_backtest(bq, DATASET, "backtests", {
        "backtest_id": backtest_id, "user_id": user_id, "symbol": "LTF", "exchange": "NSE",
        "intervals": list(intervals if intervals is not None else counts),
        "from_date": date(2025, 4, 1), "to_date": date(2025, 6, 30), "job_id": job_id,
        "created_at": datetime(2025, 7, 1, tzinfo=UTC),
    })  # fmt: skip
    stored = {}
    for interval, count in counts.items():
        stored[interval] = make_candles(count, step=STEPS[interval])
        rows = [
            {"backtest_id": backtest_id, "interval": interval, "time": c.time, "open": c.open,
             "high": c.high, "low": c.low, "close": c.close, "volume": c.volume}
            for c in stored[interval]
        ]  # fmt: skip
        insert_candles(bq, DATASET, "candles", rows)
    return backtest_id, stored


async def wait_until_cached(redis_client, backtest_id, intervals):
    for _ in range(200):
        complete = await redis_client.hgetall(keys.backtest_complete_key(backtest_id))
        if all(name.encode() in complete for name in intervals):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{backtest_id} {intervals} never cached")


async def test_backtest_streams_every_event_as_the_spec_shows(bt_client, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 103, "minute": 1200, "3minute": 400}, job_id="job-77")
    transcript = await stream(bt_client, backtest_id, token=token(), intervals="day,minute,3minute", limit=5000)
    assert transcript.names == (
        ["interval_start", "data_chunk", "interval_complete"]
        + ["interval_start"]
        + ["data_chunk"] * 3
        + ["interval_complete"]
        + ["interval_start"]
        + ["data_chunk"]
        + ["interval_complete"]
        + ["all_complete"]
    )
    assert transcript.events[0].payload == {
        "interval": "day", "interval_index": 0, "total_intervals": 3, "total_points": 103, "total_chunks": 1,
        "chunk_size": 500, "backtest_id": backtest_id, "job_id": "job-77", "symbol": "LTF", "exchange": "NSE",
        "is_partial": False, "current_bar": None, "job_status": "completed",
    }  # fmt: skip
    for event in transcript.events[:-1]:
        assert event.payload["is_partial"] is False
        assert event.payload["job_status"] == "completed"
        assert event.payload.get("backtest_id", backtest_id) == backtest_id  # data_chunk has no ids
    for name in ("day", "minute", "3minute"):
        points = [
            p for e in transcript.named("data_chunk") if e.payload["interval"] == name for p in e.payload["data_points"]
        ]
        assert points == expected_points(stored[name])
    assert transcript.events[-1].payload == {
        "intervals": ["day", "minute", "3minute"], "completed_intervals": ["day", "minute", "3minute"],
        "total_points": {"day": 103, "minute": 1200, "3minute": 400},
        "backtest_id": backtest_id, "job_id": "job-77", "job_status": "completed",
    }  # fmt: skip


async def test_limit_takes_the_first_points_in_time_order(bt_client, bq, token):
    backtest_id, stored = new_backtest(bq, {"minute": 50})
    transcript = await stream(bt_client, backtest_id, token=token(), intervals="minute", limit=17, chunk_size=5)
    points = [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]
    assert points == expected_points(stored["minute"][:17])
    assert [len(e.payload["data_points"]) for e in transcript.named("data_chunk")] == [5, 5, 5, 2]


async def test_second_open_is_served_from_the_cache_on_any_replica(
    down_warehouse_gateway, bt_client, bq, token, redis_client
):
    backtest_id, stored = new_backtest(bq, {"day": 30, "minute": 700})
    first = await stream(bt_client, backtest_id, token=token(), intervals="day,minute", limit=100)
    await wait_until_cached(redis_client, backtest_id, ["day", "minute"])
    # Another replica whose warehouse is unreachable: only the cache can answer.
    replica = await down_warehouse_gateway()
    second = await stream(replica, backtest_id, token=token(), intervals="day,minute", limit=100)
    assert [(e.event, e.payload) for e in second.events] == [(e.event, e.payload) for e in first.events]
    # The whole interval is cached, not only the first `limit` points.
    whole = await stream(replica, backtest_id, token=token(), intervals="minute", limit=50000)
    assert [p for e in whole.named("data_chunk") for p in e.payload["data_points"]] == expected_points(stored["minute"])


async def test_partly_written_cache_is_never_served(bt_client, bq, token, redis_client):
    backtest_id, stored = new_backtest(bq, {"day": 4})
    # A list without its completion mark, as a fill that died half-way would leave it.
    await redis_client.rpush(keys.backtest_candles_key(backtest_id, "day"), b'{"bogus": 1}')
    transcript = await stream(bt_client, backtest_id, token=token(), intervals="day")
    assert transcript.named("data_chunk")[0].payload["data_points"] == expected_points(stored["day"])


async def test_unreachable_cache_is_503_and_asks_the_warehouse_nothing(
    make_gateway, bt_settings, bq, token, unused_tcp_port
):
    # Every candle goes through the cache now (that is how one read is shared),
    # so without Redis a backtest is as unavailable as a running job.
    client = await make_gateway(
        redis={"url": f"redis://127.0.0.1:{unused_tcp_port}", "retries": 0, "connect_timeout_s": 0.2,
               "outage_wait_s": 0.3},
        server={"max_streams_per_user": 0}, **bt_settings,
    )  # fmt: skip
    backtest_id, _ = new_backtest(bq, {"day": 6})
    response = await open_stream(client, backtest_id, token=token(), intervals="day")
    assert response.status == 503
    assert (await response.json())["error"] == "unavailable"


async def test_unknown_or_foreign_backtest_is_job_not_found(bt_client, bq, token):
    backtest_id, _ = new_backtest(bq, {"day": 1}, user_id="bob")
    foreign = await stream(bt_client, backtest_id, token=token("alice"), intervals="day")
    missing = await stream(bt_client, "bt_0.000", token=token("alice"), intervals="day")
    assert foreign.names == missing.names == ["error"]
    assert foreign.events[0].payload["error"] == missing.events[0].payload["error"] == "job_not_found"
    admin = await stream(bt_client, backtest_id, token=token("root", admin=True), intervals="day")
    assert admin.names[-1] == "all_complete"


async def test_interval_not_configured_is_interval_not_found_and_the_stream_goes_on(bt_client, bq, token):
    backtest_id, _ = new_backtest(bq, {"day": 2})
    transcript = await stream(bt_client, backtest_id, token=token(), intervals="hour,day")
    assert transcript.names == ["error", "interval_start", "data_chunk", "interval_complete", "all_complete"]
    assert transcript.events[0].payload["error"] == "interval_not_found"
    assert transcript.events[0].payload["message"] == "Interval 'hour' not found in backtest configuration"


async def test_unreachable_warehouse_is_data_error_for_uncached_intervals_only(
    down_warehouse_gateway, bt_client, bq, token, redis_client
):
    backtest_id, stored = new_backtest(bq, {"day": 3, "minute": 4})
    await stream(bt_client, backtest_id, token=token(), intervals="day")
    await wait_until_cached(redis_client, backtest_id, ["day"])
    down = await down_warehouse_gateway()
    started = asyncio.get_running_loop().time()
    transcript = await stream(down, backtest_id, token=token(), intervals="day,minute")
    assert asyncio.get_running_loop().time() - started < 10  # never a hang
    assert transcript.names == ["interval_start", "data_chunk", "interval_complete", "error", "all_complete"]
    error = transcript.events[3].payload
    assert (error["error"], error["interval"], error["points_sent"]) == ("data_error", "minute", 0)
    assert transcript.events[-1].payload["completed_intervals"] == ["day"]


async def test_unreachable_warehouse_without_cached_metadata_is_connection_error(down_warehouse_gateway, bq, token):
    down = await down_warehouse_gateway()
    transcript = await stream(down, "bt_1.5", token=token(), intervals="day")
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "connection_error"


async def test_completed_job_whose_redis_candles_expired_is_served_from_the_warehouse(bt_client, bq, writer, token):
    backtest_id, stored = new_backtest(bq, {"day": 5}, job_id="expired-job")
    w = writer("expired-job")
    await w.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"], status="completed")
    await w.update(backtest_id=backtest_id)
    transcript = await stream(bt_client, "expired-job", token=token(), intervals="day")
    start = transcript.events[0].payload
    assert (start["job_id"], start["backtest_id"], start["is_partial"]) == ("expired-job", backtest_id, False)
    assert transcript.named("data_chunk")[0].payload["data_points"] == expected_points(stored["day"])


async def test_job_whose_redis_keys_are_all_gone_is_found_by_its_job_id(bt_client, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 2}, job_id="long-gone-job")
    transcript = await stream(bt_client, "long-gone-job", token=token(), intervals="day")
    assert transcript.events[0].payload["job_id"] == "long-gone-job"
    assert transcript.events[0].payload["backtest_id"] == backtest_id
    assert transcript.named("data_chunk")[0].payload["data_points"] == expected_points(stored["day"])


async def test_null_column_is_data_error(bt_client, bq, token):
    backtest_id, stored = new_backtest(bq, {"day": 3})
    insert_candles(
        bq,
        DATASET,
        "candles",
        [
            {
                "backtest_id": backtest_id,
                "interval": "day",
                "time": datetime(2030, 1, 1, tzinfo=UTC),
                "open": None,
                "high": 1,
                "low": 1,
                "close": 1,
                "volume": 1,
            }
        ],
    )
    transcript = await stream(bt_client, backtest_id, token=token(), intervals="day", chunk_size=2)
    assert transcript.names == ["interval_start", "data_chunk", "error", "all_complete"]
    assert transcript.events[2].payload["error"] == "data_error"
    assert "NULL" in transcript.events[2].payload["message"]


@pytest.mark.parametrize("order", ["sequential", "interleaved"])
@pytest.mark.parametrize("warm", [False, True])
async def test_backtest_resume_after_every_event(bt_client, bq, token, redis_client, order, warm):
    backtest_id, _ = new_backtest(bq, {"day": 7, "minute": 11, "3minute": 0})
    params = {"intervals": "day,minute,hour,3minute", "chunk_size": 3, "order": order}
    reference = await stream(bt_client, backtest_id, token=token(), **params)
    if warm:
        await wait_until_cached(redis_client, backtest_id, ["day", "minute", "3minute"])
    for index, event in enumerate(reference.events[:-1]):
        resumed = await stream(bt_client, backtest_id, token=token(), headers={"Last-Event-ID": event.id}, **params)
        assert [(e.id, e.event, e.payload) for e in reference.events[: index + 1] + resumed.events] == [
            (e.id, e.event, e.payload) for e in reference.events
        ], index
    done = await open_stream(
        bt_client, backtest_id, token=token(), headers={"Last-Event-ID": reference.events[-1].id}, **params
    )
    assert done.status == 204
