"""Resume (Last-Event-ID), follow mode and interleaved order (SPEC 2, 6, 7), through the real endpoint."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.exceptions

from gateway.resources import NOTES, REDIS
from gateway.sources import keys
from gateway.workers import JobWriter
from tests.conftest import CODINGS
from tests.helpers import (
    expected_points,
    follow_and_append,
    group_sizes,
    make_candles,
    open_followers,
    open_stream,
    seed_job,
    stream,
)
from tests.sse_client import event_reader, next_events

# Every test here runs with the stream sent as it is, gzip and zstd (issue 22).
pytestmark = CODINGS

JOB = "live-job"


def _shape(events):
    return [(e.id, e.event, e.payload) for e in events]


@pytest.mark.parametrize("order", ["sequential", "interleaved"])
async def test_resuming_after_every_event_continues_exactly_the_uninterrupted_stream(client, writer, token, order):
    w = writer(JOB)
    await seed_job(w, counts={"day": 7, "minute": 23, "3minute": 0, "5minute": 6}, status="completed")
    await w.append_raw("5minute", [b"corrupt"])
    params = {"intervals": "day,hour,minute,3minute,5minute", "chunk_size": 5, "order": order, "limit": 22}
    reference = await stream(client, JOB, token=token(), **params)
    assert reference.names[-1] == "all_complete"
    assert "error" in reference.names

    for index, event in enumerate(reference.events[:-1]):
        resumed = await stream(client, JOB, token=token(), headers={"Last-Event-ID": event.id}, **params)
        assert _shape(reference.events[: index + 1] + resumed.events) == _shape(reference.events), index
        assert resumed.events[0].retry is not None and 3000 <= resumed.events[0].retry <= 6000

    after_end = await open_stream(
        client, JOB, token=token(), headers={"Last-Event-ID": reference.events[-1].id}, **params
    )
    assert after_end.status == 204


async def test_last_event_id_query_parameter_resumes_and_the_header_wins(client, writer, token):
    await seed_job(writer(JOB), counts={"minute": 12}, status="completed")
    reference = await stream(client, JOB, token=token(), intervals="minute", chunk_size=5)
    by_query = await stream(
        client, JOB, token=token(), intervals="minute", chunk_size=5, last_event_id=reference.events[1].id
    )
    assert _shape(by_query.events) == _shape(reference.events[2:])
    both = await stream(
        client, JOB, token=token(), intervals="minute", chunk_size=5,
        last_event_id=reference.events[1].id, headers={"Last-Event-ID": reference.events[2].id},
    )  # fmt: skip
    assert _shape(both.events) == _shape(reference.events[3:])


@pytest.mark.parametrize(
    "change", [{"chunk_size": 4}, {"limit": 11}, {"intervals": "minute,day"}, {"order": "interleaved"}]
)
async def test_event_id_of_another_request_is_400(client, writer, token, change):
    await seed_job(writer(JOB), counts={"minute": 12, "day": 1}, status="completed")
    params = {"intervals": "minute", "chunk_size": 5, "limit": 12}
    reference = await stream(client, JOB, token=token(), **params)
    response = await open_stream(
        client, JOB, token=token(), headers={"Last-Event-ID": reference.events[1].id}, **{**params, **change}
    )
    assert response.status == 400
    assert (await response.json())["message"].startswith("last_event_id:")


async def test_resume_of_a_running_job_keeps_started_totals_and_counts_new_intervals_afresh(client, writer, token):
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 12, "day": 2})
    reference = await stream(client, JOB, token=token(), intervals="minute,day", chunk_size=5)
    cut = reference.events[1]  # the first minute chunk
    more_minutes = make_candles(4, first=12)
    await w.append("minute", more_minutes)
    await w.append("day", make_candles(1, first=2, step=stored["day"][1].time - stored["day"][0].time))
    resumed = await stream(client, JOB, token=token(), intervals="minute,day", chunk_size=5, last_event_id=cut.id)
    assert resumed.names == [
        "data_chunk",
        "data_chunk",
        "interval_complete",
        "interval_start",
        "data_chunk",
        "interval_complete",
        "all_complete",
    ]
    minute_chunks = [e.payload for e in resumed.events[:2]]
    assert [c["points_sent"] for c in minute_chunks] == [10, 12]  # total fixed at 12 by interval_start
    assert minute_chunks[-1]["is_last_chunk"] is True
    assert resumed.events[3].payload["total_points"] == 3  # day started after the resume


async def test_follow_sends_appended_points_status_changes_and_completes(make_gateway, writer, token):
    client = await make_gateway(follow={"recheck_interval_s": 30.0, "status_min_interval_s": 0.01})
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 5, "day": 1}, current_bar=5)
    response = await open_stream(client, JOB, token=token(), intervals="minute,day", follow="true", chunk_size=2)
    next_event = event_reader(response)
    snapshot = await next_events(next_event, 8)
    assert [e.event for e in snapshot] == [
        "interval_start",
        "data_chunk",
        "data_chunk",
        "data_chunk",
        "interval_complete",
        "interval_start",
        "data_chunk",
        "interval_complete",
    ]

    appended = make_candles(3, first=5)
    await w.append("minute", appended)  # publishes a note: the recheck timer (30 s) is not what wakes us
    live = await next_events(next_event, 2)
    assert [e.event for e in live] == ["data_chunk", "data_chunk"]
    first, second = (e.payload for e in live)
    assert (first["chunk_index"], first["points_sent"], first["total_points"], first["is_last_chunk"]) == (
        3,
        7,
        7,
        False,
    )
    assert (second["chunk_index"], second["points_sent"], second["total_points"]) == (4, 8, 8)
    assert first["data_points"] + second["data_points"] == expected_points(appended)
    assert second["progress"]["overall_progress"]["minute"] == {
        "total_points": 8,
        "total_chunks": 5,
        "chunks_sent": 5,
        "points_sent": 8,
    }

    await w.update(current_bar=8)
    status = await next_events(next_event, 1)
    assert status[0].event == "job_status"
    assert status[0].payload == {
        "job_id": JOB,
        "backtest_id": None,
        "job_status": "running",
        "current_bar": 8,
        "is_partial": True,
    }

    last = make_candles(1, first=8)
    await w.append("minute", last)
    await w.update(status="completed")
    tail = await next_events(next_event, 1)
    while tail[-1].event != "all_complete":
        tail += await next_events(next_event, 1)
    chunks = [e for e in tail if e.event == "data_chunk"]
    assert [p for e in chunks for p in e.payload["data_points"]] == expected_points(last)
    final = tail[-1].payload
    assert final["job_status"] == "completed"
    assert final["total_points"] == {"minute": 9, "day": 1}
    assert stored  # the snapshot points were checked by the sequential tests


async def test_a_backtest_id_given_while_following_reaches_the_followers(make_gateway, writer, token):
    """Issue 24: a job given its backtest id mid-stream says so in a job_status, and in all_complete."""
    client = await make_gateway(follow={"recheck_interval_s": 30.0, "status_min_interval_s": 0.01})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2}, current_bar=2)
    # Read to each snapshot's interval_complete; the two ride one hub group.
    followers = await open_followers(client, JOB, token, 2, intervals="minute", follow="true")
    await w.update(backtest_id="bt_1737530999.7")  # status and bar unchanged: only the id is news
    for _, next_event in followers:
        (status,) = await next_events(next_event, 1)
        assert status.event == "job_status"
        assert status.payload == {
            "job_id": JOB,
            "backtest_id": "bt_1737530999.7",
            "job_status": "running",
            "current_bar": 2,
            "is_partial": True,
        }
    await w.append("minute", make_candles(1, first=2))
    await w.update(status="completed")
    for response, next_event in followers:
        events = await next_events(next_event, 2)
        assert [e.event for e in events] == ["data_chunk", "all_complete"]
        assert events[-1].payload["backtest_id"] == "bt_1737530999.7"
        response.close()


async def test_a_job_completing_into_a_backtest_names_it_in_all_complete(client, writer, token):
    """The usual worker: the backtest id written with the final status."""
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2})
    ((response, next_event),) = await open_followers(client, JOB, token, 1, intervals="minute", follow="true")
    await w.update(status="completed", backtest_id="bt_1737530999.8")
    (final,) = await next_events(next_event, 1)
    assert final.event == "all_complete"
    assert (final.payload["job_status"], final.payload["backtest_id"]) == ("completed", "bt_1737530999.8")
    response.close()


async def test_a_backtest_id_given_during_a_snapshot_is_named_from_the_next_state_read(
    make_gateway, proxy, direct, token
):
    """Not following: the job's state (backtest id included) rides with every 8th chunk read."""
    client = await make_gateway(redis={"url": proxy.url}, server={"max_streams_per_user": 0})
    w = JobWriter(direct, JOB)
    await seed_job(w, counts={"minute": 40})
    key = keys.candles_key(JOB, "minute").encode()
    given = False

    async def give_the_backtest_id(args: list[bytes]) -> None:  # just before the gateway reads chunk 3
        nonlocal given
        if not given and args[:2] == [b"LRANGE", key] and int(args[2]) >= 10:
            given = True
            await direct.hset(keys.job_key(JOB), "backtest_id", "bt_1737530999.9")

    proxy.on_command = give_the_backtest_id
    transcript = await stream(client, JOB, token=token(), intervals="minute", chunk_size=5)
    assert given
    start, complete, final = (
        transcript.named(name)[0] for name in ("interval_start", "interval_complete", "all_complete")
    )
    assert start.payload["backtest_id"] is None
    assert complete.payload["backtest_id"] == final.payload["backtest_id"] == "bt_1737530999.9"


