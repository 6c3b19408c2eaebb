"""Many streams opening at once (issue 12): shared job reads; nothing answered staler or looser."""

from __future__ import annotations

import asyncio
from collections import Counter

from gateway.sources.fresh import FreshReads
from tests.helpers import expected_points, seed_job, stream

JOB = "connect-job"


async def command_stats(redis_client) -> Counter[str]:
    info = await redis_client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()})


# -- one job read for streams that open together ----------------------------------


async def test_streams_opening_together_share_the_job_read_and_first_chunk_but_not_access(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(server={"max_streams_per_user": 0})
    stored = await seed_job(writer(JOB), counts={"day": 3})
    before = await command_stats(redis_client)
    # Redis holds every command for a second: all 20 requests ask while the first read waits.
    await redis_client.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    users = ["alice"] * 10 + ["mallory"] * 10
    transcripts = await asyncio.gather(*(stream(client, JOB, token=token(uid), intervals="day") for uid in users))
    spent = await command_stats(redis_client) - before
    for uid, transcript in zip(users, transcripts, strict=True):
        if uid == "alice":
            assert transcript.names == ["interval_start", "data_chunk", "interval_complete", "all_complete"]
            assert transcript.named("data_chunk")[0].payload["data_points"] == expected_points(stored["day"])
        else:  # the shared read still went through mallory's own authorization
            assert [(e.event, e.payload["error"]) for e in transcript.events] == [("error", "job_not_found")]
    # The read in flight, and one after it for everyone who asked meanwhile; not 20 of each.
    assert spent["hgetall"] <= 2
    assert spent["lrange"] <= 3


async def test_a_stream_never_gets_a_job_read_that_started_before_it_asked():
    fresh = FreshReads()
    job = {"exists": False}
    release, reading = asyncio.Event(), asyncio.Event()
    started = 0

    async def read() -> bool:
        nonlocal started
        started += 1
        reading.set()
        seen = job["exists"]
        await release.wait()
        return seen

    first = asyncio.ensure_future(fresh.read("job", read))
    await reading.wait()  # the first read is under way, having seen no job
    job["exists"] = True  # a worker creates the job; then three more streams ask
    later = [asyncio.ensure_future(fresh.read("job", read)) for _ in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == 1  # the three wait for the next read instead of joining this one
    release.set()
    assert await first is False
    assert await asyncio.gather(*later) == [True, True, True]
    assert started == 2  # and share it


async def test_callers_going_away_do_not_cancel_the_read_others_wait_for():
    fresh = FreshReads()
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "job"

    first, leaving, staying = (asyncio.ensure_future(fresh.read("key", read)) for _ in range(3))
    for _ in range(5):
        await asyncio.sleep(0)
    first.cancel()  # the read in flight ends with its caller
    leaving.cancel()  # the queued one goes on for the caller that stays
    release.set()
    assert await staying == "job"
    assert first.cancelled()
    assert leaving.cancelled()
