"""Contract tests of what the response (sse.py) relies on in aiohttp and aiohttp-sse: an upgrade that changes it fails here.

Each test runs a real aiohttp server with ``CandleEventResponse`` and reads
its raw bytes from a plain socket: header and first-event order, chunk
framing (HTTP/1.1) and a plain body closed at the end (HTTP/1.0),
``output_size`` accounting, no write after the end on a kept-alive
connection, and aiohttp-sse's ``TCP_USER_TIMEOUT`` and keep-alive as the
response sets them. The send timeout's cut is tested end to end in
``test_outcomes.py`` and ``test_hub.py``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.internals.aiohttp import SharedBody, write_at_once
from gateway.sse import CandleEventResponse, Delivery

FIRST = b"id: 1\nevent: a\ndata: {}\nretry: 3000\n\n"
SECOND = b"id: 2\nevent: b\ndata: {}\n\n"

Handler = Callable[[web.Request, CandleEventResponse, dict[str, Any]], Awaitable[None]]


async def _serve(aiohttp_server, handler: Handler, seen: dict[str, Any], send_timeout: float = 5.0):
    async def handle(request: web.Request) -> web.StreamResponse:
        response = CandleEventResponse(ping_interval=60.0, send_timeout=send_timeout)
        await response.prepare(request)
        try:
            await handler(request, response, seen)
        finally:
            response.stop_streaming()
        return response

    app = web.Application()
    app.router.add_get("/", handle)
    return await aiohttp_server(app)


async def _request(server, head: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (server.host, server.port))
    await loop.sock_sendall(sock, head)
    return sock


async def _read_until(sock: socket.socket, end: bytes, wait_s: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while not data.endswith(end):
        more = await asyncio.wait_for(loop.sock_recv(sock, 65536), wait_s)
        if not more:
            break
        data += more
    return data


async def test_the_headers_leave_with_the_first_event_in_one_write(aiohttp_server):
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await asyncio.sleep(0.3)  # the client's first read sees only what the first write sent
        await response.send_frame(SECOND)
        await response.write_eof()

    server = await _serve(aiohttp_server, handler, {})
    sock = await _request(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.15)
    first = sock.recv(65536)
    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: text/event-stream" in head
    assert body == b"%x\r\n%b\r\n" % (len(FIRST), FIRST)  # the headers, then exactly the first event's chunk
    rest = await _read_until(sock, b"0\r\n\r\n")
    assert rest == b"%x\r\n%b\r\n0\r\n\r\n" % (len(SECOND), SECOND)
    sock.close()


async def test_http_1_1_is_chunked_and_output_size_counts_every_byte_on_the_wire(aiohttp_server):
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await asyncio.sleep(0)  # the first (with the headers) is out
        await asyncio.sleep(0)
        writer = request.writer
        before = writer.output_size
        assert response.write_frames([SECOND, SECOND], 2 * len(SECOND)) is Delivery.SENT
        seen["counted"] = writer.output_size - before
        await response.write_eof()

    seen: dict[str, Any] = {}
    server = await _serve(aiohttp_server, handler, seen)
    sock = await _request(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    body = (await _read_until(sock, b"0\r\n\r\n")).partition(b"\r\n\r\n")[2]
    two = SECOND * 2
    framed = b"%x\r\n%b\r\n" % (len(two), two)
    assert body == b"%x\r\n%b\r\n" % (len(FIRST), FIRST) + framed + b"0\r\n\r\n"
    assert seen["counted"] == len(framed)
    sock.close()


async def test_http_1_0_gets_a_plain_body_closed_at_its_end(aiohttp_server):
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        writer = request.writer
        before = writer.output_size
        response.write_frames([SECOND], len(SECOND))
        seen["counted"] = writer.output_size - before
        await response.write_eof()

    seen: dict[str, Any] = {}
    server = await _serve(aiohttp_server, handler, seen)
    sock = await _request(server, b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
    data = await _read_until(sock, b"\x00never")  # until the server closes the connection
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Transfer-Encoding" not in head
    assert body == FIRST + SECOND
    assert seen["counted"] == len(SECOND)
    sock.close()


async def test_nothing_is_written_after_the_end_of_a_response_on_a_kept_alive_connection(aiohttp_server):
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await response.write_eof()
        # A late write (a heartbeat's ping, a hub's frames) must not reach the next response.
        seen.setdefault("late", []).append(response.write_frames([b": ping\n\n"], 8))

    seen: dict[str, Any] = {}
    server = await _serve(aiohttp_server, handler, seen)
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    sock = await _request(server, request)
    first = await _read_until(sock, b"0\r\n\r\n")
    await asyncio.get_running_loop().sock_sendall(sock, request)  # the same connection, kept alive
    second = await _read_until(sock, b"0\r\n\r\n")
    assert seen["late"] == [Delivery.GONE, Delivery.GONE]
    for response in (first, second):
        assert response.startswith(b"HTTP/1.1 200") and b": ping" not in response
        assert response.partition(b"\r\n\r\n")[2] == b"%x\r\n%b\r\n0\r\n\r\n" % (len(FIRST), FIRST)
    sock.close()


async def test_aiohttp_sse_sets_the_kernels_timeout_past_the_send_timeout_and_its_ping_stays_silent(aiohttp_server):
    async def handler(request, response, seen):
        sock = request.transport.get_extra_info("socket")
        seen["user_timeout_ms"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        await response.send_frame(FIRST)
        waiting = asyncio.ensure_future(response.wait())
        await asyncio.sleep(0.2)
        seen["waiting_before_stop"] = not waiting.done()
        response.stop_streaming()  # aiohttp-sse's public end of its keep-alive
        await asyncio.wait_for(waiting, 1.0)
        await response.write_eof()

    seen: dict[str, Any] = {}
    server = await _serve(aiohttp_server, handler, seen, send_timeout=1.5)
    sock = await _request(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = await _read_until(sock, b"0\r\n\r\n")
    assert seen["user_timeout_ms"] == 3000  # 2 x send_timeout: the heartbeat's cut comes first
    assert seen["waiting_before_stop"]
    assert b": ping" not in data  # aiohttp-sse's own ping loop never wrote
    sock.close()


async def test_write_at_once_runs_aiohttps_write_to_completion_and_refuses_other_writers():
    class NotAStreamWriter:
        async def write(self, data: bytes, *, drain: bool = True) -> None:
            await asyncio.sleep(0)

    try:
        write_at_once(NotAStreamWriter(), b"x")  # type: ignore[arg-type]
    except TypeError as exc:
        assert "StreamWriter" in str(exc)
    else:
        raise AssertionError("a writer other than aiohttp's was accepted")


async def test_a_shared_body_goes_out_as_write_body_would_send_it_on_http_1_1_and_1_0(aiohttp_server):
    # The hub frames a look's chunk once for every follower (SharedBody): the bytes on each
    # wire and aiohttp's output_size must be exactly what write_frames gives one of them.
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        writer = request.writer
        before = writer.output_size
        assert response.write_shared(SharedBody(SECOND)) is Delivery.SENT
        seen["counted"] = writer.output_size - before
        await response.write_eof()

    for version, expected in (
        (b"1.1", b"%x\r\n%b\r\n" % (len(SECOND), SECOND)),
        (b"1.0", SECOND),
    ):
        seen: dict[str, Any] = {}
        server = await _serve(aiohttp_server, handler, seen)
        sock = await _request(server, b"GET / HTTP/%b\r\nHost: t\r\n\r\n" % version)
        data = await _read_until(sock, b"0\r\n\r\n" if version == b"1.1" else b"\x00never")
        body = data.partition(b"\r\n\r\n")[2]
        first = b"%x\r\n%b\r\n" % (len(FIRST), FIRST) if version == b"1.1" else FIRST
        end = b"0\r\n\r\n" if version == b"1.1" else b""
        assert body == first + expected + end
        assert seen["counted"] == len(expected)
        sock.close()


async def test_a_shared_body_to_a_closed_response_is_not_written(aiohttp_server):
    async def handler(request, response, seen):
        await response.send_frame(FIRST)
        await response.write_eof()
        seen["delivery"] = response.write_shared(SharedBody(SECOND))

    seen: dict[str, Any] = {}
    server = await _serve(aiohttp_server, handler, seen)
    sock = await _request(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = await _read_until(sock, b"0\r\n\r\n")
    assert data.partition(b"\r\n\r\n")[2] == b"%x\r\n%b\r\n0\r\n\r\n" % (len(FIRST), FIRST)
    assert seen["delivery"] is Delivery.GONE
    sock.close()
