"""The list reader (sources/lists.py) against a real Valkey: closing it never swallows its caller's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sources.candles import encode_candle
from gateway.sources.lists import ListReads
from tests.helpers import make_candles


async def test_a_reader_closed_by_a_cancelled_caller_lets_the_cancellation_through(redis_client):
    key = "list-reader-test"
    await redis_client.delete(key)
    await redis_client.rpush(key, *[encode_candle(candle) for candle in make_candles(100)])

    async def fetch(start: int, count: int):
        return await redis_client.lrange(key, start, start + count - 1), None

    reader = ListReads().reader(fetch, "minute", 0, 100, 10, prefetch=True)
    await reader.next_chunk()  # the next chunk is now read ahead, in flight
    closing = asyncio.create_task(reader.aclose())
    await asyncio.sleep(0)  # aclose waits for the read it cancelled
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled()
