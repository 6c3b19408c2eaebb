"""nginx (issue 9.4): the real nginx in front of two real replicas.

tests/nginx.conf is deploy/nginx.conf (the template operators fill in) with
loopback addresses and /tmp paths; a test holds its `location /api/sse/`
block and log format to the template's, so what runs here is what ships.

Skipped where nginx is not installed, except in CI (env ``CI`` set), where
``.ci/run`` installs it and its absence is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from datetime import timedelta

import aiohttp
import pytest

from gateway.devtools.ports import free_port
from gateway.workers import candle
from tests.conftest import PROJECT
from tests.helpers import START, expected_points, make_candles, seed_job, stream_path
from tests.replicas import REPO, Replica, ResumingClient, replica_env, wait_for_port
from tests.sse_client import SSEParser, Transcript

_FOUND = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
TEMPLATE = REPO / "deploy" / "nginx.conf"
SHIPPED = REPO / "tests" / "nginx.conf"  # the fixture: the template on loopback addresses
GRACE_S = 1.0

if _FOUND is None:
    if os.environ.get("CI"):
        raise RuntimeError("nginx is not installed; .ci/run installs it (apt-get install nginx)")
    pytest.skip("nginx is not installed (it is in CI)", allow_module_level=True)
NGINX: str = _FOUND or "nginx"


@pytest.mark.parametrize("path", [SHIPPED, TEMPLATE], ids=["fixture", "template"])
def test_shipped_config_passes_nginx_t(path, tmp_path):
    # The template's own paths are a system nginx's; `-t` opens its logs, so they go to tmp_path here.
    text = path.read_text().replace("/var/log/nginx/", f"{tmp_path}/").replace("/run/nginx.pid", f"{tmp_path}/pid")
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    result = subprocess.run(
        [NGINX, "-t", "-c", str(config), "-e", "/dev/stderr"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def block(text: str, opening: str) -> str:
    """The text of the brace block that starts with ``opening``, up to its closing brace."""
    start = text.index(opening)
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if text[end] == "}" and depth == 0:
            return text[start : end + 1]
    raise AssertionError(f"no end of {opening!r}")


def test_fixture_runs_the_templates_location_and_log_format():
    template, fixture = TEMPLATE.read_text(), SHIPPED.read_text()
    assert block(fixture, "location /api/sse/ {") == block(template, "location /api/sse/ {")
    assert block(fixture, "location / {") == block(template, "location / {")
    log_format = template[template.index("log_format candle") : template.index(";", template.index("log_format"))]
    assert log_format in fixture
    assert "127.0.0.1" not in template and "/tmp" not in template


def site_config(tmp_path, listen: int, upstreams: list[int]) -> str:
    """The shipped file, with this test's ports and a private temp directory; nothing else changed."""
    text = SHIPPED.read_text().replace("/tmp/candle-gateway-nginx", str(tmp_path / "nginx"))
    text = text.replace("listen 127.0.0.1:8088;", f"listen 127.0.0.1:{listen};")
    servers = "".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;\n" for port in upstreams)
    text, count = re.subn(r"(        server 127\.0\.0\.1:\d+ .*;\n)+", servers, text)
    assert count == 1
    return text


@pytest.fixture
async def site(redis_url, cert_endpoint, tmp_path):
    """nginx on a free port before replicas a and b; yields (nginx base URL, [a, b], nginx's log path)."""
    env = replica_env(redis_url, cert_endpoint.url, PROJECT, GATEWAY_SERVER_SHUTDOWN_GRACE_S=str(GRACE_S))
    replicas = [Replica(name, tmp_path, env) for name in ("a", "b")]
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(site_config(tmp_path, port, [r.port for r in replicas]))
    log = tmp_path / "nginx.log"
    nginx = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        with log.open("wb") as out:
            nginx = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [NGINX, "-c", str(config), "-e", "/dev/stderr", "-g", "daemon off;"], stdout=out, stderr=out
            )
        await wait_for_port(port, nginx)
        yield f"http://127.0.0.1:{port}", replicas, log
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        for replica in replicas:
            replica.stop()


def assert_no_token(text: str, jwt: str) -> None:
    header, payload, signature = jwt.split(".")
    for secret in (jwt, signature, payload[:40]):
        assert secret not in text, f"{secret[:12]}... in nginx's log"


async def follow_latencies(
    session, url: str, query, appended_at: dict[int, float], ready: asyncio.Event, out: list, coding: str = "identity"
):
    async with session.get(url, params=query, headers={"Accept-Encoding": coding}) as response:
        assert response.status == 200
        # The gateway's coding, passed through (nginx's own gzip is off for the location).
        assert response.headers.get("Content-Encoding", "identity") == coding
        parser, transcript = SSEParser(), Transcript()
        seen = 1
        async for chunk in response.content.iter_any():
            received = time.perf_counter()
            for event in parser.feed(chunk, transcript):
                if event.event == "interval_complete":
                    ready.set()
                if event.event == "data_chunk" and "interval_complete" in transcript.names:
                    sent = event.payload["points_sent"]
                    out.extend(received - appended_at[n] for n in range(seen + 1, sent + 1))
                    seen = sent
                if event.event == "all_complete":
                    return


