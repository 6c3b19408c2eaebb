"""Outage holds end at ``redis.outage_wait_s`` whatever Redis does (issue 20, item 3).

A real Valkey that hangs (SIGSTOP) or a route to it that drops every packet
(the tests' own proxy, black-holing): a new stream is held for the setting
(within half a second) and then answered 503; ``/readyz`` answers within 2 s;
a slot acquire that reaches Redis after its request got 503 leaves no slot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from gateway.resources import SLOTS
from gateway.sources import keys
from gateway.workers import JobWriter
from tests.helpers import open_stream, seed_job

JOB = "hold-job"
WAIT_S = 3.0


async def _timed(request) -> tuple[float, int, dict]:
    started = time.monotonic()
    response = await request
    body = await response.json()
    return time.monotonic() - started, response.status, body


@pytest.mark.parametrize("fault", ["sigstop", "black_hole"])
async def test_holds_end_at_the_setting_and_a_late_slot_is_released(make_gateway, valkey, proxy, direct, token, fault):
    # redis-py's own timeouts and retries would hold a request 5 s x 3 attempts.
    client = await make_gateway(
        redis={"url": proxy.url, "outage_wait_s": WAIT_S, "socket_timeout_s": 5.0, "retries": 2},
        server={"max_streams_per_user": 8},
    )
    await seed_job(JobWriter(direct, JOB), counts={"day": 3}, status="completed")
    warm = await open_stream(client, JOB, token=token(), intervals="day")  # pooled connection, script loaded
    assert warm.status == 200
    await warm.read()
    pid = int((await direct.info("server"))["process_id"])
    if fault == "sigstop":
        os.kill(pid, signal.SIGSTOP)
    else:
        proxy.black_hole()
    try:
        stream = asyncio.create_task(_timed(open_stream(client, JOB, token=token(), intervals="day")))
        await asyncio.sleep(0.5)
        ready_wait, ready_status, _ = await _timed(client.get("/readyz"))
        waited, status, body = await stream
    finally:
        if fault == "sigstop":
            os.kill(pid, signal.SIGCONT)
        else:
            proxy.heal()
    assert ready_status == 503 and ready_wait < 2.0, (ready_status, ready_wait)
    assert status == 503 and body["error"] == "unavailable", body
    assert abs(waited - WAIT_S) <= 0.5, f"held {waited:.2f} s for outage_wait_s = {WAIT_S}"
    # The acquire the 503 cut short reaches Redis now: it must not hold a slot.
    slots = keys.user_streams_key("alice")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if await direct.zcard(slots) == 0 and not client.app[SLOTS].releasing:
            break
    await asyncio.sleep(1.0)  # and it stays so: no acquire lands after its cancellation
    assert await direct.zcard(slots) == 0, await direct.zrange(slots, 0, -1, withscores=True)
