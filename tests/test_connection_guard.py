"""The connection guard in the test process: the listener ``serve`` builds, driven with raw sockets.

tests/test_slowloris.py checks the same guard through a ``serve`` process
(floods, the default cap from ``ulimit -n``); here it is built by the
functions ``serve`` uses (``bind``, ``GatewayRunner``, ``guarded_listener``)
on a free port, so that what it does is measured, and its finer points are
checked: the deadline restarted by the next request on a keep-alive
connection, a request line split over packets in the headroom, the refusals
that are not read at all, the counters and the one log line per window.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.config import Settings, with_overrides
from gateway.connections import HEALTH_HEADROOM, RESERVED_FILES, connection_cap
from gateway.devtools.ports import free_port
from gateway.limits import retry_after_seconds
from gateway.runner import GatewayRunner
from gateway.server import bind, guarded_listener, runner_options
from tests.helpers import seed_job, stream_path

HEADER_TIMEOUT_S = 0.6
CAP = 3
RETRY_MS = 2000
STREAM = b"GET /api/sse/backtest/x/data/multi?intervals=day HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Guarded:
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[Guarded]:
    """The gateway's listener as ``serve`` builds it, with a short header deadline and a cap of 3."""
    configured = with_overrides(
        settings, server={"header_timeout_s": HEADER_TIMEOUT_S, "max_connections": CAP, "retry_ms": RETRY_MS}
    )
    runner = GatewayRunner(create_app(configured), **runner_options(configured))
    await runner.setup()
    port = free_port()
    sock = bind("127.0.0.1", port, reuse_port=False, what="port", setting="SERVER_PORT")
    # A small send buffer, inherited by every accepted connection: a client that does not read
    # fills it and the transport's buffer within a few hundred kilobytes (the kernel would autotune it to megabytes).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    listener = await guarded_listener(runner, sock, configured)
    try:
        yield Guarded(port)
    finally:
        listener.close()
        await runner.cleanup()


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_connections_refused_total", {"reason": reason}) or 0.0


def open_now() -> float:
    value = REGISTRY.get_sample_value("gateway_connections_open")
    assert value is not None
    return value


async def answer_then_close(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), timeout_s)


