"""A bad day for Redis: a real Valkey killed (SIGKILL) and started again under live streams.

Every client that reconnects with its last event id ends with exactly the
stored candles, and no log record of the gateway holds a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.config import RedisSettings
from gateway.redis_client import build_redis_client
from gateway.sources import keys
from gateway.workers import JobWriter
from tests.conftest import MakeGateway
from tests.faults import KillableValkey, eventually
from tests.helpers import expected_points, open_stream, seed_job
from tests.sse_client import read_stream

JOB = "fault-job"


@pytest.fixture
async def store(valkey: KillableValkey) -> AsyncIterator[aioredis.Redis]:
    # The gateway's own client: it reconnects after the kill as the gateway does.
    client = build_redis_client(RedisSettings(url=valkey.url))
    yield client
    await client.aclose()


@pytest.fixture
def gateway_on(make_gateway: MakeGateway, valkey: KillableValkey) -> Callable[..., Any]:
    async def make(**sections: dict[str, Any]) -> TestClient:
        redis = {"url": valkey.url, "connect_timeout_s": 0.5, "socket_timeout_s": 2.0, **sections.pop("redis", {})}
        return await make_gateway(redis=redis, **sections)

    return make


@pytest.fixture(autouse=True)
def no_token_in_any_log_record(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.DEBUG)
    yield
    # Every JWT starts with the base64url of '{"': no log line may hold one, or a part of one.
    assert not [record.getMessage() for record in caplog.records if "eyJ" in record.getMessage()]


async def read_to_the_end(client: TestClient, token: str, **params: Any) -> tuple[list[Any], int]:
    """Read a stream, reconnecting with the last event id after every connection_error; (points, reconnects)."""
    points: list[Any] = []
    last_id: str | None = None
    reconnects = 0
    for _ in range(20):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        response = await open_stream(client, JOB, token=token, headers=headers, **params)
        if response.status == 503:
            await asyncio.sleep(0.5)
            reconnects += 1
            continue
        assert response.status == 200, await response.text()
        transcript = await read_stream(response)
        for event in transcript.events:
            if event.event == "data_chunk":
                points.extend(event.payload["data_points"])
            last_id = event.id or last_id
        if transcript.names and transcript.names[-1] == "all_complete":
            return points, reconnects
        assert transcript.events[-1].payload["error"] == "connection_error", transcript.names
        reconnects += 1
        await asyncio.sleep(0.3)
    raise AssertionError("the stream never completed")


async def test_every_stream_opened_after_a_valkey_restart_succeeds(gateway_on, valkey, store, token):
    # No held wait: only the retry policy on pooled connections is under test.
    client = await gateway_on(redis={"outage_wait_s": 0}, server={"max_streams_per_user": 0})
    stored = await seed_job(JobWriter(store, JOB), counts={"minute": 600})
    params = {"intervals": "minute", "limit": 600, "chunk_size": 100}
    # Fill the pool with connections that the restart will leave dead.
    warm = await asyncio.gather(*(read_to_the_end(client, token(), **params) for _ in range(30)))
    assert all(points == expected_points(stored["minute"]) for points, _ in warm)

    await valkey.kill()
    await valkey.start()
    await asyncio.sleep(1.0)
    responses = await asyncio.gather(*(open_stream(client, JOB, token=token(), **params) for _ in range(50)))
    assert [response.status for response in responses] == [200] * 50
    for response in responses:
        transcript = await read_stream(response)
        points = [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]
        assert points == expected_points(stored["minute"])


async def test_streams_cut_by_a_valkey_crash_resume_exactly_once_it_is_back(gateway_on, valkey, store, token):
    client = await gateway_on(server={"max_streams_per_user": 0})
    stored = await seed_job(JobWriter(store, JOB), counts={"minute": 20_000})
    params = {"intervals": "minute", "limit": 20_000, "chunk_size": 50}

    async def crash_and_recover() -> None:
        await asyncio.sleep(0.2)
        await valkey.kill()
        await asyncio.sleep(1.5)
        await valkey.start()

    outage = asyncio.create_task(crash_and_recover())
    results = await asyncio.gather(*(read_to_the_end(client, token(), **params) for _ in range(10)))
    await outage
    for points, _ in results:
        assert points == expected_points(stored["minute"])
    assert sum(reconnects for _, reconnects in results) > 0, "the crash cut no stream: the test proved nothing"


async def test_a_reconnect_during_an_outage_is_held_until_valkey_is_back(gateway_on, valkey, store, token):
    client = await gateway_on(redis={"outage_wait_s": 10})
    stored = await seed_job(JobWriter(store, JOB), counts={"day": 30})
    await valkey.kill()
    request = asyncio.create_task(open_stream(client, JOB, token=token(), intervals="day"))
    await asyncio.sleep(1.5)
    assert not request.done(), "answered while Redis was down instead of holding the request"
    await valkey.start()
    response = await asyncio.wait_for(request, timeout=10)
    assert response.status == 200
    transcript = await read_stream(response)
    assert transcript.names[-1] == "all_complete"
    assert [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]] == expected_points(
        stored["day"]
    )


async def test_an_outage_longer_than_the_wait_is_503_with_retry_after(gateway_on, valkey, token):
    client = await gateway_on(redis={"outage_wait_s": 0.5}, server={"retry_ms": 2000})
    await valkey.kill()
    started = time.monotonic()
    response = await open_stream(client, JOB, token=token(), intervals="day")
    waited = time.monotonic() - started
    assert response.status == 503
    assert response.headers["Retry-After"] == "2"
    body = await response.json()
    assert body["error"] == "unavailable" and "Redis" in body["message"]
    assert 0.4 <= waited < 3.0


async def test_slots_of_streams_that_end_during_an_outage_are_released(gateway_on, valkey, store, token):
    client = await gateway_on(
        server={"max_streams_per_user": 2},
        follow={"recheck_interval_s": 0.2},
        redis={"outage_wait_s": 0, "retries": 0},
    )
    await seed_job(JobWriter(store, JOB), counts={"day": 3})
    follows = [await open_stream(client, JOB, token=token(), intervals="day", follow="true") for _ in range(2)]
    assert [response.status for response in follows] == [200, 200]
    await asyncio.sleep(0.3)
    await valkey.kill()
    for response in follows:
        transcript = await asyncio.wait_for(read_stream(response), timeout=10)
        assert transcript.events[-1].payload["error"] == "connection_error"
    await valkey.start()
    slots_key = keys.user_streams_key("alice")
    assert await eventually(lambda: _no_slots(store, slots_key), timeout_s=10)
    again = [await open_stream(client, JOB, token=token(), intervals="day") for _ in range(2)]
    assert [response.status for response in again] == [200, 200]


async def test_a_live_stream_keeps_its_slot_past_the_slot_ttl(make_gateway, writer, token, redis_client):
    client = await make_gateway(server={"max_streams_per_user": 1, "stream_slot_ttl_s": 5})
    await seed_job(writer(JOB), counts={"day": 3})
    follow = await open_stream(client, JOB, token=token(), intervals="day", follow="true")
    assert follow.status == 200
    await asyncio.sleep(7)  # longer than the slot's and the set's own expiry
    assert await redis_client.pttl(keys.user_streams_key("alice")) > 0
    second = await open_stream(client, JOB, token=token(), intervals="day")
    assert second.status == 429
    follow.close()


async def test_a_cancelled_stream_gives_its_slot_back(make_gateway, writer, token, redis_client):
    client = await make_gateway(server={"max_streams_per_user": 1})
    await seed_job(writer(JOB), counts={"day": 3})
    follow = await open_stream(client, JOB, token=token(), intervals="day", follow="true")
    assert follow.status == 200
    follow.close()  # the client goes away: the handler is cancelled
    assert await eventually(lambda: _no_slots(redis_client, keys.user_streams_key("alice")), timeout_s=5)
    again = await open_stream(client, JOB, token=token(), intervals="day")
    assert again.status == 200


async def _no_slots(client: aioredis.Redis, key: str) -> bool:
    return await client.zcard(key) == 0