async def test_follow_without_any_note_still_delivers_within_the_recheck_interval(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 0.1})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true")
    next_event = event_reader(response)
    await next_events(next_event, 3)
    # A worker that forgets to publish: a bare RPUSH.
    from gateway.sources.candles import encode_candle
    from gateway.sources.keys import candles_key

    await redis_client.rpush(candles_key(JOB, "minute"), encode_candle(make_candles(1, first=1)[0]))
    event = (await next_events(next_event, 1))[0]
    assert event.event == "data_chunk"
    assert event.payload["points_sent"] == 2
    response.close()


@pytest.mark.parametrize("status", ["cancelled", "failed"])
async def test_cancelled_or_failed_job_ends_a_follow_stream_with_job_error(client, writer, token, status):
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="1")
    next_event = event_reader(response)
    await next_events(next_event, 3)
    await w.update(status=status, error="stopped by user")
    event = (await next_events(next_event, 1))[0]
    assert event.event == "error"
    assert event.payload["error"] == "job_error"
    assert "stopped by user" in event.payload["message"]
    assert await response.content.read() == b""  # the stream ends


async def test_follow_never_exceeds_limit(client, writer, token):
    w = writer(JOB)
    await seed_job(w, counts={"minute": 5})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true", limit=6)
    next_event = event_reader(response)
    await next_events(next_event, 3)
    await w.append("minute", make_candles(3, first=5))
    await w.update(status="completed")
    tail = await next_events(next_event, 2)
    assert [e.event for e in tail] == ["data_chunk", "all_complete"]
    assert len(tail[0].payload["data_points"]) == 1
    assert tail[1].payload["total_points"] == {"minute": 6}


