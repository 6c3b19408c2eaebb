"""HTTP/1.0 clients (issue 20, item 10): a stream framed for HTTP/1.0, never chunked, closed at its end.

Raw sockets, so that the bytes are what the server sent: an HTTP/1.0 request
(with and without ``Connection: keep-alive``, as nginx sends without
``proxy_http_version 1.1``) gets a body of bare SSE events, no chunk-size
lines, and the server closes the connection after ``all_complete``; an
HTTP/1.1 request on the same server still gets chunked framing.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import make_candles, seed_job, stream_path
from tests.sse_client import SSEParser, Transcript

JOB = "http10-job"


async def _exchange(port: int, request: bytes, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (it must, within ``timeout_s``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def _request(version: str, token: str, *extra: str, follow: bool = False) -> bytes:
    query = f"intervals=day,minute&chunk_size=7{'&follow=true' if follow else ''}"
    lines = [f"GET {stream_path(JOB)}?{query} HTTP/{version}", "Host: x", f"Authorization: Bearer {token}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_an_http_10_stream_is_unchunked_and_closed_at_its_end(client, writer, token, keep_alive):
    await seed_job(writer(JOB), counts={"day": 20, "minute": 30}, status="completed")
    extra = ("Connection: keep-alive",) if keep_alive else ()
    answer = await _exchange(client.server.port, _request("1.0", token(), *extra))
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    assert status_line.startswith("HTTP/1.0 200") or status_line.startswith("HTTP/1.1 200"), status_line
    assert "transfer-encoding" not in headers
    assert headers.get("connection", "close").lower() == "close"
    # The body is SSE events as they are: every line a field, a comment or blank, no chunk sizes.
    for line in body.split(b"\n"):
        assert line == b"" or line.startswith((b"event:", b"data:", b"id:", b"retry:", b":")), line[:80]
    transcript = Transcript()
    SSEParser().feed(body, transcript)
    assert transcript.names[-1] == "all_complete"
    assert sum(len(e.payload["data_points"]) for e in transcript.named("data_chunk")) == 50


async def test_an_http_11_stream_on_the_same_server_is_still_chunked(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 20, "minute": 30}, status="completed")
    answer = await _exchange(client.server.port, _request("1.1", token(), "Connection: close"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")


async def test_http_10_follow_streams_are_unchunked_while_live_beside_an_http_11_one(client, writer, token):
    """Three followers of one job share its reads (and a cohort's writes): each framed for its own version."""
    await seed_job(writer(JOB), counts={"day": 20, "minute": 30})
    versions = ["1.0", "1.0", "1.1"]
    connections = [await asyncio.open_connection("127.0.0.1", client.server.port) for _ in versions]
    received = [b""] * len(versions)

    async def read_until(index: int, marker: bytes, count: int = 1) -> None:
        reader = connections[index][0]
        while received[index].count(marker) < count:
            received[index] += await asyncio.wait_for(reader.read(65536), 10)

    try:
        for (_, conn), version in zip(connections, versions, strict=True):
            conn.write(_request(version, token(), follow=True))
        for index in range(len(versions)):
            await read_until(index, b"event: interval_complete", 2)
        await writer(JOB).append("minute", make_candles(3, first=30))
        for index in range(len(versions)):
            await read_until(index, b'"points_sent":33')
        await writer(JOB).update(status="completed")
        for index in range(len(versions)):
            await read_until(index, b"event: all_complete")
            if versions[index] == "1.0":  # and the server closes it
                received[index] += await asyncio.wait_for(connections[index][0].read(), 10)
    finally:
        for _, conn in connections:
            conn.close()
    for version, answer in zip(versions, received, strict=True):
        head, _, body = answer.partition(b"\r\n\r\n")
        if version == "1.1":
            assert b"Transfer-Encoding: chunked" in head
            continue
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        for line in body.split(b"\n"):
            assert line == b"" or line.startswith((b"event:", b"data:", b"id:", b"retry:", b":")), line[:80]
        assert b"event: all_complete" in body
