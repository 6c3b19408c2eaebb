"""Every documented stream outcome is the one logged, and the keep-alive and the notes survive a defect.

Through the real endpoint, a real Valkey and real sockets. Regression tests
(each failed before): a slow client cut at ``send_timeout_s`` was logged
``client_gone`` (the kernel's ``TCP_USER_TIMEOUT`` fired first); a client
that closed right after ``all_complete`` made its stream ``client_gone``;
an unexpected exception was ``client_gone`` instead of ``incomplete``; one
raising heartbeat tick stopped pings for every stream; a non-Redis error
ended the notes listener for good. The ``drained`` outcome is covered in
``test_shutdown.py``, ``client_gone`` by a follower's reset in
``test_follow_ends.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import urlencode

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.asyncio.client import PubSub

from gateway.sse import CandleEventResponse
from gateway.stream import CandleStream
from tests.faults import eventually
from tests.helpers import make_candles, open_followers, open_stream, seed_job, stream_path
from tests.sse_client import next_events, read_stream

JOB = "outcome-job"


def _outcomes(caplog) -> list[str]:
    return [record.fields["outcome"] for record in caplog.records if record.getMessage() == "stream end"]  # type: ignore[attr-defined]


async def _logged(caplog, count: int) -> list[str]:
    async def done() -> bool:
        return len(_outcomes(caplog)) >= count

    assert await eventually(done, 10.0), _outcomes(caplog)
    return _outcomes(caplog)


async def test_a_client_that_stops_reading_is_cut_off_at_the_send_timeout_as_cut_slow_client(
    make_gateway, writer, token, caplog
):
    client = await make_gateway(server={"send_timeout_s": 0.5, "max_streams_per_user": 0})
    await seed_job(writer(JOB), counts={"minute": 50_000}, status="completed")
    caplog.set_level(logging.INFO, logger="gateway.streams")
    before = _ended("job", "snapshot", "cut_slow_client")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.server.host, client.server.port))
    query = urlencode({"intervals": "minute", "chunk_size": 5000, "limit": 50_000, "token": token()})
    await loop.sock_sendall(sock, f"GET {stream_path(JOB)}?{query} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
    # It never reads: the snapshot fills every buffer and the stream waits, until the cut.
    assert await _logged(caplog, 1) == ["cut_slow_client"]
    assert _ended("job", "snapshot", "cut_slow_client") == before + 1
    sock.close()


async def test_followers_that_close_right_after_all_complete_end_as_all_complete(make_gateway, writer, token, caplog):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2})
    readers = await open_followers(client, JOB, token, 30, intervals="minute")
    caplog.set_level(logging.INFO, logger="gateway.streams")
    before = _ended("job", "follow", "all_complete")
    await w.update(status="completed")

    async def read_then_close(response, next_event) -> None:
        assert (await next_events(next_event, 1))[0].event == "all_complete"
        response.close()  # at once, as a page that got what it needed

    await asyncio.gather(*(read_then_close(*reader) for reader in readers))
    assert await _logged(caplog, 30) == ["all_complete"] * 30
    assert _ended("job", "follow", "all_complete") == before + 30


async def test_an_unexpected_exception_ends_the_stream_as_incomplete_and_closes_it(
    make_gateway, writer, token, caplog, monkeypatch
):
    client = await make_gateway()
    await seed_job(writer(JOB), counts={"minute": 3}, status="completed")

    async def broken(self, index: int) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(CandleStream, "_complete", broken)
    caplog.set_level(logging.INFO)
    transcript = await read_stream(await open_stream(client, JOB, token=token(), intervals="minute"))
    assert transcript.names == ["interval_start", "data_chunk"]  # then the body ended: the client resumes
    assert await _logged(caplog, 1) == ["incomplete"]
    assert _ended("job", "snapshot", "incomplete") >= 1
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in caplog.records)


async def test_one_raising_heartbeat_tick_stops_neither_pings_nor_other_streams(
    make_gateway, writer, token, monkeypatch, caplog
):
    client = await make_gateway(
        server={"ping_interval_s": 0.2, "max_streams_per_user": 0}, follow={"recheck_interval_s": 30.0}
    )
    await seed_job(writer(JOB), counts={"minute": 1})
    broken, healthy = await open_followers(client, JOB, token, 2, intervals="minute")
    victims: list[CandleEventResponse] = []
    beat = CandleEventResponse.beat

    def beat_or_raise(self: CandleEventResponse) -> None:
        if not victims:
            victims.append(self)
        if self is victims[0]:
            raise RuntimeError("a heartbeat defect")
        beat(self)

    monkeypatch.setattr(CandleEventResponse, "beat", beat_or_raise)
    caplog.set_level(logging.INFO)
    # The other stream still gets its pings (the raw body shows the comments the parser drops).
    pings = 0
    deadline = asyncio.get_running_loop().time() + 5.0
    while pings < 3:
        line = await asyncio.wait_for(healthy[0].content.readline(), deadline - asyncio.get_running_loop().time())
        pings += line == b": ping\n"
    # The one whose tick raised is cut off, as a stall would be: its client resumes.
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(broken[0].content.read(), 5.0)
    assert any(record.exc_info and "a heartbeat defect" in str(record.exc_info[1]) for record in caplog.records)
    healthy[0].close()


async def test_the_notes_listener_survives_an_error_that_is_not_redis(make_gateway, writer, token, monkeypatch):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    [(response, next_event)] = await open_followers(client, JOB, token, 1, intervals="minute")
    get_message = PubSub.get_message
    raised: list[bool] = []

    async def once_broken(self, *args, **kwargs):
        if not raised:
            raised.append(True)
            # What uvloop raises on a transport a reset closed, through redis-py's read.
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        return await get_message(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "get_message", once_broken)

    async def has_raised() -> bool:
        return bool(raised)

    assert await eventually(has_raised, 5.0)
    await asyncio.sleep(1.5)  # the listener's pause before it connects again
    await w.append("minute", make_candles(1, first=1))
    # A note brings it, long before the 30 s re-check would.
    event = (await asyncio.wait_for(next_events(next_event, 1), 5.0))[0]
    assert (event.event, event.payload["points_sent"]) == ("data_chunk", 2)
    response.close()


def _ended(source: str, mode: str, outcome: str) -> float:
    labels = {"source": source, "mode": mode, "outcome": outcome}
    return REGISTRY.get_sample_value("gateway_streams_ended_total", labels) or 0.0


@pytest.mark.parametrize(
    ("job", "status", "source", "outcome"),
    [
        ("outcome-missing", None, "job", "job_not_found"),
        ("outcome-failed", "failed", "job", "job_error"),
        ("bt_1737530000.123", None, "backtest", "connection_error"),  # no warehouse configured here
    ],
)
async def test_a_fatal_error_is_the_streams_outcome_logged_and_counted(
    client, writer, token, caplog, job, status, source, outcome
):
    if status is not None:
        await seed_job(writer(job), counts={"minute": 1}, status=status)
    caplog.set_level(logging.INFO, logger="gateway.streams")
    before = _ended(source, "snapshot", outcome)
    transcript = await read_stream(await open_stream(client, job, token=token(), intervals="minute"))
    assert transcript.events[-1].payload["error"] == outcome
    assert await _logged(caplog, 1) == [outcome]
    assert _ended(source, "snapshot", outcome) == before + 1
