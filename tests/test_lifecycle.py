"""Many streams, disconnects and an unreachable store, through the real endpoint."""

from __future__ import annotations

import asyncio
from functools import partial

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.devtools.embedded_redis import EmbeddedRedis
from gateway.resources import LIFECYCLE, REDIS
from gateway.workers import JobWriter
from tests.helpers import expected_points, open_stream, seed_job, stream
from tests.sse_client import SSEParser, Transcript, read_stream

JOB = "busy-job"


async def test_fifty_concurrent_streams_each_get_the_whole_stream(make_gateway, writer, token):
    client = await make_gateway(server={"max_streams_per_user": 0})
    stored = await seed_job(writer(JOB), counts={"day": 300, "minute": 2000})
    transcripts = await asyncio.gather(
        *(stream(client, JOB, token=token(), intervals="day,minute", limit=2000) for _ in range(50))
    )
    expected = expected_points(stored["day"]) + expected_points(stored["minute"])
    for transcript in transcripts:
        assert transcript.names[-1] == "all_complete"
        assert [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]] == expected


async def _in_use_redis_connections(client) -> int:
    pool = client.server.app[REDIS].connection_pool
    return len(pool._in_use_connections)  # no public counter; the pool's own bookkeeping


async def test_client_that_disconnects_mid_stream_leaves_no_task_or_connection(client, writer, token):
    await seed_job(writer(JOB), counts={"minute": 50_000})
    # One whole stream first, so the certificate fetch's keep-alive connection is already counted.
    await stream(client, JOB, token=token(), intervals="minute", limit=1)
    tasks_before = len(asyncio.all_tasks())
    response = await open_stream(client, JOB, token=token(), intervals="minute", limit=50_000, chunk_size=10)
    parser, transcript = SSEParser(), Transcript()
    async for chunk in response.content.iter_any():
        parser.feed(chunk, transcript)
        if len(transcript.events) >= 3:
            break
    response.close()  # drop the connection mid-stream
    for _ in range(100):
        await asyncio.sleep(0.02)
        if len(asyncio.all_tasks()) <= tasks_before and await _in_use_redis_connections(client) == 0:
            break
    assert len(asyncio.all_tasks()) <= tasks_before
    assert await _in_use_redis_connections(client) == 0


@pytest.mark.parametrize("max_streams", [8, 0])  # the stream slot check, or the job read, meets it first
async def test_unreachable_redis_before_the_stream_is_503(make_gateway, token, unused_tcp_port, max_streams):
    client = await make_gateway(
        redis={
            "url": f"redis://127.0.0.1:{unused_tcp_port}",
            "retries": 0,
            "connect_timeout_s": 0.5,
            "outage_wait_s": 0.3,
        },
        server={"max_streams_per_user": max_streams},
    )
    response = await open_stream(client, JOB, token=token(), intervals="day")
    assert response.status == 503
    body = await response.json()
    assert body["error"] == "unavailable"
    assert "Redis" in body["message"]


async def test_stream_limit_per_user_is_429_with_retry_after(make_gateway, writer, token):
    client = await make_gateway(server={"max_streams_per_user": 2})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 3})
    held = [await open_stream(client, JOB, token=token(), intervals="minute", follow="true") for _ in range(2)]
    assert [r.status for r in held] == [200, 200]
    refused = await open_stream(client, JOB, token=token(), intervals="minute")
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["error"] == "too_many_streams"
    other_user = await open_stream(client, JOB, token=token("root", admin=True), intervals="minute")
    assert other_user.status == 200
    await other_user.read()
    held[0].close()
    for _ in range(100):  # the slot is released when the server notices the disconnect
        await asyncio.sleep(0.02)
        again = await open_stream(client, JOB, token=token(), intervals="minute")
        if again.status == 200:
            break
        again.close()
    assert again.status == 200
    await again.read()
    held[1].close()


