"""How follow streams end, through the real endpoint: every follower gets its end and its connection closes.

Regression tests for defects of the cohorts the hub replaced (each failed
before): a first follower that is behind or gone exactly as the job
completes took the others' end with it (their streams stayed open after
``all_complete``, holding their slots), and a follower cancelled while
frames were pending raised ``KeyError``. Plus the churn test: a thousand
followers of ten jobs, a third of them closing around each job's end.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Any
from urllib.parse import urlencode

from gateway.metrics import metrics_app
from gateway.sources.candles import encode_candle
from gateway.sources.keys import candles_key, events_channel, job_key, user_streams_key
from tests.faults import eventually
from tests.helpers import make_candles, open_followers, seed_job, stream_path
from tests.sse_client import next_events

JOB = "ends-job"
FOLLOW: dict[str, object] = {"intervals": "minute", "follow": "true", "chunk_size": 5000, "limit": 50_000}


async def _in_hub(metrics) -> float:
    """Follow streams whose live events their job's hub writes (the gauge kept its name from the cohorts)."""
    text = await (await metrics.get("/metrics")).text()
    line = next(line for line in text.splitlines() if line.startswith("gateway_follow_cohort_riders "))
    return float(line.split()[1])


async def _until_in_hub(metrics, count: float) -> None:
    async def check() -> bool:
        return await _in_hub(metrics) == count

    assert await eventually(check, 10.0), f"{await _in_hub(metrics)} in the hub, not {count}"


async def _append_and_complete(redis_client, job_id: str, candles: list[Any], names=("minute",)) -> None:
    """What a worker's last step may be: its last candles and 'completed' in one transaction, one note."""
    async with redis_client.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.rpush(candles_key(job_id, name), *[encode_candle(candle) for candle in candles])
        pipe.hset(job_key(job_id), "status", "completed")
        await pipe.execute()
    await redis_client.publish(events_channel(job_id), b'{"status": "completed"}')


