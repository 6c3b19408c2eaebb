"""One pipeline per loop turn for every job's snapshot read (sources/batch.py), against a real Valkey."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import redis.exceptions

from gateway.config import RedisSettings
from gateway.devtools.ports import free_port
from gateway.errors import RedisUnreachable
from gateway.redis_client import build_redis_client
from gateway.sources.batch import PipelineBatch


def _get(key: str):
    return lambda pipe: pipe.get(key)


async def test_callers_of_one_turn_share_one_pipeline_and_each_gets_its_own_replies(redis_client):
    await redis_client.mset({"a": b"1", "b": b"2"})
    await redis_client.rpush("a-list", b"x")
    batch = PipelineBatch(redis_client, "reading the job")

    def two(pipe):
        pipe.get("b")
        pipe.llen("a-list")

    replies = await asyncio.gather(batch.execute(_get("a")), batch.execute(two), batch.execute(_get("a-list")))

    assert replies[0] == [b"1"]
    assert replies[1] == [b"2", 1]
    # An error reply stays in its caller's place, as its own pipeline would give it.
    assert len(replies[2]) == 1 and isinstance(replies[2][0], redis.exceptions.ResponseError)
    assert "WRONGTYPE" in str(replies[2][0])
    assert (batch.pipelines, batch.commands) == (1, 4)


async def test_callers_of_different_turns_each_send_their_own(redis_client):
    await redis_client.set("a", b"1")
    batch = PipelineBatch(redis_client, "reading the job")
    assert await batch.execute(_get("a")) == [b"1"]
    assert await batch.execute(_get("a")) == [b"1"]
    assert batch.pipelines == 2


async def test_a_caller_cancelled_before_the_send_is_left_out_and_the_others_are_answered(redis_client):
    await redis_client.set("a", b"1")
    batch = PipelineBatch(redis_client, "reading the job")
    gone = asyncio.ensure_future(batch.execute(_get("gone")))
    kept = asyncio.ensure_future(batch.execute(_get("a")))
    await asyncio.sleep(0)  # both have asked; the batch's send waits for the next turn
    gone.cancel()
    assert await kept == [b"1"]
    assert gone.cancelled()
    assert (batch.pipelines, batch.commands) == (1, 1)


async def test_a_round_trip_that_fails_reaches_every_caller_of_its_turn():
    # Nothing listens on this port: a real refused connection.
    client = build_redis_client(RedisSettings(url=f"redis://127.0.0.1:{free_port()}", retries=0))
    try:
        batch = PipelineBatch(client, "reading the job")
        results = await asyncio.wait_for(
            asyncio.gather(batch.execute(_get("a")), batch.execute(_get("b")), return_exceptions=True), timeout=30
        )
    finally:
        await client.aclose()
    assert batch.pipelines == 1
    for result in results:
        assert isinstance(result, RedisUnreachable)
        assert "while reading the job" in str(result)


async def test_many_jobs_looked_at_in_one_turn_take_one_round_trip(redis_client: aioredis.Redis):
    callers = 100
    await redis_client.mset({f"k{n}": str(n).encode() for n in range(callers)})
    batch = PipelineBatch(redis_client, "reading the job")
    replies = await asyncio.gather(*(batch.execute(_get(f"k{n}")) for n in range(callers)))
    assert replies == [[str(n).encode()] for n in range(callers)]
    assert batch.pipelines == 1


async def test_who_asks_while_every_pipeline_is_out_goes_together_in_the_next(redis_client):
    await redis_client.set("a", b"1")
    batch = PipelineBatch(redis_client, "reading the job", max_in_flight=1)
    # Holds its connection (and the one pipeline allowed out) until the test pushes to its list:
    # not a timer, which a loaded machine could outrun before the others have asked.
    slow = asyncio.ensure_future(batch.execute(lambda pipe: pipe.blpop(["release-the-first"], timeout=30)))
    for _ in range(3):  # its caller asks, then its send starts on the turn after
        await asyncio.sleep(0)
    assert batch.pipelines == 1
    later = []
    for _ in range(3):  # three different loop turns, all while the first is out
        later.append(asyncio.ensure_future(batch.execute(_get("a"))))
        await asyncio.sleep(0.01)
    assert not slow.done()
    assert batch.pipelines == 1
    await redis_client.rpush("release-the-first", b"go")
    assert await asyncio.wait_for(asyncio.gather(*later), timeout=30) == [[b"1"]] * 3
    (popped,) = await slow
    assert list(popped) == [b"release-the-first", b"go"]
    assert (batch.pipelines, batch.commands) == (2, 4)


async def test_a_caller_whose_commands_raise_gets_the_error_and_the_others_are_answered(redis_client):
    await redis_client.set("a", b"1")
    batch = PipelineBatch(redis_client, "reading the job")

    def broken(pipe):
        pipe.get("a")  # half added when it fails: none of it may reach the others' replies
        raise ValueError("no key for this interval")

    results = await asyncio.wait_for(
        asyncio.gather(
            batch.execute(_get("a")), batch.execute(broken), batch.execute(_get("a")), return_exceptions=True
        ),
        timeout=30,
    )
    assert results[0] == [b"1"] and results[2] == [b"1"]
    assert isinstance(results[1], ValueError) and "no key for this interval" in str(results[1])
    assert batch.pipelines == 1
