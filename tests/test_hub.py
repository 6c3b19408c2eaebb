"""Follow cohorts (broadcast.py): one leader writes each event to every caught-up follower, through the real endpoint.

Each test checks what the clients receive (exactly the events a stream of
their own would send) and what leaving a cohort does: a client that stops
reading falls out and later gets everything, one that goes away is dropped,
the job's end reaches every rider once, and the stream's log line and
metrics count what a rider was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any
from urllib.parse import urlencode

import pytest

from gateway.metrics import metrics_app
from tests.conftest import CODINGS
from tests.faults import eventually
from tests.helpers import expected_points, group_sizes, make_candles, open_followers, open_stream, seed_job, stream_path
from tests.sse_client import SSEParser, Transcript, next_events, read_stream

# Every test here runs with the stream sent as it is, gzip and zstd (issue 22).
pytestmark = CODINGS

JOB = "cohort-job"
FOLLOW = {"intervals": "minute", "follow": "true", "chunk_size": 500, "limit": 50_000}


def _riders(client) -> list[int]:
    return group_sizes(client, JOB)


async def _followers(client, token, count: int, **params: Any):
    return await open_followers(client, JOB, token, count, **(FOLLOW | params))


async def test_every_rider_gets_each_event_once_and_the_job_end_once(make_gateway, writer, token, caplog):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2})
    readers = await _followers(client, token, 5)
    assert await eventually(lambda: _async(_riders(client) == [5]), 5.0)

    appended = make_candles(3, first=2)
    for candle in appended:
        await w.append("minute", [candle])
        got = [(await next_events(next_event, 1))[0] for _, next_event in readers]
        assert len({(event.id, event.data) for event in got}) == 1  # one encoding, the same bytes for all
        assert got[0].event == "data_chunk"
    await w.update(status="running", current_bar=99)
    status = [(await next_events(next_event, 1))[0] for _, next_event in readers]
    assert {event.event for event in status} == {"job_status"} and status[0].payload["current_bar"] == 99
    caplog.set_level(logging.INFO, logger="gateway.streams")
    await w.update(status="completed")
    for response, next_event in readers:
        final = (await next_events(next_event, 1))[0]
        assert final.event == "all_complete" and final.payload["total_points"] == {"minute": 5}
        assert await response.content.read() == b""  # nothing after it: the stream ended
    assert await eventually(lambda: _async(len(_ends(caplog)) == 5), 5.0)
    for record in _ends(caplog):
        fields = record.fields  # type: ignore[attr-defined]
        # The rider's own line counts what the leader wrote to it: 3 chunks, 1 status, all_complete.
        assert (fields["outcome"], fields["points"], fields["events"]) == ("all_complete", 5, 3 + 3 + 1 + 1)


async def test_a_failed_job_ends_every_rider_with_one_job_error(make_gateway, writer, token):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    readers = await _followers(client, token, 3)
    assert await eventually(lambda: _async(_riders(client) == [3]), 5.0)
    await w.update(status="failed", error="broker rejected the order")
    for response, next_event in readers:
        error = (await next_events(next_event, 1))[0]
        assert error.event == "error" and error.payload["error"] == "job_error"
        assert "broker rejected the order" in error.payload["message"]
        assert await response.content.read() == b""


async def test_a_rider_that_goes_away_is_dropped_and_the_others_go_on(make_gateway, aiohttp_client, writer, token):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    metrics = await aiohttp_client(metrics_app())
    riding_before = await _riding(metrics)
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    readers = await _followers(client, token, 3)
    assert await eventually(lambda: _async(_riders(client) == [3]), 5.0)
    assert await _riding(metrics) == riding_before + 3  # what an operator sees
    gone, _ = readers.pop(0)
    gone.close()
    await w.append("minute", make_candles(1, first=1))
    for _, next_event in readers:
        assert (await next_events(next_event, 1))[0].payload["points_sent"] == 2
    assert await eventually(lambda: _async(_riders(client) == [2]), 5.0)
    assert await _riding(metrics) == riding_before + 2


async def _riding(metrics) -> float:
    text = await (await metrics.get("/metrics")).text()
    line = next(line for line in text.splitlines() if line.startswith("gateway_follow_cohort_riders "))
    return float(line.split()[1])


async def test_a_rider_whose_client_stops_reading_falls_out_and_later_gets_everything_exactly(
    make_gateway, writer, token
):
    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0, "send_timeout_s": 30.0}
    )
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1})
    (fast,) = await _followers(client, token, 1)
    slow = await _RawFollower.open(client, token())
    assert await eventually(lambda: _async(_riders(client) == [2]), 5.0)

    # Big chunks for a client that reads nothing: its socket's buffers fill, and it falls out.
    appended, first = [], 1
    while _riders(client) == [2]:
        candles = make_candles(500, first=first)
        first += len(candles)
        appended += candles
        await w.append("minute", candles)
        got = (await next_events(fast[1], 1))[0]
        assert got.payload["points_sent"] == first, len(appended)  # the fast rider is never held back
        assert first < 50_000, "the slow client never fell out of the cohort"
    assert _riders(client) == [1]
    # Appends go on while it is out; then it reads again and gets every point, once, in order.
    more = make_candles(3, first=first)
    await w.append("minute", more)
    assert (await next_events(fast[1], 1))[0].payload["points_sent"] == first + 3
    await w.update(status="completed")
    events = await slow.read_to_end()
    chunks = [event for event in events if event.event == "data_chunk"]
    points = [point for chunk in chunks for point in chunk.payload["data_points"]]
    assert points == expected_points(make_candles(1) + appended + more)
    assert [chunk.payload["points_sent"] for chunk in chunks] == sorted({c.payload["points_sent"] for c in chunks})
    assert events[-1].event == "all_complete" and [e.event for e in events].count("all_complete") == 1


async def test_a_rider_that_never_reads_again_is_cut_off_and_resumes_exactly(
    make_gateway, writer, token, accept_encoding
):
    if accept_encoding != "identity":
        # The raw client is identity in every run; a compressed partner rider only makes the
        # cohort faster than the 0.1 s polls below, which then keep the raw client reading.
        pytest.skip("the cut-off of a raw identity client; its cohort partner's coding changes nothing")
    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0, "send_timeout_s": 1.0}
    )
    w = writer(JOB)
    names = ("minute", "3minute", "day")
    await seed_job(w, counts=dict.fromkeys(names, 1))
    params = FOLLOW | {"intervals": ",".join(names), "chunk_size": 5000}
    (fast,) = await _followers(client, token, 1, **params)
    slow = await _RawFollower.open(client, token(), **params)
    assert await eventually(lambda: _async(_riders(client) == [2]), 5.0)
    # 15 MB for a client that reads nothing: more than the loopback buffers hold.
    for first in range(1, 50_000, 5000):
        for name in names:
            await w.append(name, make_candles(5000, first=first))
            await next_events(fast[1], 1)
    assert _riders(client) == [1]
    assert await eventually(lambda: _async(slow.cut_off()), 5.0)
    # It resumes from the last event it received, and gets every point once.
    received = slow.events()
    assert "all_complete" not in [event.event for event in received]
    await w.update(status="completed")
    resumed = await open_stream(client, JOB, token=token(), headers={"Last-Event-ID": received[-1].id}, **params)
    rest = await read_stream(resumed)
    assert rest.names[-1] == "all_complete"
    sent = [
        (e.payload["interval"], e.payload["points_sent"]) for e in received + rest.events if e.event == "data_chunk"
    ]
    expected = [1, *range(5001, 50_000, 5000), 50_000]  # the last one capped at the limit
    for name in names:
        assert [points for interval, points in sent if interval == name] == expected


async def _async(value: bool) -> bool:
    return value


def _ends(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == "stream end"]


class _RawFollower:
    """A follow stream on a plain socket with small buffers, that reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    async def open(cls, client, token: str, **params: Any) -> _RawFollower:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (client.server.host, client.server.port))
        query = urlencode((params or FOLLOW) | {"token": token})
        request = f"GET {stream_path(JOB)}?{query} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        follower = cls(sock)
        head = b""
        while b"interval_complete" not in head:
            head += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5.0)
        follower._body = head
        return follower

    _body = b""

    async def read_to_end(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        while not self._body.endswith(b"0\r\n\r\n"):  # the chunked body's end
            data = await asyncio.wait_for(loop.sock_recv(self._sock, 1 << 20), 10.0)
            if not data:
                break
            self._body += data
        self._sock.close()
        return self.events()

    def events(self) -> list[Any]:
        """The complete events received so far."""
        return SSEParser().feed(_unchunk(self._body.split(b"\r\n\r\n", 1)[1]), Transcript())

    def cut_off(self) -> bool:
        """Whether the gateway closed this connection; reads what is buffered meanwhile."""
        with contextlib.suppress(BlockingIOError):
            while True:
                try:
                    data = self._sock.recv(1 << 20)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
                self._body += data
        return False


def _unchunk(body: bytes) -> bytes:
    """The payload of a chunked body, up to its end or its last whole chunk (a cut body ends anywhere)."""
    out, at = b"", 0
    while (end := body.find(b"\r\n", at)) != -1:
        size = int(body[at:end], 16)
        if size == 0 or end + 2 + size + 2 > len(body):
            break
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
    return out


async def test_a_bad_point_appended_while_riders_follow_is_one_data_error_and_the_rest_goes_on(
    make_gateway, writer, token
):
    client = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    w = writer(JOB)
    await seed_job(w, counts={"minute": 1, "day": 1})
    readers = await _followers(client, token, 3, intervals="minute,day")
    assert await eventually(lambda: _async(_riders(client) == [3]), 5.0)
    await w.append_raw("minute", [b'{"time": "not a time"}'])  # what a broken worker might write
    for _, next_event in readers:
        error = (await next_events(next_event, 1))[0]
        assert error.event == "error", error
        assert (error.payload["error"], error.payload["interval"]) == ("data_error", "minute")
        assert error.payload["points_sent"] == 1  # the client knows exactly where the interval stopped
    await w.append("day", make_candles(1, first=1))
    for _, next_event in readers:
        chunk = (await next_events(next_event, 1))[0]
        assert (chunk.event, chunk.payload["interval"], chunk.payload["points_sent"]) == ("data_chunk", "day", 2)