async def test_idle_stream_gets_ping_comments(make_gateway, writer, token):
    client = await make_gateway(server={"ping_interval_s": 0.05})
    await seed_job(writer(JOB), counts={"minute": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true")
    parser, transcript = SSEParser(), Transcript()

    async def read_until_ping():
        async for chunk in response.content.iter_any():
            parser.feed(chunk, transcript)
            if transcript.comments:
                return

    await asyncio.wait_for(read_until_ping(), timeout=5)
    assert transcript.comments[0] == "ping"
    assert transcript.names == ["interval_start", "data_chunk", "interval_complete"]
    response.close()


async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_a_client_that_stops_reading_is_cut_off_and_can_resume(make_gateway, writer, token):
    client = await make_gateway(server={"send_timeout_s": 0.3})
    # 15 MB: more than the loopback socket buffers and the client's read buffer hold.
    await seed_job(writer(JOB), counts={"minute": 50_000, "3minute": 50_000, "day": 50_000}, status="completed")
    params = {"intervals": "minute,3minute,day", "limit": 50_000, "chunk_size": 5000}
    # Identity whatever the run's coding: these repeating candles compress 50-fold, into the buffers.
    plain = {"Accept-Encoding": "identity"}
    response = await open_stream(client, JOB, token=token(), headers=plain, **params)
    await asyncio.sleep(2)  # read nothing: the gateway's writes back up, then it gives up
    transcript = Transcript()
    parser = SSEParser()
    try:
        async for chunk in response.content.iter_any():
            parser.feed(chunk, transcript)
    except aiohttp.ClientPayloadError:
        pass  # the cut shows as a truncated chunked body
    assert "all_complete" not in transcript.names
    assert transcript.events, "some events were buffered before the cut"
    rest = await stream(client, JOB, token=token(), headers={"Last-Event-ID": transcript.events[-1].id}, **params)
    assert rest.names[-1] == "all_complete"
    chunks = transcript.named("data_chunk") + rest.named("data_chunk")
    sent = [(e.payload["interval"], e.payload["points_sent"]) for e in chunks]
    assert sent == [(name, 5000 * (i + 1)) for name in ("minute", "3minute", "day") for i in range(10)]


async def test_a_draining_replica_answers_503(client, writer, token):
    await seed_job(writer(JOB), counts={"minute": 1})
    client.server.app[LIFECYCLE].draining = True
    response = await open_stream(client, JOB, token=token(), intervals="minute")
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"  # the ingress retries another replica at once
    assert (await response.json())["error"] == "unavailable"
    assert (await client.get("/readyz")).status == 503


async def test_redis_lost_mid_stream_ends_it_with_connection_error(make_gateway, token, tmp_path):
    own = EmbeddedRedis(tmp_path / "lost-valkey")  # a server of this test's own, to stop mid-stream
    url = own.start()
    try:
        client = await make_gateway(
            redis={"url": url, "retries": 1, "connect_timeout_s": 0.5, "socket_timeout_s": 1},
            server={"max_streams_per_user": 0},
        )
        seeder = aioredis.Redis.from_url(url)
        await seed_job(JobWriter(seeder, JOB), counts={"minute": 50_000})
        await seeder.aclose()
        response = await open_stream(client, JOB, token=token(), intervals="minute", limit=50_000, chunk_size=10)
        stop_valkey = partial(asyncio.get_running_loop().run_in_executor, None, own.stop)
        transcript = await read_stream(response, midway=(lambda t: len(t.events) >= 3, stop_valkey))
    finally:
        own.stop()
    assert transcript.names[-1] == "error"
    assert transcript.events[-1].payload["error"] == "connection_error"
    assert "all_complete" not in transcript.names


async def test_drain_stops_streams_at_an_event_boundary_and_they_resume_exactly(make_gateway, writer, token):
    client = await make_gateway(server={"max_streams_per_user": 0, "shutdown_grace_s": 0})
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 300})
    params = {"intervals": "minute", "chunk_size": 50, "follow": "true"}
    responses = [await open_stream(client, JOB, token=token(), **params) for _ in range(5)]
    transcripts = []
    for response in responses:
        transcript, parser = Transcript(), SSEParser()
        transcript.raw = await response.content.readuntil(b"event: interval_complete")
        parser.feed(transcript.raw, transcript)
        transcripts.append((transcript, parser))
    lifecycle = client.server.app[LIFECYCLE]
    assert lifecycle.open_streams == 5
    await asyncio.wait_for(lifecycle.drain(0), 5)
    assert lifecycle.open_streams == 0
    for response, (transcript, parser) in zip(responses, transcripts, strict=True):
        async for chunk in response.content.iter_any():  # the rest of the last event, then a clean end
            transcript.raw += chunk
            parser.feed(chunk, transcript)
        assert transcript.raw.endswith(b"\n\n"), "the stream ends at an event boundary"
        assert transcript.names[-1] == "interval_complete"
    await w.update(status="completed")
    lifecycle.draining = False  # the same replica serves the resumes, as another would
    for transcript, _ in transcripts:
        rest = await stream(client, JOB, token=token(), headers={"Last-Event-ID": transcript.events[-1].id}, **params)
        assert rest.names[-1] == "all_complete"
        points = [p for t in (transcript, rest) for e in t.named("data_chunk") for p in e.payload["data_points"]]
        assert points == expected_points(stored["minute"])