async def test_follow_of_a_completed_job_changes_nothing(client, writer, token):
    await seed_job(writer(JOB), counts={"minute": 3}, status="completed")
    followed = await stream(client, JOB, token=token(), intervals="minute", follow="true")
    plain = await stream(client, JOB, token=token(), intervals="minute")
    assert followed.names == plain.names


async def test_many_followers_of_one_job_share_one_subscription(make_gateway, writer, token, redis_client):
    client = await make_gateway(server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    responses = [await open_stream(client, JOB, token=token(), intervals="minute", follow="true") for _ in range(20)]
    readers = [event_reader(r) for r in responses]
    for next_event in readers:
        await next_events(next_event, 3)
    notes = client.server.app[NOTES]
    assert notes.subscribed_jobs == 1
    channel = f"job:{{{JOB}}}:events"
    assert dict(await redis_client.pubsub_numsub(channel)) == {channel.encode(): 1}
    await w.append("minute", make_candles(1, first=1))
    for next_event in readers:
        assert (await next_events(next_event, 1))[0].payload["points_sent"] == 2
    for response in responses:
        response.close()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if notes.subscribed_jobs == 0:
            break
    assert notes.subscribed_jobs == 0
    assert dict(await redis_client.pubsub_numsub(channel)) == {channel.encode(): 0}


async def test_resume_in_follow_mode_while_the_worker_appends(client, writer, token):
    w = writer(JOB)
    params = {"intervals": "minute", "follow": "true", "chunk_size": 2}
    response, _, live = await follow_and_append(client, w, JOB, token, seeded=3, **params)
    response.close()
    await w.append("minute", make_candles(3, first=4))  # appended while disconnected
    resumed = await open_stream(client, JOB, token=token(), headers={"Last-Event-ID": live.id}, **params)
    next_resumed = event_reader(resumed)
    events = await next_events(next_resumed, 2)
    assert [(e.payload["chunk_index"], e.payload["points_sent"]) for e in events] == [(3, 6), (4, 7)]
    assert [p for e in events for p in e.payload["data_points"]] == expected_points(make_candles(3, first=4))
    resumed.close()


async def test_interleaved_order_sends_all_starts_then_one_chunk_per_interval_per_round(client, writer, token):
    stored = await seed_job(writer(JOB), counts={"day": 3, "minute": 12, "3minute": 7})
    transcript = await stream(
        client, JOB, token=token(), intervals="day,minute,3minute", chunk_size=5, order="interleaved"
    )
    summary = [(e.event, e.payload.get("interval")) for e in transcript.events]
    assert summary == [
        ("interval_start", "day"), ("interval_start", "minute"), ("interval_start", "3minute"),
        ("data_chunk", "day"), ("interval_complete", "day"),
        ("data_chunk", "minute"), ("data_chunk", "3minute"),
        ("data_chunk", "minute"), ("data_chunk", "3minute"), ("interval_complete", "3minute"),
        ("data_chunk", "minute"), ("interval_complete", "minute"),
        ("all_complete", None),
    ]  # fmt: skip
    for name in ("day", "minute", "3minute"):
        points = [
            p for e in transcript.named("data_chunk") if e.payload["interval"] == name for p in e.payload["data_points"]
        ]
        assert points == expected_points(stored[name])
    fourth_chunk = transcript.named("data_chunk")[3].payload["progress"]
    assert fourth_chunk["completed_intervals"] == ["day"]
    assert fourth_chunk["overall_progress"]["minute"]["chunks_sent"] == 2
    assert fourth_chunk["overall_progress"]["3minute"]["chunks_sent"] == 1


async def test_follow_in_interleaved_order_goes_live_after_every_interval_completes(client, writer, token):
    w = writer(JOB)
    await seed_job(w, counts={"day": 2, "minute": 3})
    response = await open_stream(
        client, JOB, token=token(), intervals="day,minute", follow="true", order="interleaved", chunk_size=2
    )
    next_event = event_reader(response)
    snapshot = await next_events(next_event, 7)
    assert [(e.event, e.payload.get("interval")) for e in snapshot] == [
        ("interval_start", "day"), ("interval_start", "minute"),
        ("data_chunk", "day"), ("interval_complete", "day"),
        ("data_chunk", "minute"), ("data_chunk", "minute"), ("interval_complete", "minute"),
    ]  # fmt: skip
    await w.append("minute", make_candles(1, first=3))
    live = (await next_events(next_event, 1))[0]
    assert (live.event, live.payload["interval"], live.payload["chunk_index"], live.payload["points_sent"]) == (
        "data_chunk", "minute", 2, 4,
    )  # fmt: skip
    await w.update(status="completed")
    final = (await next_events(next_event, 1))[0]
    assert final.event == "all_complete"
    assert final.payload["total_points"] == {"day": 2, "minute": 4}


async def _commands(redis_client, name):
    stats = await redis_client.info("commandstats")
    return stats.get(f"cmdstat_{name}", {"calls": 0})["calls"]


async def test_idle_followers_cost_one_read_per_job_and_recheck_not_one_per_follower(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 0.1}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    followers = await open_followers(client, JOB, token, 30, intervals="minute")
    responses = [response for response, _ in followers]
    readers = [next_event for _, next_event in followers]
    before = await _commands(redis_client, "hgetall")
    await asyncio.sleep(1.0)
    reads = await _commands(redis_client, "hgetall") - before
    assert 5 <= reads <= 13  # one per 0.1 s tick for the job, not 30 per tick
    # A bare RPUSH (no note) is still found by the job's re-check, and every follower gets it.
    from gateway.sources.candles import encode_candle
    from gateway.sources.keys import candles_key

    await redis_client.rpush(candles_key(JOB, "minute"), encode_candle(make_candles(1, first=1)[0]))
    for next_event in readers:
        assert (await next_events(next_event, 1))[0].payload["points_sent"] == 2
    for response in responses:
        response.close()


async def test_followers_at_one_position_share_one_frame_and_the_others_get_their_own(make_gateway, writer, token):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 3})
    same = {"intervals": "minute", "follow": "true", "chunk_size": 2}
    first = await open_stream(client, JOB, token=token(), **same)
    next_first = event_reader(first)
    head = await next_events(next_first, 4)
    twin = await open_stream(client, JOB, token=token(), **same)
    next_twin = event_reader(twin)
    await next_events(next_twin, 4)
    # Same request, resumed from an earlier event: another position, so its own bytes.
    behind = await open_stream(client, JOB, token=token(), headers={"Last-Event-ID": head[1].id}, **same)
    next_behind = event_reader(behind)
    assert [e.payload["points_sent"] for e in await next_events(next_behind, 1)] == [3]
    await next_events(next_behind, 1)  # its interval_complete
    other = await open_stream(client, JOB, token=token(), intervals="minute", follow="true", chunk_size=5)
    next_other = event_reader(other)
    await next_events(next_other, 3)

    appended = make_candles(2, first=3)
    await w.append("minute", appended)
    got_first, got_twin = (await next_events(next_first, 1))[0], (await next_events(next_twin, 1))[0]
    got_behind, got_other = (await next_events(next_behind, 1))[0], (await next_events(next_other, 1))[0]
    assert (got_first.id, got_first.data) == (got_twin.id, got_twin.data)
    assert got_first.payload["points_sent"] == 5 and got_first.payload["chunk_index"] == 2
    assert got_behind.id == got_first.id  # resumed behind, caught up: same position, same bytes
    assert got_other.payload["chunk_index"] == 1 and got_other.payload["points_sent"] == 5
    assert got_other.id != got_first.id
    for event in (got_first, got_behind, got_other):
        assert event.payload["data_points"] == expected_points(appended)
    # Four streams, two distinct byte strings, each encoded once: the first, the twin and the
    # caught-up stream are one group of the job's hub (one model stream builds their frames), the other its own.
    assert group_sizes(client, JOB) == [1, 3]
    for response in (first, twin, behind, other):
        response.close()


