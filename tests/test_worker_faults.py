"""Worker faults that used to pass in silence (issue 20, item 4): each is a data_error naming what changed.

A real Valkey behind the tests' own proxy (tests/faults.py), whose command
hook lets the fault land at an exact point of a stream: just before the
gateway's read of a given chunk.

- a head LTRIM plus an append in one transaction (the list keeps its length,
  every position shifts): snapshot readers and followers;
- the list rewritten with the same times and new prices;
- a status that goes back from completed to running under a stream.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway.sources import keys
from gateway.sources.candles import encode_candle
from gateway.workers import JobWriter, candle
from tests.faults import FaultProxy
from tests.helpers import START, expected_points, make_candles, open_stream, seed_job
from tests.sse_client import SSEParser, Transcript, read_stream

JOB = "faulty-worker-job"
KEY = keys.candles_key(JOB, "minute")


@pytest.fixture
async def gateway(make_gateway, proxy):
    return await make_gateway(redis={"url": proxy.url}, server={"max_streams_per_user": 0})


def before_reading(proxy: FaultProxy, at_least: int, fault) -> None:
    """Run ``fault`` once, just before the gateway's first LRANGE of the list from ``at_least`` on."""
    done = False

    async def hook(args: list[bytes]) -> None:
        nonlocal done
        if done or not args or args[0].upper() != b"LRANGE" or args[1] != KEY.encode():
            return
        if int(args[2]) >= at_least:
            done = True
            await fault()

    proxy.on_command = hook


async def trim_head_and_append(direct: aioredis.Redis, trimmed: int, first: int) -> None:
    """What a broken worker did: drop the list's head and append as many, in one transaction."""
    async with direct.pipeline(transaction=True) as pipe:
        pipe.ltrim(KEY, trimmed, -1)
        pipe.rpush(KEY, *(encode_candle(c) for c in make_candles(trimmed, first=first)))
        await pipe.execute()


async def rewrite_prices(direct: aioredis.Redis, count: int) -> None:
    """The same times, other prices: the whole list rewritten in one transaction."""
    repriced = [candle(START + i * timedelta(minutes=1), 5000.0, 5001.0, 4999.0, 5000.5, 7) for i in range(count)]
    async with direct.pipeline(transaction=True) as pipe:
        pipe.delete(KEY)
        pipe.rpush(KEY, *(encode_candle(c) for c in repriced))
        await pipe.execute()


def data_errors(transcript) -> list[dict]:
    return [e.payload for e in transcript.named("error") if e.payload["error"] == "data_error"]


async def test_a_trimmed_and_refilled_list_under_a_snapshot_is_a_data_error(gateway, direct, proxy, token):
    stored = await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    before_reading(proxy, 1500, lambda: trim_head_and_append(direct, 1000, 3000))
    response = await open_stream(gateway, JOB, token=token(), intervals="minute", chunk_size=500, limit=50000)
    transcript = await read_stream(response)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert errors[0]["interval"] == "minute"
    assert "trimmed or shifted" in errors[0]["message"]
    # What went out is the list as it was, up to the change (read ahead, the change may be met a chunk early).
    points = [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]
    assert len(points) == errors[0]["points_sent"] >= 500
    assert points == expected_points(stored["minute"][: len(points)])
    assert transcript.names[-1] == "all_complete"


async def test_a_list_rewritten_with_other_prices_under_a_snapshot_is_a_data_error(gateway, direct, proxy, token):
    await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    before_reading(proxy, 1000, lambda: rewrite_prices(direct, 3000))
    response = await open_stream(gateway, JOB, token=token(), intervals="minute", chunk_size=500, limit=50000)
    transcript = await read_stream(response)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert "rewritten (same time, other values)" in errors[0]["message"]
    prices = {p["close"] for e in transcript.named("data_chunk") for p in e.payload["data_points"]}
    assert 5000.5 not in prices  # no new price mixed in with the old


async def test_a_trimmed_and_refilled_list_under_a_follower_is_a_data_error(gateway, direct, proxy, token):
    writer = JobWriter(direct, JOB)
    await seed_job(writer, counts={"minute": 300})
    response = await open_stream(gateway, JOB, token=token(), intervals="minute", chunk_size=100, follow="true")
    assert response.status == 200
    parser, transcript = SSEParser(), Transcript()
    while "interval_complete" not in transcript.names:
        parser.feed(await asyncio.wait_for(response.content.readany(), 10), transcript)
    snapshot_chunks = len(transcript.named("data_chunk"))
    await trim_head_and_append(direct, 100, 300)  # the length stays 300: nothing new to a follower yet
    await writer.append("minute", make_candles(10, first=400))
    await writer.update(status="completed")
    while chunk := await asyncio.wait_for(response.content.readany(), 10):
        parser.feed(chunk, transcript)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert "trimmed or shifted" in errors[0]["message"]
    # None of the shifted points went out as if new.
    assert len(transcript.named("data_chunk")) == snapshot_chunks


async def test_a_status_going_back_from_completed_is_a_data_error(gateway, direct, proxy, token):
    writer = JobWriter(direct, JOB)
    await seed_job(writer, counts={"minute": 5000}, status="completed")
    before_reading(proxy, 500, lambda: writer.update(status="running"))
    response = await open_stream(gateway, JOB, token=token(), intervals="minute", chunk_size=250, limit=50000)
    transcript = await read_stream(response)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert "went back from completed to running" in errors[0]["message"]
    assert all(e.payload.get("is_partial") is False for e in transcript.named("data_chunk"))


