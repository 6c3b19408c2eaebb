"""The gateway on a real three-master Valkey cluster (``redis.cluster = true``).

This module overrides ``redis_client`` and ``settings`` so that the tests it
imports from the rest of the suite (streams, resume, follow mode, the stream
limit, the backtest cache) run again, unchanged, against the cluster; the
tests written here pin what only a cluster has: sharded and classic notes,
slots, and a node going away mid-stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.crc import key_slot

from gateway.config import Settings, with_overrides
from gateway.redis_client import build_redis_client, is_cluster
from gateway.resources import NOTES, REDIS
from gateway.sources import keys
from gateway.workers import JobWriter
from tests.cluster import LocalCluster
from tests.helpers import expected_points, follow_and_append, make_candles, open_stream, seed_job
from tests.sse_client import event_reader, next_events

# The rest of the suite, run again here against the cluster (fixtures below).
from tests.test_backtests import (  # noqa: F401
    bt_client,
    bt_settings,
    down_warehouse_gateway,
    test_partly_written_cache_is_never_served,
    test_second_open_is_served_from_the_cache_on_any_replica,
)
from tests.test_errors import test_failed_or_cancelled_job_is_job_error_with_its_error_text  # noqa: F401
from tests.test_lifecycle import test_stream_limit_per_user_is_429_with_retry_after  # noqa: F401
from tests.test_live import (  # noqa: F401
    test_cancelled_or_failed_job_ends_a_follow_stream_with_job_error,
    test_follow_in_interleaved_order_goes_live_after_every_interval_completes,
    test_follow_sends_appended_points_status_changes_and_completes,
    test_follow_without_any_note_still_delivers_within_the_recheck_interval,
    test_resume_in_follow_mode_while_the_worker_appends,
    test_resuming_after_every_event_continues_exactly_the_uninterrupted_stream,
)
from tests.test_stream import test_seed_example_streams_every_event_as_the_spec_shows  # noqa: F401

JOB = "cluster-job"


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def redis_client(valkey_cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    client = RedisCluster.from_url(valkey_cluster.url)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client  # type: ignore[misc]
    await client.aclose()


@pytest.fixture
def settings(settings: Settings, valkey_cluster: LocalCluster) -> Settings:
    return with_overrides(settings, redis={"url": valkey_cluster.url, "cluster": True})


def test_every_multi_key_operation_stays_in_one_slot():
    job_slot = key_slot(keys.job_key("j1").encode())
    for name in (keys.candles_key("j1", "minute"), keys.candles_key("j1", "day"), keys.events_channel("j1")):
        assert key_slot(name.encode()) == job_slot
    bt = "bt_1737530000.123"
    bt_slot = key_slot(keys.backtest_meta_key(bt).encode())
    for name in (
        keys.backtest_candles_key(bt, "day"),
        keys.backtest_complete_key(bt),
        keys.backtest_staging_key(bt, "day"),
        keys.backtest_fill_key(bt, "day"),
        keys.backtest_fill_lock_key(bt, "day"),
        keys.backtest_missing_key(bt),
    ):
        assert key_slot(name.encode()) == bt_slot
    job_lookups = key_slot(keys.job_backtest_key("j1").encode())
    assert key_slot(keys.job_backtest_missing_key("j1").encode()) == job_lookups
    # The stream-limit script touches one key only.
    assert keys.user_streams_key("alice") == "gateway:streams:{alice}"


async def test_redis_cluster_setting_builds_a_cluster_client(settings, redis_client):
    client = build_redis_client(settings.redis)
    try:
        assert is_cluster(client)
        await client.set("probe:{x}", b"1")
        assert await client.get("probe:{x}") == b"1"
    finally:
        await client.aclose()


async def test_a_single_node_client_on_a_cluster_is_told_to_set_redis_cluster(make_gateway, writer, token, caplog):
    caplog.set_level(logging.INFO, logger="gateway.redis_health")
    await seed_job(writer(JOB), counts={"minute": 1})
    client = await make_gateway(redis={"cluster": False, "outage_wait_s": 0}, server={"max_streams_per_user": 0})
    # Some of these ids hash to a slot that the node named by redis.url does not own.
    answers = [await open_stream(client, f"{JOB}-{n}", token=token(), intervals="minute") for n in range(6)]
    refused = [r for r in answers if r.status == 503]
    assert refused
    assert "redis.cluster = true" in (await refused[0].json())["message"]
    # PING answers on any node, yet the replica cannot serve: not ready, and said once in the log.
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["redis"] == "cluster_misconfigured"
    said = [r for r in caplog.records if r.name == "gateway.redis_health" and "cluster_misconfigured" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "at start-up" in said[0].getMessage()


async def test_job_writer_sends_sharded_notes_on_a_cluster(redis_client):
    pubsub = ClusterPubSub(redis_client, ignore_subscribe_messages=True)  # type: ignore[arg-type]
    channel = keys.events_channel(JOB)
    await pubsub.ssubscribe(channel)
    await JobWriter(redis_client, JOB).create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"])
    message = None
    for _ in range(50):
        message = await pubsub.get_sharded_message(timeout=0.1)
        if message is not None:
            break
    assert message is not None
    assert (message["type"], message["channel"], message["data"]) == (
        "smessage",
        channel.encode(),
        b'{"status":"queued"}',
    )
    await pubsub.aclose()


@pytest.mark.parametrize("sharded", [True, False], ids=["spublish", "publish"])
async def test_followers_hear_sharded_and_classic_notes(make_gateway, redis_client, token, sharded):
    client = await make_gateway(follow={"recheck_interval_s": 30.0})  # only a note can wake them in time
    w = JobWriter(redis_client, JOB, sharded=sharded)
    # the appended candle's data_chunk arrives (checked by follow_and_append): the note was heard
    response, _, _ = await follow_and_append(client, w, JOB, token, seeded=2, intervals="minute")
    assert client.server.app[NOTES].subscribed_jobs == 1
    response.close()


async def test_a_node_restarting_mid_stream_ends_it_with_connection_error_and_the_client_resumes_exactly(
    make_gateway, redis_client, token, valkey_cluster
):
    client = await make_gateway(
        follow={"recheck_interval_s": 0.2},
        redis={"retries": 1, "connect_timeout_s": 0.5, "socket_timeout_s": 1, "outage_wait_s": 20},
        server={"max_streams_per_user": 0},
    )
    w = JobWriter(redis_client, JOB)
    params = {"intervals": "minute", "follow": "true", "chunk_size": 2}
    response, next_event, live = await follow_and_append(client, w, JOB, token, seeded=3, **params)

    loop = asyncio.get_running_loop()
    owner = valkey_cluster.owner_of(keys.job_key(JOB))
    await loop.run_in_executor(None, valkey_cluster.stop, owner)
    try:
        ended = (await next_events(next_event, 1, wait_s=20))[0]
        assert (ended.event, ended.payload["error"]) == ("error", "connection_error")
        assert await response.content.read() == b""  # the stream ended
    finally:
        await loop.run_in_executor(None, valkey_cluster.start, owner)

    appended = make_candles(2, first=4)
    for _ in range(50):  # the test's own client finds the node again
        try:
            await w.append("minute", appended)
            break
        except Exception:
            await asyncio.sleep(0.2)
    resumed = await open_stream(client, JOB, token=token(), headers={"Last-Event-ID": live.id}, **params)
    assert resumed.status == 200
    events = await next_events(event_reader(resumed), 1)
    assert [(e.event, e.payload["chunk_index"], e.payload["points_sent"]) for e in events] == [("data_chunk", 3, 6)]
    assert events[0].payload["data_points"] == expected_points(appended)
    resumed.close()
    assert is_cluster(client.server.app[REDIS])