async def test_a_follower_whose_read_finds_the_pool_busy_keeps_its_stream(make_gateway, writer, token):
    client = await make_gateway(
        redis={"max_connections": 2, "pool_timeout_s": 0.05},
        follow={"recheck_interval_s": 30.0},
        server={"max_streams_per_user": 0},
    )
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true")
    next_event = event_reader(response)
    await next_events(next_event, 3)
    pool = client.server.app[REDIS].connection_pool
    held = []
    with contextlib.suppress(redis.exceptions.ConnectionError):
        while True:  # every connection busy elsewhere (one is the notes' subscription)
            held.append(await pool.get_connection())
    assert held
    await w.append("minute", make_candles(1, first=1))
    await asyncio.sleep(0.3)  # the follower's reads time out meanwhile, and it waits
    for connection in held:
        await pool.release(connection)
    event = (await next_events(next_event, 1))[0]
    assert (event.event, event.payload["points_sent"]) == ("data_chunk", 2)
    response.close()


async def test_followers_of_one_job_share_one_snapshot_and_one_chunk_read_per_append(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    followers = await open_followers(client, JOB, token, 50, intervals="minute")
    responses = [response for response, _ in followers]
    readers = [next_event for _, next_event in followers]
    before = await _commands(redis_client, "lrange"), await _commands(redis_client, "hgetall")
    for n in range(5):
        await w.append("minute", make_candles(1, first=1 + n))
        for next_event in readers:
            assert (await next_events(next_event, 1))[0].payload["points_sent"] == 2 + n
    lranges = await _commands(redis_client, "lrange") - before[0]
    hgetalls = await _commands(redis_client, "hgetall") - before[1]
    assert (lranges, hgetalls) == (5, 5)
    assert group_sizes(client, JOB) == [50]  # one model stream builds each frame, for all 50
    for response in responses:
        response.close()


async def test_points_appended_just_before_the_job_completes_are_all_sent(make_gateway, writer, token):
    # While a follower catches up chunk by chunk, chunk reads see the job "completed";
    # the points appended after the follower last counted must still all be sent.
    client = await make_gateway(follow={"recheck_interval_s": 30.0})
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 1})
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true", chunk_size=1)
    next_event = event_reader(response)
    assert [e.event for e in await next_events(next_event, 3)] == ["interval_start", "data_chunk", "interval_complete"]
    burst = make_candles(300, first=1)
    await w.append("minute", burst)
    first_live = await asyncio.wait_for(next_event(), timeout=10)
    assert first_live.event == "data_chunk"
    tail = make_candles(20, first=301)
    await w.append("minute", tail)
    await w.update(status="completed")
    events = [first_live]
    while events[-1].event != "all_complete":
        events.append(await asyncio.wait_for(next_event(), timeout=10))
    points = [p for e in events if e.event == "data_chunk" for p in e.payload["data_points"]]
    assert points == expected_points(burst + tail)
    assert events[-1].payload["total_points"] == {"minute": 1 + 300 + 20}
    assert stored["minute"]  # the snapshot's point came before