# -- the first read of a resumed stream (its id carries a digest of the last candle sent) --


async def _events_until(response, transcript: Transcript, parser: SSEParser, done) -> None:
    while not done(transcript):
        chunk = await asyncio.wait_for(response.content.readany(), 10)
        assert chunk, transcript.names
        parser.feed(chunk, transcript)


async def _cut_after_chunks(gateway, token, chunks: int, **params) -> str:
    """A stream read until ``chunks`` data_chunks arrived, then closed: the id to resume from."""
    response = await open_stream(gateway, JOB, token=token(), **params)
    assert response.status == 200
    parser, transcript = SSEParser(), Transcript()
    await _events_until(response, transcript, parser, lambda t: len(t.named("data_chunk")) >= chunks)
    response.close()
    last = transcript.named("data_chunk")[chunks - 1]
    assert last.id is not None
    return last.id


SNAPSHOT = {"intervals": "minute", "chunk_size": 500, "limit": 50000}


async def test_a_list_trimmed_before_a_resume_position_is_a_data_error_on_the_first_read(gateway, direct, token):
    await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    last_id = await _cut_after_chunks(gateway, token, 2, **SNAPSHOT)
    await trim_head_and_append(direct, 1000, 3000)  # same length, every position shifted by 1,000
    response = await open_stream(gateway, JOB, token=token(), headers={"Last-Event-ID": last_id}, **SNAPSHOT)
    transcript = await read_stream(response)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert errors[0]["points_sent"] == 1000
    assert "changed before this stream's resume position" in errors[0]["message"]
    assert "position 999" in errors[0]["message"]
    assert not transcript.named("data_chunk")  # no shifted point went out as the next ones
    assert transcript.names[-1] == "all_complete"


async def test_a_list_rewritten_before_a_resume_position_is_a_data_error_on_the_first_read(gateway, direct, token):
    await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    last_id = await _cut_after_chunks(gateway, token, 2, **SNAPSHOT)
    await rewrite_prices(direct, 3000)
    response = await open_stream(gateway, JOB, token=token(), headers={"Last-Event-ID": last_id}, **SNAPSHOT)
    transcript = await read_stream(response)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert "rewritten" in errors[0]["message"]
    assert not transcript.named("data_chunk")


async def test_a_resume_of_an_intact_list_goes_on_as_before(gateway, direct, token):
    stored = await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    last_id = await _cut_after_chunks(gateway, token, 2, **SNAPSHOT)
    response = await open_stream(gateway, JOB, token=token(), headers={"Last-Event-ID": last_id}, **SNAPSHOT)
    transcript = await read_stream(response)
    assert not data_errors(transcript), transcript.names
    points = [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]
    assert points == expected_points(stored["minute"][1000:])


async def test_an_id_from_before_the_digest_still_resumes(gateway, direct, token):
    """Ids of clients connected before the digest (four fields per interval) resume as they did, unchecked."""
    await seed_job(JobWriter(direct, JOB), counts={"minute": 3000}, status="completed")
    last_id = await _cut_after_chunks(gateway, token, 2, **SNAPSHOT)
    record = msgspec.msgpack.decode(base64.urlsafe_b64decode(last_id + "=" * (-len(last_id) % 4)))
    intervals = record[4]  # version, fingerprint, is_partial, finished, intervals, ...
    assert all(len(interval) == 5 and interval[4] is not None for interval in intervals)
    record[4] = [interval[:4] for interval in intervals]
    legacy_id = base64.urlsafe_b64encode(msgspec.msgpack.encode(record)).rstrip(b"=").decode()
    await trim_head_and_append(direct, 1000, 3000)  # not seen: the old id has nothing to check it by
    response = await open_stream(gateway, JOB, token=token(), headers={"Last-Event-ID": legacy_id}, **SNAPSHOT)
    transcript = await read_stream(response)
    assert response.status == 200
    assert not data_errors(transcript), transcript.names
    assert len([p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]) == 2000


async def test_a_follower_resuming_after_its_list_was_trimmed_gets_a_data_error(gateway, direct, token):
    writer = JobWriter(direct, JOB)
    await seed_job(writer, counts={"minute": 300})
    follow = {"intervals": "minute", "chunk_size": 100, "follow": "true"}
    response = await open_stream(gateway, JOB, token=token(), **follow)
    assert response.status == 200
    parser, transcript = SSEParser(), Transcript()
    await _events_until(response, transcript, parser, lambda t: "interval_complete" in t.names)
    last_id = transcript.events[-1].id
    response.close()
    await trim_head_and_append(direct, 100, 300)
    await writer.append("minute", make_candles(10, first=400))
    await writer.update(status="completed")
    resumed = await open_stream(gateway, JOB, token=token(), headers={"Last-Event-ID": last_id}, **follow)
    transcript = await read_stream(resumed)
    errors = data_errors(transcript)
    assert len(errors) == 1, transcript.names
    assert "changed before this stream's resume position" in errors[0]["message"]
    assert not transcript.named("data_chunk")
