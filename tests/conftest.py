"""Fixtures: a real Valkey, a real certificate endpoint, real tokens, the real app on a real port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.cloud import bigquery

from gateway.app import create_app
from gateway.config import Settings, load_settings, with_overrides
from gateway.devtools.bigquery_emulator import BigQueryEmulator, create_warehouse, emulator_client, loading_client
from gateway.devtools.bigquery_proxy import CountingProxy
from gateway.devtools.dev_auth import CertificateEndpoint, DevSigningKey, mint_token
from gateway.devtools.embedded_redis import EmbeddedRedis
from gateway.runner import GatewayRunner
from gateway.server import runner_options
from gateway.workers import JobWriter
from tests.faults import FaultProxy, KillableValkey

PROJECT = "test-candles"
DATASET = "backtests"

MakeGateway = Callable[..., Awaitable[TestClient]]


class GatewayTestServer(TestServer):
    """aiohttp's test server on the runner ``serve`` uses (its connections answer aiohttp's own errors in JSON)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[KillableValkey]:
    """A Valkey of the test's own, to kill, restart or stop (tests/faults.py)."""
    server = KillableValkey(tmp_path / "valkey")
    await server.start()
    yield server
    server.close()


@pytest.fixture
async def proxy(valkey: KillableValkey) -> AsyncIterator[FaultProxy]:
    """A TCP proxy before the test's Valkey that can reset or black-hole every connection (tests/faults.py)."""
    running = await FaultProxy(valkey.port).start()
    yield running
    await running.close()


@pytest.fixture
async def direct(valkey: KillableValkey) -> AsyncIterator[aioredis.Redis]:
    """A client straight to the test's Valkey, past any proxy."""
    client = aioredis.Redis.from_url(valkey.url)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    """One real BigQuery emulator (bqemulator) for the whole session, its tables created."""
    with BigQueryEmulator(tmp_path_factory.mktemp("bqemulator"), project=PROJECT) as running:
        create_warehouse(loading_client(PROJECT, running.endpoint), DATASET)
        yield running


@pytest.fixture
async def bq_proxy(emulator: BigQueryEmulator) -> AsyncIterator[CountingProxy]:
    """A counting proxy in front of the emulator (gateway/devtools/bigquery_proxy.py): every BigQuery request."""
    proxy = CountingProxy(emulator.endpoint)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="session")
def bq(emulator: BigQueryEmulator) -> bigquery.Client:
    """The client tests load rows with."""
    return loading_client(PROJECT, emulator.endpoint)


@pytest.fixture(scope="session")
def signing_key() -> DevSigningKey:
    return DevSigningKey.generate()


@pytest.fixture
async def cert_endpoint(aiohttp_server: Any, signing_key: DevSigningKey) -> CertificateEndpoint:
    endpoint = CertificateEndpoint([signing_key], max_age_s=3600)
    server = await aiohttp_server(endpoint.app())
    endpoint.url = str(server.make_url("/certs"))  # type: ignore[attr-defined]
    return endpoint


@pytest.fixture
def settings(redis_url: str, cert_endpoint: CertificateEndpoint, tmp_path: Path) -> Settings:
    return with_overrides(
        load_settings(environ={}),
        redis={"url": redis_url},
        auth={"certs_url": cert_endpoint.url, "firebase_project_id": PROJECT},  # type: ignore[attr-defined]
        dev={"state_dir": str(tmp_path / "dev")},
    )


# The content codings a stream test may run under (issue 22): the core stream
# modules run every test under each (``pytestmark = CODINGS``), the rest as identity.
CODINGS = pytest.mark.parametrize("accept_encoding", ["identity", "gzip", "zstd"], indirect=True)


@pytest.fixture
def accept_encoding(request: pytest.FixtureRequest) -> Iterator[str]:
    """The ``Accept-Encoding`` the test client sends (identity unless a module runs under ``CODINGS``).

    aiohttp's client decodes gzip and zstd itself (zlib, backports.zstd), so a
    test reads the same events whatever the coding; the check after the test
    is that each stream really came in the coding asked for.
    ``TEST_ACCEPT_ENCODING=zstd make test`` runs every other test under a coding too.
    """
    coding: str = getattr(request, "param", os.environ.get("TEST_ACCEPT_ENCODING", "identity"))
    yield coding


def coding_check(compressing: bool, wrong: list[str]) -> aiohttp.TraceConfig:
    """A client trace noting every stream that asked for one coding and came in another (or without Vary)."""
    trace = aiohttp.TraceConfig()

    async def on_request_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        headers = params.response.headers
        asked = params.headers.get("Accept-Encoding")
        if headers.get("Content-Type") != "text/event-stream" or asked not in ("identity", "gzip", "zstd"):
            return  # a test that asks for something else checks what it gets itself
        coding = asked if compressing else "identity"
        got = headers.get("Content-Encoding", "identity")
        if got != coding or "Accept-Encoding" not in headers.get("Vary", ""):
            wrong.append(f"{params.url}: asked {coding}, got {got} (Vary: {headers.get('Vary')})")

    trace.on_request_end.append(on_request_end)
    return trace


@pytest.fixture
def make_gateway(
    aiohttp_client: Any, settings: Settings, redis_client: aioredis.Redis, accept_encoding: str
) -> Iterator[MakeGateway]:
    """Start the real app (through its factory) on a free port; returns a real HTTP client."""
    wrong: list[str] = []

    async def make(**sections: dict[str, Any]) -> TestClient:
        # The emulator's client raises for failed queries, as BigQuery does.
        configured = with_overrides(settings, **sections)
        app = create_app(configured, bigquery_client=emulator_client)
        # The runner options of `serve` (its access log among them), not the test server's defaults;
        # the test server sets handler_cancellation itself.
        options = {name: value for name, value in runner_options(configured).items() if name != "handler_cancellation"}
        server = GatewayTestServer(app)
        await server.start_server(**options)
        # Streams come in the coding the test runs under (unless this gateway turned compression off).
        compressing = configured.compression.codecs.strip() not in ("", "identity")
        return await aiohttp_client(  # type: ignore[no-any-return]
            server,
            headers={"Accept-Encoding": accept_encoding},
            trace_configs=[coding_check(compressing, wrong)],
        )

    yield make
    assert not wrong, wrong


@pytest.fixture
async def client(make_gateway: MakeGateway) -> TestClient:
    return await make_gateway()


@pytest.fixture
def token(signing_key: DevSigningKey) -> Callable[..., str]:
    def mint(uid: str = "alice", **options: Any) -> str:
        return mint_token(signing_key, PROJECT, uid, **options)

    return mint


@pytest.fixture
def writer(redis_client: aioredis.Redis) -> Callable[[str], JobWriter]:
    return lambda job_id: JobWriter(redis_client, job_id)
