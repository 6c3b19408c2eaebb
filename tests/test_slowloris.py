"""Slow and idle connections cannot take the port (issue 20, item 6): a real ``serve``, raw sockets.

- a request whose headers do not complete within ``server.header_timeout_s``
  (never finished, or trickled a byte at a time) is answered 408 and closed;
- an idle keep-alive connection is closed after ``server.keepalive_timeout_s``;
- past ``server.max_connections`` a connection is answered 503 with
  ``Retry-After`` and closed, while ``/healthz`` still answers (headroom);
- a log line and ``gateway_connections_refused_total{reason}`` say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from gateway.connections import HEALTH_HEADROOM
from tests.conftest import PROJECT
from tests.faults import eventually
from tests.replicas import Replica, replica_env

HEADER_TIMEOUT_S = 1.0


async def _start(tmp_path, redis_url, cert_endpoint, name: str, **settings: str) -> Replica:
    defaults = {"GATEWAY_SERVER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "GATEWAY_SERVER_KEEPALIVE_TIMEOUT_S": "3"}
    env = replica_env(redis_url, cert_endpoint.url, PROJECT, **{**defaults, **settings})
    return await Replica(name, tmp_path, env).start()


async def _closed_after(reader: asyncio.StreamReader, timeout_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), timeout_s)
    return time.monotonic() - started, answer


async def _metric(replica: Replica, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def _healthz(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status


@pytest.fixture
async def replica(tmp_path, redis_url, cert_endpoint):
    running = await _start(tmp_path, redis_url, cert_endpoint, "slow")
    yield running
    running.stop()


async def test_a_slow_second_request_cut_at_the_header_deadline_is_not_counted_as_a_keep_alive_close(replica):
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)

    async def trickle() -> None:  # the second request's headers, never ended, until the server closes
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.2)
                writer.write(b"X-A: b\r\n")

    trickler = None
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        trickler = asyncio.create_task(trickle())
        _, answer = await _closed_after(reader, 10)  # the 408 and the server's FIN
        assert answer.startswith(b"HTTP/1.1 408"), answer
        open_before = await _metric(replica, "gateway_connections_open")

        # Closed after the lingering (LINGER_S), past 0.9 x keepalive_timeout_s since the first answer.
        async def closed() -> bool:
            return await _metric(replica, "gateway_connections_open") == open_before - 1

        assert await eventually(closed, 10.0)
    finally:
        if trickler is not None:
            trickler.cancel()
        writer.close()
    assert await _metric(replica, "gateway_connections_refused_total", reason="header_timeout") == 1
    assert await _metric(replica, "gateway_connections_refused_total", reason="keepalive_timeout") == 0


@pytest.mark.parametrize("how", ["partial_request_line", "headers_never_end", "trickle", "trickle_read_late"])
async def test_headers_that_take_too_long_are_cut_at_the_deadline(replica, how):
    connections = [await asyncio.open_connection("127.0.0.1", replica.port) for _ in range(20)]
    started = time.monotonic()
    for _, writer in connections:
        writer.write(b"GET /healthz HTT" if how == "partial_request_line" else b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                await asyncio.sleep(0.2)
                writer.write(b"X-A: b\r\n")

    tricklers = [asyncio.create_task(trickle(w)) for _, w in connections] if how.startswith("trickle") else []
    try:
        if how == "trickle_read_late":
            # The client is still sending when the 408 comes and reads it only later: a server that
            # closed at once answers those bytes with a reset, which throws the unread 408 away.
            await asyncio.sleep(HEADER_TIMEOUT_S + 1.0)
        answers = await asyncio.gather(*(_closed_after(reader, 10) for reader, _ in connections))
    finally:
        for task in tricklers:
            task.cancel()
        for _, writer in connections:
            writer.close()
    waited = time.monotonic() - started
    assert waited < HEADER_TIMEOUT_S + 2.0, waited
    assert all(answer.startswith(b"HTTP/1.1 408") for _, answer in answers), answers[0]
    assert await _metric(replica, "gateway_connections_refused_total", reason="header_timeout") >= 20

    async def logged() -> bool:  # another process's log: waited for, not slept on
        return "whose request headers took too long" in replica.log()

    assert await eventually(logged, 10.0)


async def test_an_idle_keep_alive_connection_is_closed(replica):
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        waited, rest = await _closed_after(reader, 20)
    finally:
        writer.close()
    assert rest == b""
    # keepalive_timeout_s = 3 (aiohttp's default was an hour): the upper bound leaves a loaded
    # machine room and still tells the setting from the default.
    assert 2.0 < waited < 15.0, waited

    # Counted as the server's side of the connection goes; logged by another process: waited for, not slept on.
    async def counted() -> bool:
        return await _metric(replica, "gateway_connections_refused_total", reason="keepalive_timeout") == 1

    async def logged() -> bool:
        return "idle keep-alive connection(s) at server.keepalive_timeout_s" in replica.log()

    assert await eventually(counted, 10.0)
    assert await eventually(logged, 10.0)


async def test_closes_that_are_not_the_keep_alive_timeout_are_not_counted_as_one(replica):
    open_before = await _metric(replica, "gateway_connections_open")
    # The client closes its own idle connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    # HTTP/1.0: the server closes as the answer ends.
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    _, answer = await _closed_after(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 200"), answer

    async def both_gone() -> bool:  # the server saw both closes: any count they made is in by now
        return await _metric(replica, "gateway_connections_open") == open_before

    assert await eventually(both_gone, 10.0)
    assert await _metric(replica, "gateway_connections_refused_total", reason="keepalive_timeout") == 0


async def test_past_the_connection_cap_the_answer_is_503_and_health_checks_still_answer(
    tmp_path, redis_url, cert_endpoint
):
    cap = 200
    replica = await _start(
        tmp_path,
        redis_url,
        cert_endpoint,
        "capped",
        GATEWAY_SERVER_MAX_CONNECTIONS=str(cap),
        GATEWAY_SERVER_HEADER_TIMEOUT_S="30",
    )
    held = []
    try:
        # The cap and its health headroom, all taken by connections that never send a byte.
        for _ in range(cap + HEALTH_HEADROOM - 2):
            held.append(await asyncio.open_connection("127.0.0.1", replica.port))
        await asyncio.sleep(0.3)
        assert await _healthz(replica.port) == 200  # from the headroom
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        writer.write(b"GET /api/sse/backtest/x/data/multi?intervals=day HTTP/1.1\r\nHost: x\r\n\r\n")
        _, answer = await _closed_after(reader, 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"Retry-After: 1" in answer and b'"error":"unavailable"' in answer
        for _ in range(5):  # past the headroom too: refused at once, without reading
            held.append(await asyncio.open_connection("127.0.0.1", replica.port))
        _, answer = await _closed_after(held[-1][0], 5)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert await _metric(replica, "gateway_connections_refused_total", reason="at_capacity") >= 2
        # Connections freed are connections served again.
        for _, w in held:
            w.close()
        held.clear()

        async def freed() -> bool:  # the server saw the closes (when, depends on the machine's load)
            return await _metric(replica, "gateway_connections_open") <= 2

        async def logged() -> bool:
            return "refused 1 connection(s): at server.max_connections" in replica.log()

        assert await eventually(freed, 10.0)
        assert await _healthz(replica.port) == 200
        assert await eventually(logged, 10.0)
    finally:
        for _, w in held:
            w.close()
        replica.stop()


async def test_a_flood_of_slow_connections_sized_from_the_open_file_limit(tmp_path, redis_url, cert_endpoint):
    """The cap's default comes from ``ulimit -n``: 4,000 files here, so 3,456 connections and 32 for probes.

    3,700 connections that never finish their headers: the process keeps
    answering ``/healthz``, refuses the rest politely instead of running out
    of descriptors, and cuts them all at the header deadline.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4000, hard))  # the child inherits it
    try:
        replica = await _start(
            tmp_path,
            redis_url,
            cert_endpoint,
            "flood",
            GATEWAY_SERVER_HEADER_TIMEOUT_S="8",
            GATEWAY_SERVER_KEEPALIVE_TIMEOUT_S="30",
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(3700):
            reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
            writer.write(b"GET /api/sse/backtest/x/data/multi?intervals=day HTTP/1.1\r\nHost: x\r\n")
            held.append((reader, writer))
        assert await _healthz(replica.port) == 200
        answers = await asyncio.gather(*(_closed_after(reader, 20) for reader, _ in held))
        statuses = [answer[:12] for _, answer in answers]
        assert statuses.count(b"HTTP/1.1 408") >= 3400, set(statuses)
        assert statuses.count(b"HTTP/1.1 503") >= 200, set(statuses)
        assert set(statuses) <= {b"HTTP/1.1 408", b"HTTP/1.1 503"}
        assert await _healthz(replica.port) == 200
        log = replica.log()
        assert "at most 3456 client connections" in log
        assert "Too many open files" not in log
    finally:
        for _, writer in held:
            writer.close()
        replica.stop()