async def one_response(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length body, the connection left open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_unfinished_headers_are_answered_408_at_the_deadline_counted_and_logged_once(guarded, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.connections")
    before = refused("header_timeout")
    connections = [await guarded.connect() for _ in range(3)]
    started = time.monotonic()
    connections[0][1].write(b"GET /healthz HTT")
    connections[1][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    # The first bytes of the end of the headers, but never all of it: the tail across packets is looked at.
    connections[2][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r")
    try:
        answers = await asyncio.gather(*(answer_then_close(reader) for reader, _ in connections))
    finally:
        for _, writer in connections:
            writer.close()
    waited = time.monotonic() - started
    assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for answer in answers), answers
    assert b'"error":"invalid_request"' in answers[0] and b"Connection: close" in answers[0]
    assert HEADER_TIMEOUT_S * 0.9 < waited < HEADER_TIMEOUT_S + 3.0, waited
    assert refused("header_timeout") == before + 3
    # Three cuts inside one window: one line, not one per connection.
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.connections"]
    assert lines == ["closed 1 connection(s) whose request headers took too long (per 10 s)"], lines


async def test_headers_ending_across_packets_are_served_and_not_cut(guarded):
    reader, writer = await guarded.connect()
    try:
        for piece in (b"GET /healthz HTTP/1.1\r\nHost: x\r", b"\n\r", b"\n"):
            writer.write(piece)
            await asyncio.sleep(0.05)
        first = await one_response(reader)
        assert first.startswith(b"HTTP/1.1 200"), first
        # Well past the deadline, the served connection is not answered 408: its deadline ended with its headers.
        await asyncio.sleep(HEADER_TIMEOUT_S + 0.7)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await one_response(reader)
        assert second.startswith(b"HTTP/1.1 200"), second
    finally:
        writer.close()


async def test_the_next_request_on_a_keep_alive_connection_has_its_own_deadline(guarded):
    reader, writer = await guarded.connect()
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await one_response(reader)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(HEADER_TIMEOUT_S + 0.2)  # idle between requests: keepalive_timeout_s's, not this one
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        answer = await answer_then_close(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started > HEADER_TIMEOUT_S * 0.9


async def test_past_the_cap_probes_get_through_the_headroom_and_the_rest_is_503(guarded, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.connections")
    before = refused("at_capacity")
    held = [await guarded.connect() for _ in range(CAP)]  # the cap, taken by connections that send nothing
    try:
        await wait_for(lambda: open_now() >= CAP)
        # In the headroom: a probe, its request line split over two packets, is served...
        reader, writer = await guarded.connect()
        writer.write(b"GET /hea")
        await asyncio.sleep(0.05)
        writer.write(b"lthz?from=probe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await one_response(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        # ...and /readyz too.
        reader, writer = await guarded.connect()
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        ready = await one_response(reader)
        writer.close()
        assert ready.startswith(b"HTTP/1.1 200"), ready
        # A stream in the headroom is answered 503 with Retry-After, JSON, and closed.
        reader, writer = await guarded.connect()
        writer.write(STREAM)
        answer = await answer_then_close(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert f"Retry-After: {retry_after_seconds(RETRY_MS)}\r\n".encode() in answer
        assert b'"error":"unavailable"' in answer
        # A request line that never ends within 8 KiB is not a probe either.
        reader, writer = await guarded.connect()
        writer.write(b"GET /" + b"a" * 9000)
        answer = await answer_then_close(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert refused("at_capacity") == before + 2
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.connections"]
        assert lines == ["refused 1 connection(s): at server.max_connections (per 10 s)"], lines
    finally:
        for _, w in held:
            w.close()


async def test_past_the_headroom_a_connection_is_refused_before_it_sends_a_byte(guarded):
    before = refused("at_capacity")
    held = [await guarded.connect() for _ in range(CAP + HEALTH_HEADROOM)]
    try:
        await wait_for(lambda: open_now() >= CAP + HEALTH_HEADROOM)
        reader, writer = await guarded.connect()
        answer = await answer_then_close(reader)  # nothing written: the answer comes at once
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert refused("at_capacity") == before + 1
    finally:
        for _, w in held:
            w.close()
    # Connections closed are counted out: the gauge returns to zero, and the cap serves again.
    await wait_for(lambda: open_now() == 0)
    reader, writer = await guarded.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await one_response(reader)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_client_that_half_closes_is_closed_and_counted_out(guarded):
    """The client's end of file reaches aiohttp's protocol through the guard, which closes (as aiohttp does alone)."""
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await wait_for(lambda: open_now() == 1)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            received += chunk
    assert received == b""  # closed at the end of file, not at the header deadline's 408
    await wait_for(lambda: open_now() == 0)


async def test_a_client_that_stops_reading_pauses_the_stream_and_resumes_it(guarded, writer, token):
    """aiohttp's flow control (pause_writing, resume_writing) passes through the guard: nothing stalls or is lost."""
    stored = await seed_job(writer("paused-job"), counts={"minute": 6000}, status="completed")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", guarded.port))
    reader, writer_ = await asyncio.open_connection(sock=sock, limit=1 << 22)
    try:
        path = stream_path("paused-job") + f"?intervals=minute&chunk_size=500&limit=50000&token={token()}"
        writer_.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(1.0)  # not reading: the server's buffers fill, aiohttp is told to pause
        body = await asyncio.wait_for(reader.readuntil(b"event: all_complete"), 30)
    finally:
        writer_.close()
    assert body.startswith(b"HTTP/1.1 200"), body[:200]
    assert len(body) > 300_000  # more than the buffers between the handler and this client hold
    assert body.count(b"event: data_chunk") == len(stored["minute"]) // 500


def test_the_cap_is_the_setting_or_sized_from_the_open_file_limit():
    assert connection_cap(7) == 7
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = (1 << 20 if soft == resource.RLIM_INFINITY else soft) - RESERVED_FILES - HEALTH_HEADROOM
    assert connection_cap(0) == max(1, expected)