async def _until_heard(client, job_id: str) -> None:
    """Until Redis confirmed the process's subscription to the job's notes."""
    notes = client.server.app[NOTES]
    for _ in range(300):
        if notes.hears(job_id):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the process never heard {job_id}'s notes")


async def test_a_new_follower_of_a_job_the_process_hears_waits_for_a_note_instead_of_looking(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 3})
    first = await open_followers(client, JOB, token, 1, intervals="minute")
    await _until_heard(client, JOB)
    before = await _commands(redis_client, "hgetall")
    [(response, next_event)] = await open_followers(client, JOB, token, 1, intervals="minute")
    await asyncio.sleep(0.2)
    # Its describe read the job; no look of its own followed the snapshot.
    assert await _commands(redis_client, "hgetall") - before == 1
    await w.append("minute", make_candles(1, first=3))
    for reader in (next_event, first[0][1]):
        live = (await next_events(reader, 1))[0]
        assert (live.event, live.payload["points_sent"]) == ("data_chunk", 4)
    for each in (response, first[0][0]):
        each.close()


async def test_points_appended_while_a_caught_up_followers_snapshot_streams_arrive_live_once(
    make_gateway, writer, token
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 400})
    first = await open_followers(client, JOB, token, 1, intervals="minute", chunk_size=500)
    await _until_heard(client, JOB)
    response = await open_stream(client, JOB, token=token(), intervals="minute", follow="true", chunk_size=2)
    next_event = event_reader(response)
    events = await next_events(next_event, 2)  # interval_start, the first chunk: the snapshot is under way
    assert events[0].payload["total_points"] == 400
    appended = make_candles(5, first=400)
    await w.append("minute", appended)
    while events[-1].event != "interval_complete":
        events.append(await asyncio.wait_for(next_event(), timeout=10))
    live = [await asyncio.wait_for(next_event(), timeout=5)]  # the note brings them, not the 30 s re-check
    while live[-1].payload["points_sent"] < 405:
        live.append(await asyncio.wait_for(next_event(), timeout=5))
    assert [(e.event, e.payload["points_sent"]) for e in live] == [("data_chunk", n) for n in (402, 404, 405)]
    points = [p for e in events + live if e.event == "data_chunk" for p in e.payload["data_points"]]
    assert points == expected_points(stored["minute"] + appended)
    for each in (response, first[0][0]):
        each.close()


