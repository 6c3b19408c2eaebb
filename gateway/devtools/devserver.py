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

import msgspec
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
from gateway.server import bind, guarded_listener, install_uvloop, runner_options
from gateway.sources import keys
from gateway.sources.candles import Candle
from gateway.workers import JobWriter, candle

log = logging.getLogger(__name__)

DEMO_USER = "demo"
DEMO_JOB = "demo-job"
DEMO_BACKTEST = "bt_1737530000.123"
DEMO_INTERVALS = ("day", "minute", "3minute")
MINUTES_PER_DAY = 375  # an NSE session, 09:15 to 15:30
TICK_S = 0.5
# The demo job's pace: a fast start (20 minutes a tick: 3,600 minute candles, 1,200 3minute and
# 9 days in the first 90 s), then one minute a tick for as long as `make run` runs (the console asks
# for the most a stream allows, 50,000 points an interval: some 6 hours at this pace).
BACKFILL_MINUTES = 3600
MINUTES_PER_TICK = 20
STEADY_MINUTES_PER_TICK = 1
DEMO_START = datetime(2025, 4, 1, 9, 15, tzinfo=UTC)
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
        writer = asyncio.create_task(write_demo_job(client))
        stack.callback(writer.cancel)
        _print_welcome(token, base_url)
        # SIGTERM unwinds the exit stack as Ctrl-C does: the emulator and Valkey stop too.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        log.info("SIGTERM received: stopping the gateway, the demo writer and the emulators")


@contextlib.asynccontextmanager
async def _embedded_redis(state_dir: Path) -> AsyncIterator[str]:
    server = EmbeddedRedis(state_dir / "valkey", persist=True)
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
    listener: asyncio.Server | None = None
    try:
        # Guarded as `serve` is (header deadline, connection cap: gateway/connections.py).
        sock = bind(settings.server.host, settings.server.port, reuse_port=False, what="port", setting="SERVER_PORT")
        listener = await guarded_listener(runner, sock, settings)
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        if listener is not None:
            listener.close()
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
        " as long as this runs, and continued by the next run) or of a completed backtest, filled over one"
        " SSE stream by the JavaScript client (clients/js), which refreshes its token from /dev/token.",
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


async def write_demo_job(
    client: aioredis.Redis,
    *,
    tick_s: float = TICK_S,
    backfill_minutes: int = BACKFILL_MINUTES,
    minutes_per_tick: int = MINUTES_PER_TICK,
    steady_minutes_per_tick: int = STEADY_MINUTES_PER_TICK,
) -> None:
    """A worker that never finishes: the demo job runs, and its candles arrive, until it is cancelled.

    A demo job left by an earlier ``make run`` is continued, not rewritten: the
    series is a seeded random walk, so replaying the stored count of minutes
    gives the very candles stored, and the next ones continue them. An open
    console (or any follow stream) then simply resumes after the restart. A
    stored series that is not this walk (an older demo) is replaced.
    """
    writer = JobWriter(client, DEMO_JOB)
    series = await _resumed_series(client)
    if series is None:
        series = _RandomWalk(DEMO_START)
        await client.delete(*(keys.candles_key(DEMO_JOB, name) for name in DEMO_INTERVALS))
        await writer.create(user_id=DEMO_USER, symbol="LTF", exchange="NSE", intervals=DEMO_INTERVALS, status="queued")
        log.info("demo job '%s' is running", DEMO_JOB)
    else:
        log.info("demo job '%s' continues after its %d stored minute candles", DEMO_JOB, series.bars)
    await writer.update(status="running", current_bar=series.bars)
    this_task = asyncio.current_task()
    while True:
        # redis-py (8.1) can swallow a cancellation that lands inside a transaction; the task still
        # counts it, so a Ctrl-C (or a test's cancel) stops the demo here instead of never.
        if this_task is not None and this_task.cancelling():
            raise asyncio.CancelledError
        count = minutes_per_tick if series.bars < backfill_minutes else steady_minutes_per_tick
        await writer.append("minute", [series.next_minute() for _ in range(count)])
        await writer.append("3minute", series.take_completed(3))
        await writer.append("day", series.take_completed(MINUTES_PER_DAY))
        series.forget_taken()
        await writer.update(current_bar=series.bars)
        await asyncio.sleep(tick_s)


async def _resumed_series(client: aioredis.Redis) -> _RandomWalk | None:
    """The demo's walk at the point the stored job reached, or None when there is none to continue."""
    if not await client.exists(keys.job_key(DEMO_JOB)):
        return None
    lengths = [int(await client.llen(keys.candles_key(DEMO_JOB, name))) for name in DEMO_INTERVALS]
    stored = dict(zip(DEMO_INTERVALS, lengths, strict=True))
    if not stored["minute"]:
        return None
    series = _RandomWalk(DEMO_START)
    # Aggregates a stop cut short are written with the next tick.
    series.mark_taken(3, stored["3minute"])
    series.mark_taken(MINUTES_PER_DAY, stored["day"])
    for position in range(stored["minute"]):
        series.next_minute()
        if position % 10_000 == 0:
            series.forget_taken()
    series.forget_taken()
    last = await client.lindex(keys.candles_key(DEMO_JOB, "minute"), -1)
    if last is None or msgspec.json.decode(last)["close"] != series.last_close:
        log.warning("demo job '%s' holds another series than this demo's: writing it afresh", DEMO_JOB)
        return None
    return series


class _RandomWalk:
    """Minute candles of a random walk, aggregated into longer intervals as they complete.

    Seeded: the n-th candle is the same in every run, so a run can continue an earlier one.
    """

    def __init__(self, start: datetime) -> None:
        self._start = start
        self._price = 1234.5
        self._random = random.Random(7)  # noqa: S311 - demo prices, not secrets
        self.bars = 0
        self.last_close: float | None = None
        self._minutes: list[Candle] = []
        self._first = 0  # the series position of _minutes[0]: the ones every aggregate took are forgotten
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
        self.last_close = round(close, 2)
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

    def mark_taken(self, minutes: int, count: int) -> None:
        """``count`` aggregates of ``minutes`` were written already (a continued run)."""
        self._taken[minutes] = count

    def forget_taken(self) -> None:
        """Drop the minutes every aggregate has taken: a demo that runs for hours holds a day at most."""
        if len(self._taken) < 2:
            return
        keep_from = min(self.bars, *(done * minutes for minutes, done in self._taken.items()))
        del self._minutes[: keep_from - self._first]
        self._first = keep_from

    def take_completed(self, minutes: int) -> list[Candle]:
        """Aggregates of ``minutes`` minute candles completed since the last call."""
        done = self._taken.get(minutes, 0)
        out = []
        while (done + 1) * minutes <= self._first + len(self._minutes):
            start = done * minutes - self._first
            group = self._minutes[start : start + minutes]
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
