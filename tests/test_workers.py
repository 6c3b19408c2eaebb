"""The worker side of the Redis contract (SPEC 6), as JobWriter writes it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.sources import keys
from tests.helpers import make_candles


async def _notes(pubsub, count):
    notes: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(notes) < count and asyncio.get_running_loop().time() < deadline:
        # None also stands for a skipped subscribe confirmation: keep reading.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            notes.append(json.loads(message["data"]))
    return notes


async def test_job_writer_keeps_the_contract_and_notes_every_change(writer, redis_client):
    w = writer("worker-job")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.events_channel("worker-job"))
    await w.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day", "minute"])
    await w.append("minute", make_candles(3))
    await w.append("minute", make_candles(2, first=3))
    await w.update(status="running", current_bar=5)
    await w.update(status="completed", backtest_id="bt_1.5")

    assert await _notes(pubsub, 5) == [
        {"status": "queued"},
        {"interval": "minute", "length": 3},
        {"interval": "minute", "length": 5},
        {"status": "running", "current_bar": 5},
        {"status": "completed", "backtest_id": "bt_1.5"},
    ]
    job = await redis_client.hgetall(keys.job_key("worker-job"))
    assert job[b"intervals"] == b"day,minute"
    assert job[b"status"] == b"completed"
    assert job[b"current_bar"] == b"5"
    assert job[b"updated_at"].endswith(b"Z")
    stored = await redis_client.lrange(keys.candles_key("worker-job", "minute"), 0, -1)
    assert [json.loads(c)["time"] for c in stored] == [f"2025-04-01T00:0{i}:00Z" for i in range(5)]
    await pubsub.aclose()


async def test_job_writer_refuses_a_status_outside_the_contract(writer):
    with pytest.raises(ValueError, match="status"):
        await writer("worker-job").update(status="done")