async def test_followers_that_leave_a_job_with_nothing_new_are_let_go_by_its_hub(make_gateway, writer, token):
    """A job that sends nothing new for long (pending, stalled) keeps no follower that came and went."""
    from tests.faults import eventually

    client = await make_gateway(follow={"recheck_interval_s": 0.1}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    follow = {"intervals": "minute", "follow": "true"}
    stays = await open_stream(client, JOB, token=token(), **follow)
    await next_events(event_reader(stays), 3)  # through its interval_complete

    async def in_hub(count: int) -> bool:
        return sum(group_sizes(client, JOB)) >= count

    for _ in range(5):  # each comes, joins the hub and goes, while the job sends nothing
        comes = await open_stream(client, JOB, token=token(), **follow)
        await next_events(event_reader(comes), 3)
        assert await eventually(lambda: in_hub(2), 10.0)
        comes.close()

    async def only_the_one_left() -> bool:
        return group_sizes(client, JOB) == [1]

    assert await eventually(only_the_one_left, 10.0), group_sizes(client, JOB)
    stays.close()


async def test_a_follower_cancelled_as_its_first_data_chunk_is_written_does_not_stop_the_hub(
    make_gateway, writer, token
):
    """Its task cancelled (its client went away) in the loop turn the hub writes the job's first candle.

    The cancellation cancels the future the follower's task awaits at once, but the task
    settles only on its next step: the hub's flush can see it so. That moment is rare on
    the wire, so the test makes it certain by cancelling that future just before the
    flush (the hub's own objects: no client can time a cancellation within a loop turn).
    """
    from tests.faults import eventually

    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 0})
    (stays, next_stays), (goes, _) = await open_followers(client, JOB, token, 2, intervals="minute")
    hub = client.server.app[NOTES].hub(JOB)
    assert hub is not None

    async def one_group_of_two() -> bool:
        return group_sizes(client, JOB) == [2]

    assert await eventually(one_group_of_two, 10.0)
    (group,) = hub.groups
    leaving = list(group.members)[1]
    flush = group.flush

    def flush_as_it_leaves() -> None:
        if group.chunk_pending and not leaving.left.done():
            leaving.left.cancel()  # what Task.cancel does to the future its task awaits
        flush()

    group.flush = flush_as_it_leaves
    await w.append("minute", make_candles(1))
    (chunk,) = await next_events(next_stays, 1)
    assert chunk.event == "data_chunk"
    await w.append("minute", make_candles(1, first=1))
    (chunk,) = await next_events(next_stays, 1)  # the hub still writes to the one that stays
    assert chunk.event == "data_chunk" and chunk.payload["points_sent"] == 2
    stays.close()
    goes.close()
