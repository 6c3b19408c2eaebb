"""``make run``: the gateway on embedded stores, a demo job written live, and a ready token.

Everything here is development-only: a Valkey server when ``redis.url`` is
empty, a local signing key whose certificate a local endpoint serves (the
gateway is pointed at it instead of Google's, and verifies through the very
same code path), and a demo job that a worker task writes while you watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, with_overrides
from gateway.devtools.bigquery_emulator import (
    BigQueryEmulator,
    create_warehouse,
    emulator_client,
    insert_backtest,
    insert_candles,
    loading_client,
)
from gateway.devtools.dev_auth import CertificateEndpoint, DevSigningKey, mint_token
from gateway.devtools.embedded_redis import EmbeddedRedis
from gateway.runner import GatewayRunner
from gateway.server import install_uvloop, runner_options
from gateway.sources.candles import Candle
from gateway.workers import JobWriter, candle

log = logging.getLogger(__name__)

DEMO_USER = "demo"
DEMO_JOB = "demo-job"
DEMO_BACKTEST = "bt_1737530000.123"
DEMO_INTERVALS = ("day", "minute", "3minute")
MINUTES_PER_DAY = 375  # an NSE session, 09:15 to 15:30
TICK_S = 0.5
MINUTES_PER_TICK = 20
TICKS = 180  # 90 seconds: 3,600 minute candles, 1,200 3minute, 10 days
ROOT = Path(__file__).resolve().parents[2]
# The console's static files: the JavaScript client as it is published, and
# the chart library that `make` installs from frontend/package-lock.json.
CLIENT_DIR = ROOT / "clients" / "js" / "src"
NODE_MODULES = ROOT / "frontend" / "node_modules"
CHART_LIBRARY = Path("lightweight-charts") / "dist" / "lightweight-charts.standalone.production.mjs"
DEV_TOKEN_LIFETIME_S = (5, 3600)


def run_dev(settings: Settings) -> None:
    """Run until Ctrl-C or SIGTERM; either way everything started here is stopped."""
    install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(settings, Path(settings.dev.state_dir).resolve()))


async def _main(settings: Settings, state_dir: Path) -> None:
    key = DevSigningKey.load_or_create(state_dir)
    async with contextlib.AsyncExitStack() as stack:
        redis_url = settings.redis.url or await stack.enter_async_context(_embedded_redis(state_dir))
        certs_url = await stack.enter_async_context(_certificate_endpoint(key))
        settings = with_overrides(settings, redis={"url": redis_url}, auth={"certs_url": certs_url})
        if not settings.bigquery.project:
            endpoint = await stack.enter_async_context(_bigquery_emulator(state_dir, settings))
            settings = with_overrides(
                settings,
                bigquery={"project": settings.auth.firebase_project_id, "api_endpoint": endpoint},
            )
        token = mint_token(key, settings.auth.firebase_project_id, DEMO_USER, lifetime_s=3600)
        project = settings.auth.firebase_project_id

        def dev_token(lifetime_s: int | None) -> str:
            return mint_token(key, project, DEMO_USER, lifetime_s=lifetime_s or 3600)

        base_url = await stack.enter_async_context(_gateway(settings, dev_token))
        client = aioredis.Redis.from_url(redis_url)
        stack.push_async_callback(client.aclose)
        writer = asyncio.create_task(write_demo_job(JobWriter(client, DEMO_JOB)))
        stack.callback(writer.cancel)
        _print_welcome(token, base_url)
        # SIGTERM unwinds the exit stack as Ctrl-C does: the emulator and Valkey stop too.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        log.info("SIGTERM received: stopping the gateway, the demo writer and the emulators")


@contextlib.asynccontextmanager
async def _embedded_redis(state_dir: Path) -> AsyncIterator[str]:
    server = EmbeddedRedis(state_dir / "valkey")
    loop = asyncio.get_running_loop()
    url = await loop.run_in_executor(None, server.start)
    try:
        yield url
    finally:
        await loop.run_in_executor(None, server.stop)


@contextlib.asynccontextmanager
async def _bigquery_emulator(state_dir: Path, settings: Settings) -> AsyncIterator[str]:
    """The emulator, with the demo completed backtest loaded through the official client."""
    emulator = BigQueryEmulator(state_dir / "bqemulator", project=settings.auth.firebase_project_id)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, emulator.start)
    try:
        await loop.run_in_executor(None, load_demo_backtest, emulator, settings)
        yield emulator.endpoint
    finally:
        await loop.run_in_executor(None, emulator.stop)


def load_demo_backtest(emulator: BigQueryEmulator, settings: Settings) -> None:
    """A completed backtest of 10 trading days, as the warehouse would hold it."""
    bigquery = settings.bigquery
    client = loading_client(emulator.project, emulator.endpoint)
    create_warehouse(client, bigquery.dataset, bigquery.backtests_table, bigquery.candles_table)
    insert_backtest(client, bigquery.dataset, bigquery.backtests_table, {
        "backtest_id": DEMO_BACKTEST, "user_id": DEMO_USER, "symbol": "LTF", "exchange": "NSE",
        "intervals": list(DEMO_INTERVALS), "from_date": date(2025, 4, 1), "to_date": date(2025, 4, 10),
        "job_id": None, "created_at": datetime.now(UTC),
    })  # fmt: skip
    series = _RandomWalk(datetime(2025, 4, 1, 9, 15, tzinfo=UTC))
    minutes = [series.next_minute() for _ in range(10 * MINUTES_PER_DAY)]
    by_interval = {
        "minute": minutes,
        "3minute": series.take_completed(3),
        "day": series.take_completed(MINUTES_PER_DAY),
    }
    rows = [
        {"backtest_id": DEMO_BACKTEST, "interval": interval, "time": c.time, "open": c.open, "high": c.high,
         "low": c.low, "close": c.close, "volume": c.volume}
        for interval, candles in by_interval.items()
        for c in candles
    ]  # fmt: skip
    insert_candles(client, bigquery.dataset, bigquery.candles_table, rows)
    client.close()


@contextlib.asynccontextmanager
async def _certificate_endpoint(key: DevSigningKey) -> AsyncIterator[str]:
    endpoint = CertificateEndpoint([key], max_age_s=3600)
    runner = web.AppRunner(endpoint.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/certs"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _gateway(settings: Settings, dev_token: Callable[[int | None], str]) -> AsyncIterator[str]:
    # The emulator's client raises for failed queries, as BigQuery does.
    app = create_app(settings, bigquery_client=emulator_client)
    add_console_routes(app, dev_token)  # development only: the production app has no pages
    runner = GatewayRunner(app, **runner_options(settings))
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def demo_page() -> str:
    """The console page, with the demo ids filled in (the page fetches its token from /dev/token)."""
    page = (Path(__file__).parent / "demo.html").read_text()
    for name, value in (("__JOB__", DEMO_JOB), ("__BACKTEST__", DEMO_BACKTEST)):
        page = page.replace(name, value)
    return page.replace("__INTERVALS__", ",".join(DEMO_INTERVALS))


def add_console_routes(
    app: web.Application, dev_token: Callable[[int | None], str], node_modules: Path = NODE_MODULES
) -> None:
    """The console at ``/``, its static files, and ``/dev/token`` (a fresh demo-user token: development only)."""
    page = demo_page()

    async def console(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def token(request: web.Request) -> web.Response:
        low, high = DEV_TOKEN_LIFETIME_S
        text = request.query.get("lifetime", "")
        lifetime = min(max(int(text), low), high) if text.isdigit() else None
        return web.Response(text=dev_token(lifetime), headers={"Cache-Control": "no-store"})

    async def chart_library(request: web.Request) -> web.StreamResponse:
        path = node_modules / CHART_LIBRARY
        if not path.is_file():
            raise web.HTTPNotFound(text=f"{path} is missing: run `make install` (npm ci in frontend/)")
        return web.FileResponse(path, headers={"Content-Type": "text/javascript"})

    app.router.add_get("/", console)
    app.router.add_get("/dev/token", token)
    app.router.add_get("/static/vendor/lightweight-charts.mjs", chart_library)
    if CLIENT_DIR.is_dir():  # a source checkout; an installed package has no clients/
        app.router.add_static("/static/client/", CLIENT_DIR)


def _print_welcome(token: str, base_url: str) -> None:
    stream = f"{base_url}/api/sse/backtest/{{}}/data/multi?intervals={','.join(DEMO_INTERVALS)}&token={token}"
    lines = [
        "",
        f"Candle gateway (development) listening on {base_url}",
        "",
        f"Open {base_url}/ in a browser: the console, candlestick charts of the live demo job (written for"
        f" the next {TICKS * TICK_S:.0f} s) or of a completed backtest, filled over one SSE stream by the"
        " JavaScript client (clients/js), which refreshes its token from /dev/token.",
        "",
        "The streams themselves (curl -N '<url>'):",
        f"  live job:  {stream.format(DEMO_JOB)}&follow=true",
        f"  backtest:  {stream.format(DEMO_BACKTEST)}&limit=5000",
        "",
        f"Token for user '{DEMO_USER}' (valid 1 hour; send as ?token= or 'Authorization: Bearer'):",
        f"  {token}",
        "More tokens: .venv/bin/python -m gateway token --uid NAME [--admin]",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


async def write_demo_job(writer: JobWriter) -> None:
    """A worker's life in miniature: queued, running with candles arriving, completed."""
    await writer.create(user_id=DEMO_USER, symbol="LTF", exchange="NSE", intervals=DEMO_INTERVALS, status="queued")
    series = _RandomWalk(datetime(2025, 4, 1, 9, 15, tzinfo=UTC))
    await writer.update(status="running", current_bar=0)
    for tick in range(TICKS):
        minutes = [series.next_minute() for _ in range(MINUTES_PER_TICK)]
        await writer.append("minute", minutes)
        await writer.append("3minute", series.take_completed(3))
        await writer.append("day", series.take_completed(MINUTES_PER_DAY))
        await writer.update(current_bar=series.bars)
        if tick == 0:
            log.info("demo job '%s' is running", writer.job_id)
        await asyncio.sleep(TICK_S)
    await writer.update(status="completed")
    log.info("demo job '%s' completed with %d minute candles", writer.job_id, series.bars)