@pytest.mark.parametrize("coding", ["identity", "gzip", "zstd"])
async def test_events_arrive_unbuffered_through_nginx(site, writer, token, coding):
    """Each live event arrives on its own through nginx, compressed by the gateway (issue 22) or not."""
    base, (a, _), _ = site
    w = writer("nginx-live")
    await seed_job(w, counts={"day": 1})
    query = {"intervals": "day", "follow": "true", "token": token()}
    appended_at: dict[int, float] = {}
    direct: list[float] = []
    proxied: list[float] = []
    ready = [asyncio.Event(), asyncio.Event()]
    async with aiohttp.ClientSession() as session:
        readers = [
            asyncio.create_task(follow_latencies(session, a.base + stream_path("nginx-live"), query, appended_at,
                                                 ready[0], direct, coding)),
            asyncio.create_task(follow_latencies(session, base + stream_path("nginx-live"), query, appended_at,
                                                 ready[1], proxied, coding)),
        ]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
        await asyncio.sleep(0.3)
        appends = 40
        for n in range(appends):
            appended_at[n + 2] = time.perf_counter()
            await w.append("day", [candle(START + timedelta(days=n + 1), 1.0, 2.0, 0.5, 1.5, 10)])
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.3)
        await w.update(status="completed")
        await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert len(direct) == len(proxied) == appends

    def p95(values: list[float]) -> float:
        return sorted(values)[int(0.95 * (len(values) - 1))]

    # Buffering would hold events for seconds (or until 4-8 KiB piled up); a few ms is the proxy hop.
    assert p95(proxied) <= p95(direct) + 0.010, (p95(direct), p95(proxied))


async def test_resume_with_last_event_id_through_nginx(site, writer, token):
    base, _, log = site
    stored = await seed_job(writer("nginx-resume"), counts={"minute": 900}, status="completed")
    jwt = token()
    query = {"intervals": "minute", "chunk_size": "100", "token": jwt}
    async with aiohttp.ClientSession() as session:
        async with session.get(base + stream_path("nginx-resume"), params=query) as first:
            parser, head = SSEParser(), Transcript()
            async for chunk in first.content.iter_any():
                parser.feed(chunk, head)
                if len(head.named("data_chunk")) >= 3:
                    break
        # The client stops after the third data_chunk, wherever its read ended (one read
        # may carry the whole short stream): everything after it is what the resume sends.
        third = [index for index, event in enumerate(head.events) if event.event == "data_chunk"][2]
        head.events = head.events[: third + 1]
        last_id = head.events[-1].id
        async with session.get(
            base + stream_path("nginx-resume"), params=query, headers={"Last-Event-ID": str(last_id)}
        ) as rest_response:
            assert rest_response.status == 200
            parser, rest = SSEParser(), Transcript()
            async for chunk in rest_response.content.iter_any():
                parser.feed(chunk, rest)
    points = [p for t in (head, rest) for e in t.named("data_chunk") for p in e.payload["data_points"]]
    assert rest.names[-1] == "all_complete"
    assert points == expected_points(stored["minute"])
    await asyncio.sleep(0.2)
    text = log.read_text()
    assert "/api/sse/backtest/nginx-resume/data/multi" in text
    assert_no_token(text, jwt)


async def test_replica_stopped_during_twenty_streams_loses_no_client_through_nginx(site, writer, token):
    base, (a, _), log = site
    w = writer("nginx-drain")
    stored = await seed_job(w, counts={"minute": 300})
    candles = stored["minute"]
    jwt = token()
    query = {"intervals": "minute", "follow": "true", "chunk_size": "9", "limit": "50000", "token": jwt}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [ResumingClient(session, [base], stream_path("nginx-drain"), query) for _ in range(20)]
        runs = [asyncio.create_task(c.run()) for c in clients]
        await asyncio.wait_for(asyncio.gather(*(c.first_events.wait() for c in clients)), 20)
        for n in range(5):
            batch = make_candles(3, first=len(candles))
            await w.append("minute", batch)
            candles.extend(batch)
            await asyncio.sleep(0.02 * n)
        a.terminate()
        for _ in range(10):  # appends go on during the drain and after it
            batch = make_candles(3, first=len(candles))
            await w.append("minute", batch)
            candles.extend(batch)
            await asyncio.sleep(0.2)
        assert await a.wait() <= GRACE_S + 1.0
        for _ in range(500):
            if all(len(c.points()) == len(candles) for c in clients):
                break
            await asyncio.sleep(0.02)
        await w.update(status="completed")
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    expected = expected_points(candles)
    wrong = [(i, c.connections, len(c.points())) for i, c in enumerate(clients) if c.points() != expected]
    assert not wrong, f"(client, connections, points) of {len(expected)}: {wrong}"
    assert all(c.events[-1].event == "all_complete" for c in clients)
    assert any(c.connections >= 2 for c in clients), "some streams were on the stopped replica"
    assert all(c.refusals == 0 for c in clients), "nginx hid the stopped replica from every reconnect"
    await asyncio.sleep(0.2)
    assert_no_token(log.read_text(), jwt)
