"""Workers that break the contract (SPEC 6): wrong Redis types, lists cut or rewritten, job hashes deleted.

Whatever a worker does, the endpoint answers the SPEC's JSON or SSE, never a
500, and no stored candle is skipped silently.
"""

from __future__ import annotations

import asyncio
from functools import partial

from gateway.sources import keys
from tests.helpers import make_candles, open_stream, seed_job, stream
from tests.sse_client import SSEParser, Transcript, read_stream

JOB = "broken-job"


async def test_a_candle_key_of_the_wrong_type_is_a_data_error_and_the_stream_goes_on(
    client, writer, token, redis_client
):
    await seed_job(writer(JOB), counts={"day": 2}, configured=["minute", "day"])
    await redis_client.set(keys.candles_key(JOB, "minute"), b"not a list")
    for _ in range(2):  # and every later request alike: nothing is poisoned
        transcript = await stream(client, JOB, token=token(), intervals="minute,day")
        assert transcript.names == ["error", "interval_start", "data_chunk", "interval_complete", "all_complete"]
        error = transcript.events[0].payload
        assert error["error"] == "data_error"
        assert error["interval"] == "minute"
        assert "not stored as a list" in error["message"]
        assert transcript.events[-1].payload["completed_intervals"] == ["day"]


async def test_a_candle_key_that_changes_type_mid_stream_is_a_data_error(client, writer, token, redis_client):
    await seed_job(writer(JOB), counts={"minute": 3000, "day": 2})
    response = await open_stream(client, JOB, token=token(), intervals="minute,day", chunk_size=10, limit=3000)

    async def overwrite() -> None:
        await redis_client.delete(keys.candles_key(JOB, "minute"))
        await redis_client.set(keys.candles_key(JOB, "minute"), b"overwritten")

    transcript = await read_stream(response, midway=(lambda t: len(t.named("data_chunk")) >= 2, overwrite))
    errors = transcript.named("error")
    assert [e.payload["error"] for e in errors] == ["data_error"]
    assert errors[0].payload["interval"] == "minute"
    assert transcript.names[-1] == "all_complete"
    assert transcript.events[-1].payload["completed_intervals"] == ["day"]


async def test_a_job_hash_of_the_wrong_type_is_job_error_for_an_admin_and_not_found_for_others(
    client, token, redis_client
):
    await redis_client.rpush(keys.job_key(JOB), b"not a hash")
    user = await stream(client, JOB, token=token(), intervals="day")
    assert [e.payload["error"] for e in user.events] == ["job_not_found"]  # no owner can be read
    admin = await stream(client, JOB, token=token(uid="ops", admin=True), intervals="day")
    assert [e.payload["error"] for e in admin.events] == ["job_error"]
    assert "not a hash" in admin.events[0].payload["message"]


async def test_a_follow_stream_survives_a_wrong_type_key_and_reports_it(make_gateway, writer, token, redis_client):
    client = await make_gateway(follow={"recheck_interval_s": 0.1})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2, "day": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute,day", follow="true")
    parser, transcript = SSEParser(), Transcript()
    iterator = response.content.iter_any()
    while len(transcript.events) < 6:  # the snapshot of both intervals
        parser.feed(await iterator.__anext__(), transcript)
    await redis_client.delete(keys.candles_key(JOB, "minute"))
    await redis_client.set(keys.candles_key(JOB, "minute"), b"a string now")
    await w.append("day", make_candles(1, first=5))
    await w.update(status="completed")
    async for chunk in iterator:
        parser.feed(chunk, transcript)
    errors = transcript.named("error")
    assert [(e.payload["error"], e.payload["interval"]) for e in errors] == [("data_error", "minute")]
    assert transcript.names[-1] == "all_complete"
    assert transcript.events[-1].payload["completed_intervals"] == ["day"]


async def test_a_list_deleted_and_written_again_while_followed_is_a_data_error_not_a_skip(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 0.1})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 200})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true", limit=1000)
    parser, transcript = SSEParser(), Transcript()
    iterator = response.content.iter_any()
    while "interval_complete" not in transcript.names:
        parser.feed(await iterator.__anext__(), transcript)
    await redis_client.delete(keys.candles_key(JOB, "minute"))
    await w.append("minute", make_candles(20, first=500))  # 20 points: fewer than the 200 sent
    await asyncio.sleep(0.3)
    await w.update(status="completed")
    async for chunk in iterator:
        parser.feed(chunk, transcript)
    errors = transcript.named("error")
    assert len(errors) == 1 and errors[0].payload["error"] == "data_error"
    assert "fewer than the 200 already sent" in errors[0].payload["message"]
    final = transcript.events[-1]
    assert final.event == "all_complete"
    assert final.payload["completed_intervals"] == []  # never reported complete


async def test_a_job_hash_deleted_mid_snapshot_is_job_not_found(client, writer, token, redis_client):
    await seed_job(writer(JOB), counts={"minute": 5000})
    response = await open_stream(client, JOB, token=token(), intervals="minute", chunk_size=10, limit=5000)
    delete_job = partial(redis_client.delete, keys.job_key(JOB))
    transcript = await read_stream(response, midway=(lambda t: len(t.named("data_chunk")) >= 1, delete_job))
    assert transcript.events[-1].event == "error"
    assert transcript.events[-1].payload["error"] == "job_not_found"


async def test_a_job_hash_deleted_while_following_is_job_not_found(make_gateway, writer, token, redis_client):
    client = await make_gateway(follow={"recheck_interval_s": 0.1})
    await seed_job(writer(JOB), counts={"day": 2})
    response = await open_stream(client, JOB, token=token(), intervals="day", follow="true")
    parser, transcript = SSEParser(), Transcript()
    iterator = response.content.iter_any()
    while "interval_complete" not in transcript.names:
        parser.feed(await iterator.__anext__(), transcript)
    await redis_client.delete(keys.job_key(JOB))
    async for chunk in iterator:
        parser.feed(chunk, transcript)
    assert transcript.events[-1].event == "error"
    assert transcript.events[-1].payload["error"] == "job_not_found"