class _RandomWalk:
    """Minute candles of a random walk, aggregated into longer intervals as they complete."""

    def __init__(self, start: datetime) -> None:
        self._start = start
        self._price = 1234.5
        self._random = random.Random(7)  # noqa: S311 - demo prices, not secrets
        self.bars = 0
        self._minutes: list[Candle] = []
        self._taken: dict[int, int] = {}

    def next_minute(self) -> Candle:
        day, minute = divmod(self.bars, MINUTES_PER_DAY)
        time = self._start + timedelta(days=day, minutes=minute)
        open_ = self._price
        close = max(1.0, open_ + self._random.gauss(0, 0.8))
        high = max(open_, close) + abs(self._random.gauss(0, 0.3))
        low = min(open_, close) - abs(self._random.gauss(0, 0.3))
        self._price = close
        self.bars += 1
        bar = candle(
            time,
            round(open_, 2),
            round(high, 2),
            round(low, 2),
            round(close, 2),
            self._random.randint(100, 5000),
        )
        self._minutes.append(bar)
        return bar

    def take_completed(self, minutes: int) -> list[Candle]:
        """Aggregates of ``minutes`` minute candles completed since the last call."""
        done = self._taken.get(minutes, 0)
        out = []
        while (done + 1) * minutes <= len(self._minutes):
            group = self._minutes[done * minutes : (done + 1) * minutes]
            day_start = group[0].time.replace(hour=0, minute=0) if minutes == MINUTES_PER_DAY else group[0].time
            out.append(
                candle(
                    day_start,
                    group[0].open,
                    max(c.high for c in group),
                    min(c.low for c in group),
                    group[-1].close,
                    sum(c.volume for c in group),
                )
            )
            done += 1
        self._taken[minutes] = done
        return out
