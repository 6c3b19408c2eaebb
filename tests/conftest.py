"""Fixtures: a real Valkey, a real certificate endpoint, real tokens, the real app on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

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
from tests.faults import KillableValkey

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


@pytest.fixture
def make_gateway(aiohttp_client: Any, settings: Settings, redis_client: aioredis.Redis) -> MakeGateway:
    """Start the real app (through its factory) on a free port; returns a real HTTP client."""

    async def make(**sections: dict[str, Any]) -> TestClient:
        # The emulator's client raises for failed queries, as BigQuery does.
        configured = with_overrides(settings, **sections)
        app = create_app(configured, bigquery_client=emulator_client)
        # The runner options of `serve` (its access log among them), not the test server's defaults;
        # the test server sets handler_cancellation itself.
        options = {name: value for name, value in runner_options(configured).items() if name != "handler_cancellation"}
        server = GatewayTestServer(app)
        await server.start_server(**options)
        return await aiohttp_client(server)  # type: ignore[no-any-return]

    return make


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