async def _open_raw(client, token: str, params: dict[str, object], job_id: str = JOB) -> socket.socket:
    """A follow stream on a plain socket with a tiny receive buffer, read to the end of its snapshot."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.server.host, client.server.port))
    query = urlencode((FOLLOW | params) | {"token": token})
    request = f"GET {stream_path(job_id)}?{query} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"interval_complete" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 65536), 30.0)
    return sock


async def _ends_and_closes(readers) -> None:
    """Each follower gets all_complete, and its connection closes within 2 s after it."""
    for response, next_event in readers:
        event = (await next_events(next_event, 1))[0]
        while event.event != "all_complete":
            event = await asyncio.wait_for(next_event(), 10.0)
        assert await asyncio.wait_for(response.content.read(), 2.0) == b""


async def test_the_first_follower_behind_exactly_at_the_jobs_end_takes_nobody_elses_end(
    make_gateway, aiohttp_client, writer, token, redis_client
):
    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0, "send_timeout_s": 30.0}
    )
    metrics = await aiohttp_client(metrics_app())
    before = await _in_hub(metrics)
    names = tuple(f"i{n}" for n in range(16))
    await seed_job(writer(JOB), counts=dict.fromkeys(names, 1))
    params = FOLLOW | {"intervals": ",".join(names)}
    slow = await _open_raw(client, token(), params)  # first in, and never reads again
    await _until_in_hub(metrics, before + 1)
    readers = await open_followers(client, JOB, token, 2, **params)
    await _until_in_hub(metrics, before + 3)
    # The job's last look: a chunk for each of 16 intervals, 10 MB in all (too much for the slow one's socket), and all_complete.
    await _append_and_complete(redis_client, JOB, make_candles(5000, first=1), names)
    await _ends_and_closes(readers)
    await _until_in_hub(metrics, before)
    slow.close()


async def test_the_first_follower_gone_exactly_at_the_jobs_end_takes_nobody_elses_end(
    make_gateway, aiohttp_client, writer, token, redis_client
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    metrics = await aiohttp_client(metrics_app())
    before = await _in_hub(metrics)
    await seed_job(writer(JOB), counts={"minute": 1})
    gone = await _open_raw(client, token(), FOLLOW)
    await _until_in_hub(metrics, before + 1)
    readers = await open_followers(client, JOB, token, 2, **FOLLOW)
    await _until_in_hub(metrics, before + 3)
    # A reset, and the job's end on its heels: the first follower's socket is closing when its end is written.
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    gone.close()
    await _append_and_complete(redis_client, JOB, make_candles(3, first=1))
    await _ends_and_closes(readers)
    await _until_in_hub(metrics, before)


async def test_followers_cancelled_while_their_hub_writes_a_long_catch_up_end_as_client_gone(
    make_gateway, aiohttp_client, writer, token, caplog
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    metrics = await aiohttp_client(metrics_app())
    before = await _in_hub(metrics)
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    params = FOLLOW | {"chunk_size": 1}
    socks = [await _open_raw(client, token(), params) for _ in range(60)]
    await _until_in_hub(metrics, before + 60)
    caplog.set_level(logging.INFO)
    # A catch-up of 1,500 one-point chunks, read one by one: half the followers reset their
    # connections while it is written, so some are cancelled with frames waiting for them.
    rng = random.Random(20)

    async def reset_at(sock: socket.socket, delay: float) -> None:
        await asyncio.sleep(delay)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()

    await w.append("minute", make_candles(1500, first=1))
    await asyncio.gather(*(reset_at(sock, rng.uniform(0.0, 0.5)) for sock in socks[:30]))
    await w.update(status="completed")
    loop = asyncio.get_running_loop()
    for sock in socks[30:]:
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10.0)
            assert data, "closed before the end of its response"
            body += data
        assert body.count(b"event: data_chunk") == 1500 and b"event: all_complete" in body
        sock.close()
    await _until_in_hub(metrics, before)
    assert not [record for record in caplog.records if record.exc_info], "a follower's end raised"

    async def all_logged() -> bool:
        return len([record for record in caplog.records if record.getMessage() == "stream end"]) == 60

    assert await eventually(all_logged, 5.0)
    outcomes = [record.fields["outcome"] for record in caplog.records if record.getMessage() == "stream end"]  # type: ignore[attr-defined]
    assert sorted(outcomes) == ["all_complete"] * 30 + ["client_gone"] * 30


async def test_churn_a_thousand_followers_of_ten_jobs_a_third_leaving_around_each_end(
    make_gateway, aiohttp_client, writer, token, redis_client
):
    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 5000, "send_timeout_s": 10.0}
    )
    metrics = await aiohttp_client(metrics_app())
    before = await _in_hub(metrics)
    jobs = [f"churn-{n}" for n in range(10)]
    for job in jobs:
        await seed_job(writer(job), counts={"minute": 2})
    rng = random.Random(21)
    loop = asyncio.get_running_loop()
    params = FOLLOW | {"chunk_size": 100}

    async def open_one(job: str) -> socket.socket:
        return await _open_raw(client, token(), params, job)

    socks: dict[str, list[socket.socket]] = {}
    for job in jobs:
        socks[job] = list(await asyncio.gather(*(open_one(job) for _ in range(100))))
    await _until_in_hub(metrics, before + 1000)
    assert await redis_client.zcard(user_streams_key("alice")) == 1000  # the limit is on: each took a slot
    leaving = {job: set(rng.sample(range(100), 33)) for job in jobs}

    async def leave_at(sock: socket.socket, delay: float) -> None:
        await asyncio.sleep(delay)
        sock.close()

    async def end_job(job: str) -> None:
        await writer(job).append("minute", make_candles(5, first=2))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        await writer(job).update(status="completed")

    closers = [
        leave_at(sock, rng.uniform(0.0, 0.2))
        for job in jobs
        for index, sock in enumerate(socks[job])
        if index in leaving[job]
    ]
    ended_at = loop.time()
    await asyncio.gather(*closers, *(end_job(job) for job in jobs))

    async def read_to_end(sock: socket.socket) -> bytes:
        """Until the response's end (the chunked body's last chunk) or the connection's close."""
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            data = await loop.sock_recv(sock, 65536)
            if not data:
                break
            body += data
        return body

    staying = [sock for job in jobs for index, sock in enumerate(socks[job]) if index not in leaving[job]]
    bodies = await asyncio.wait_for(asyncio.gather(*(read_to_end(sock) for sock in staying)), 30.0)
    for body in bodies:
        assert b"event: all_complete" in body
        assert body.endswith(b"0\r\n\r\n")  # the response's end, written by the server
    # Every remaining follower's response ended within 2 s of its job's end (plus the loaded machine's margin).
    assert loop.time() - ended_at < 2.0 + 3.0
    for sock in staying:
        sock.close()
    await _until_in_hub(metrics, before)

    async def slots_taken() -> int:
        return sum([await redis_client.zcard(key) async for key in redis_client.scan_iter(user_streams_key("*"))])

    async def none_taken() -> bool:
        return await slots_taken() == 0

    assert await eventually(none_taken, 5.0), f"{await slots_taken()} stream slots stayed taken"
