"""``make bench``: the gateway against the floor, in one run, on this machine.

Starts a real Valkey, a local certificate endpoint, the gateway
(``python -m gateway serve``) and the floor (``bench/floor.py``) as separate
processes, seeds a job of 3 intervals x 50,000 candles through the worker
contract, then reads both the same way with a real HTTP client:

- one stream of all three intervals (median of several runs after a warm-up):
  whole-stream time and time to the first ``data_chunk``;
- 16 and 64 concurrent streams: wall time, aggregate points per second,
  first-chunk p50 and p99;
- peak resident memory of each server process, and memory per idle follow
  stream (1,000 of them on the gateway);
- the cost of one token verification, in process.

Every gateway figure is printed with its ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from bench.fanout import fanout_section
from gateway.config import BigQuerySettings
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
from gateway.sources import keys
from gateway.sources.warehouse import Warehouse
from gateway.workers import JobWriter, candle

PROJECT = "bench-candles"
JOB = "bench-job"
IDLE_JOB = "bench-idle-job"
INTERVALS = ("day", "minute", "3minute")
DATA_CHUNK = b"event: data_chunk"


@dataclass
class StreamResult:
    first_chunk_s: float
    total_s: float
    points: int
    bytes: int


async def read_one(session: aiohttp.ClientSession, url: str) -> StreamResult:
    """One whole stream, timed from the request to the first data_chunk and to the end."""
    started = time.perf_counter()
    first_chunk = None
    points = size = 0
    tail = b""
    async with session.get(url) as response:
        assert response.status == 200, f"{url}: {response.status} {await response.text()}"
        async for block in response.content.iter_any():
            size += len(block)
            window = tail + block
            if first_chunk is None and DATA_CHUNK in window:
                first_chunk = time.perf_counter() - started
            points += window.count(b'"time"') - tail.count(b'"time"')
            tail = block[-16:]
    total = time.perf_counter() - started
    return StreamResult(first_chunk_s=first_chunk or total, total_s=total, points=points, bytes=size)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@contextlib.contextmanager
def server_process(args: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def certificate_endpoint(key: DevSigningKey) -> AsyncIterator[str]:
    runner = web.AppRunner(CertificateEndpoint([key], max_age_s=3600).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/certs"
    finally:
        await runner.cleanup()


async def seed(client: aioredis.Redis, points: int) -> None:
    await seed_job(client, JOB, points)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    idle = JobWriter(client, IDLE_JOB)
    await idle.create(user_id="bench", symbol="LTF", exchange="NSE", intervals=["day"], status="running")
    await idle.append("day", [candle(start, 1.0, 2.0, 0.5, 1.5, 10)])


async def seed_job(client: aioredis.Redis, job_id: str, points: int) -> None:
    """A running job of 3 intervals x ``points`` candles, written as a worker would."""
    writer = JobWriter(client, job_id)
    await writer.create(
        user_id="bench", symbol="LTF", exchange="NSE", intervals=INTERVALS, status="running", current_bar=1
    )
    start = datetime(2020, 1, 1, tzinfo=UTC)
    steps = {"day": timedelta(days=1), "minute": timedelta(minutes=1), "3minute": timedelta(minutes=3)}
    for interval in INTERVALS:
        for first in range(0, points, 5000):
            batch = [
                candle(start + i * steps[interval], 1000 + i % 97 * 0.25, 1001.5, 998.75, 1000.5, 1000 + i)
                for i in range(first, min(first + 5000, points))
            ]
            await writer.append(interval, batch)


async def copy_job(client: aioredis.Redis, copy_id: str) -> None:
    """Another job with the same candles: a first read of it validates everything again."""
    await client.copy(keys.job_key(JOB), keys.job_key(copy_id), replace=True)
    for interval in INTERVALS:
        await client.copy(keys.candles_key(JOB, interval), keys.candles_key(copy_id, interval), replace=True)


async def single_streams(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[StreamResult]:
    """One stream after another, each URL once, after two warm-up reads of the first."""
    for _ in range(2):  # warm-up: connections, caches, code paths
        await read_one(session, urls[0])
    return [await read_one(session, url) for url in urls]


async def concurrent_streams(url: str, count: int) -> tuple[float, list[StreamResult]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(read_one(session, url) for _ in range(count)))
        return time.perf_counter() - started, list(results)


async def follow_latency(base: str, token: str, client: aioredis.Redis, followers: int, appends: int) -> list[float]:
    """Seconds from a worker's append (with its note) to each follower reading the new chunk."""
    job = f"bench-follow-job-{followers}"
    await client.delete(keys.job_key(job), keys.candles_key(job, "day"))
    writer = JobWriter(client, job)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    await writer.create(user_id="bench", symbol="LTF", exchange="NSE", intervals=["day"], status="running")
    await writer.append("day", [candle(start, 1.0, 2.0, 0.5, 1.5, 10)])
    url = f"{base}/api/sse/backtest/{job}/data/multi?intervals=day&follow=true&token={token}"
    appended_at: dict[int, float] = {}
    latencies: list[float] = []

    async def follow(response: aiohttp.ClientResponse) -> None:
        buffer = b""
        seen = 1
        async for block in response.content.iter_any():
            received = time.perf_counter()
            buffer += block
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if b"event: data_chunk" in event:
                    sent = int(event.partition(b'"points_sent":')[2].split(b",", 1)[0])
                    # One chunk may carry several appends when they come quickly.
                    latencies.extend(received - appended_at[n] for n in range(seen + 1, sent + 1))
                    seen = sent

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        responses = []
        for _ in range(followers):
            response = await session.get(url)
            await response.content.readuntil(b"event: interval_complete")
            responses.append(response)
        readers = [asyncio.create_task(follow(response)) for response in responses]
        await asyncio.sleep(0.5)
        for n in range(appends):
            appended_at[n + 2] = time.perf_counter()
            await writer.append("day", [candle(start + timedelta(days=n + 1), 1.0, 2.0, 0.5, 1.5, 10)])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for task in readers:
            task.cancel()
        for response in responses:
            response.close()
    assert len(latencies) == followers * appends, f"{len(latencies)} of {followers * appends} chunks arrived"
    return latencies


async def idle_followers(base: str, token: str, pid: int, count: int) -> float:
    """KiB of gateway memory per idle follow stream (each past its snapshot)."""
    url = f"{base}/api/sse/backtest/{IDLE_JOB}/data/multi?intervals=day&follow=true&token={token}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        responses = []
        for _ in range(count):
            response = await session.get(url)
            await response.content.readuntil(b"event: interval_complete")
            responses.append(response)
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        for response in responses:
            response.close()
    return (after - before) / count


def load_backtests(emulator: BigQueryEmulator, count: int, points: int) -> list[str]:
    """``count`` backtests of 3 intervals x ``points`` candles, through the official client."""
    client = loading_client(PROJECT, emulator.endpoint)
    create_warehouse(client, "backtests")
    start = datetime(2020, 1, 1, tzinfo=UTC)
    steps = {"day": timedelta(days=1), "minute": timedelta(minutes=1), "3minute": timedelta(minutes=3)}
    ids = []
    for n in range(count):
        backtest_id = f"bt_{1700000000 + n}.000"
        insert_backtest(client, "backtests", "backtests", {
            "backtest_id": backtest_id, "user_id": "bench", "symbol": "LTF", "exchange": "NSE",
            "intervals": list(INTERVALS), "job_id": None, "created_at": start,
        })  # fmt: skip
        rows = [
            {"backtest_id": backtest_id, "interval": interval, "time": start + i * steps[interval],
             "open": 1000.0, "high": 1001.5, "low": 998.75, "close": 1000.5, "volume": 1000 + i}
            for interval in INTERVALS
            for i in range(points)
        ]  # fmt: skip
        insert_candles(client, "backtests", "candles", rows)
        ids.append(backtest_id)
    client.close()
    return ids


def query_round_trip_ms(emulator: BigQueryEmulator, points: int, runs: int) -> float:
    """Median time of the gateway's own first-page query, straight through the client."""
    settings = BigQuerySettings(project=PROJECT, api_endpoint=emulator.endpoint)
    warehouse = Warehouse(settings, emulator_client(settings))

    async def once() -> float:
        started = time.perf_counter()
        await warehouse.first_page("bt_1700000000.000", "minute", 0, min(points, 1000))
        return time.perf_counter() - started

    async def measure() -> list[float]:
        return [await once() for _ in range(runs)]

    try:
        return statistics.median(asyncio.run(measure())) * 1000
    finally:
        warehouse.close()


async def bigquery_figures(
    args: argparse.Namespace, base: str, token: str, client: aioredis.Redis, ids: Sequence[str], job_url: str
) -> list[str]:
    """Cold (warehouse) and warm (cache) first chunks of backtests, against a running job's stream."""
    query = f"intervals={','.join(INTERVALS)}&limit={args.bq_points}&chunk_size=500&token={token}"
    lines = []
    async with aiohttp.ClientSession() as session:
        cold = []
        for bt in ids:
            cold.append(await read_one(session, f"{base}/api/sse/backtest/{bt}/data/multi?{query}"))
            # The background cache fill queries the emulator too: let it finish
            # so that it does not slow the next cold stream down.
            for _ in range(400):
                if len(await client.hgetall(keys.backtest_complete_key(bt))) == len(INTERVALS):
                    break
                await asyncio.sleep(0.05)
        warm = [await read_one(session, f"{base}/api/sse/backtest/{bt}/data/multi?{query}") for bt in ids]
        job = [await read_one(session, job_url) for _ in ids]
    expected = 3 * args.bq_points
    for result in cold + warm + job:
        assert result.points == expected, f"a stream carried {result.points} points, not {expected}"
    lines.append(
        row(
            "backtest cold (warehouse), first data_chunk",
            statistics.median(r.first_chunk_s for r in cold) * 1000,
            None,
            "ms",
        )
    )
    lines.append(row("backtest cold (warehouse), whole", statistics.median(r.total_s for r in cold) * 1000, None, "ms"))
    lines.append(
        row(
            "backtest warm (cache), first data_chunk",
            statistics.median(r.first_chunk_s for r in warm) * 1000,
            None,
            "ms",
            "{:.2f}",
        )
    )
    job_whole = statistics.median(r.total_s for r in job) * 1000
    lines.append(
        row(
            "backtest warm (cache), whole vs running job",
            statistics.median(r.total_s for r in warm) * 1000,
            job_whole,
            "ms",
        )
    )
    return lines


async def warehouse_section(
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
    key: DevSigningKey,
    client: aioredis.Redis,
    redis_url: str,
) -> list[str]:
    """The gateway against the BigQuery emulator: one query's round trip, cold and warm streams."""
    loop = asyncio.get_running_loop()
    emulator = BigQueryEmulator(work / "bqemulator", project=PROJECT)
    await loop.run_in_executor(None, emulator.start)
    try:
        ids = await loop.run_in_executor(None, load_backtests, emulator, args.runs, args.bq_points)
        round_trip = await loop.run_in_executor(None, query_round_trip_ms, emulator, args.bq_points, args.runs)
        job_id = "bench-bq-size-job"
        await client.delete(keys.job_key(job_id), *(keys.candles_key(job_id, i) for i in INTERVALS))
        await seed_job(client, job_id, args.bq_points)
        port = free_port()
        bq_env = {
            **env,
            "GATEWAY_SERVER_PORT": str(port),
            "GATEWAY_BIGQUERY_PROJECT": PROJECT,
            "GATEWAY_BIGQUERY_API_ENDPOINT": emulator.endpoint,
        }
        gateway_cmd = [sys.executable, "-m", "gateway", "serve"]
        with server_process(gateway_cmd, bq_env, port, work / "bq-gateway.log"):
            token = mint_token(key, PROJECT, "bench", lifetime_s=3600)
            base = f"http://127.0.0.1:{port}"
            query = f"intervals={','.join(INTERVALS)}&limit={args.bq_points}&chunk_size=500&token={token}"
            job_url = f"{base}/api/sse/backtest/{job_id}/data/multi?{query}"
            lines = [row("BigQuery emulator, one first-page query (1,000 rows)", round_trip, None, "ms")]
            lines += await bigquery_figures(args, base, token, client, ids, job_url)
            return lines
    finally:
        await loop.run_in_executor(None, emulator.stop)


def verify_cost_us(key: DevSigningKey) -> float:
    """Microseconds per ``TokenVerifier.verify`` with a warm certificate cache, in process."""
    from gateway import auth
    from gateway.config import AuthSettings

    async def measure() -> float:
        async with certificate_endpoint(key) as certs_url, aiohttp.ClientSession() as session:
            settings = AuthSettings(firebase_project_id=PROJECT, certs_url=certs_url)
            verifier = auth.TokenVerifier(settings, auth.CertificateCache(session, settings))
            token = mint_token(key, PROJECT, "bench")
            await verifier.verify(token)
            rounds = 2000
            started = time.perf_counter()
            for _ in range(rounds):
                await verifier.verify(token)
            return (time.perf_counter() - started) / rounds * 1e6

    return asyncio.run(measure())


def row(name: str, gateway: float, floor: float | None, unit: str, fmt: str = "{:.1f}") -> str:
    ratio = f"{gateway / floor:.2f}" if floor else "-"
    floor_text = fmt.format(floor) if floor is not None else "-"
    return f"| {name} | {fmt.format(gateway)} {unit} | {floor_text} {unit if floor is not None else ''} | {ratio} |"


async def run(args: argparse.Namespace, work: Path) -> list[str]:
    valkey = EmbeddedRedis(work / "valkey")
    redis_url = valkey.start()
    key = DevSigningKey.generate()
    if args.only == "fanout":
        try:
            async with certificate_endpoint(key) as certs_url:
                return await fanout_section(args, work, redis_url, certs_url, PROJECT, key)
        finally:
            valkey.stop()
    try:
        client = aioredis.Redis.from_url(redis_url)
        seeded = time.perf_counter()
        await seed(client, args.points)
        print(f"seeded 3 x {args.points} candles in {time.perf_counter() - seeded:.1f} s", file=sys.stderr)
        async with certificate_endpoint(key) as certs_url:
            gateway_port, floor_port = free_port(), free_port()
            env = {
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_AUTH_CERTS_URL": certs_url,
                "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
                "GATEWAY_SERVER_PORT": str(gateway_port),
                "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
                "GATEWAY_SERVER_ACCESS_LOG": "false",
            }
            gateway_cmd = [sys.executable, "-m", "gateway", "serve"]
            floor_cmd = [
                sys.executable,
                "-m",
                "bench.floor",
                "--redis-url",
                redis_url,
                "--port",
                str(floor_port),
            ]
            with (
                server_process(gateway_cmd, env, gateway_port, work / "gateway.log") as gateway,
                server_process(floor_cmd, {}, floor_port, work / "floor.log") as floor,
            ):
                lines = await measure(args, client, key, gateway.pid, floor.pid, gateway_port, floor_port)
            # Followers on a fresh gateway, so its heap is not the one the big streams grew.
            follow_port = free_port()
            follow_env = {**env, "GATEWAY_SERVER_PORT": str(follow_port)}
            with server_process(gateway_cmd, follow_env, follow_port, work / "follow.log") as follower_gateway:
                token = mint_token(key, PROJECT, "bench", lifetime_s=3600)
                base = f"http://127.0.0.1:{follow_port}"
                latencies = await follow_latency(base, token, client, args.latency_followers, args.appends)
                lines.append(
                    row(
                        f"append -> data_chunk at {args.latency_followers} followers, p50",
                        percentile(latencies, 0.5) * 1000,
                        None,
                        "ms",
                        "{:.2f}",
                    )
                )
                lines.append(
                    row(
                        f"append -> data_chunk at {args.latency_followers} followers, p95",
                        percentile(latencies, 0.95) * 1000,
                        None,
                        "ms",
                        "{:.2f}",
                    )
                )
                per_follower = await idle_followers(base, token, follower_gateway.pid, args.followers)
                lines.append(row(f"RSS per idle follow stream ({args.followers})", per_follower, None, "KiB"))
            if args.bq_points:
                lines += await warehouse_section(args, work, env, key, client, redis_url)
            if args.only != "streams":
                lines += ["", *await fanout_section(args, work, redis_url, certs_url, PROJECT, key)]
        await client.aclose()
        return lines
    finally:
        valkey.stop()


async def measure(
    args: argparse.Namespace,
    client: aioredis.Redis,
    key: DevSigningKey,
    gateway_pid: int,
    floor_pid: int,
    gateway_port: int,
    floor_port: int,
) -> list[str]:
    token = mint_token(key, PROJECT, "bench", lifetime_s=3600)
    query = f"intervals={','.join(INTERVALS)}&limit={args.points}&chunk_size=500"

    def gateway_url(job: str) -> str:
        return f"http://127.0.0.1:{gateway_port}/api/sse/backtest/{job}/data/multi?{query}&token={token}"

    def floor_url(job: str) -> str:
        return f"http://127.0.0.1:{floor_port}/api/sse/backtest/{job}/data/multi?{query}"

    lines = [
        f"points per stream: {3 * args.points}, chunk_size 500; single streams: median of {args.runs} after 2 warm-ups",
        "",
        "| measure | gateway | floor | gateway / floor |",
        "|---|---|---|---|",
    ]
    # First reads: every timed stream reads a job of its own, so the gateway
    # validates every candle (no help from chunks validated earlier).
    copies = [f"{JOB}-{run}" for run in range(args.runs)]
    for copy_id in copies:
        await copy_job(client, copy_id)
    async with aiohttp.ClientSession() as session:
        first_g = await single_streams(session, [gateway_url(job) for job in copies])
        first_f = await single_streams(session, [floor_url(job) for job in copies])
        again_g = await single_streams(session, [gateway_url(JOB)] * args.runs)
    expected = 3 * args.points
    for result in first_g + first_f + again_g:
        assert result.points == expected, f"a stream carried {result.points} points, not {expected}"

    def median_ms(results: Sequence[StreamResult], first_chunk: bool = False) -> float:
        return statistics.median(r.first_chunk_s if first_chunk else r.total_s for r in results) * 1000

    floor_whole = median_ms(first_f)
    lines.append(row("one stream, whole, first read (median)", median_ms(first_g), floor_whole, "ms"))
    lines.append(row("one stream, whole, read again (median)", median_ms(again_g), floor_whole, "ms"))
    lines.append(
        row("one stream, first data_chunk (median)", median_ms(first_g, True), median_ms(first_f, True), "ms", "{:.2f}")
    )
    lines.append(row("one stream, bytes", float(first_g[0].bytes), float(first_f[0].bytes), "B", "{:.0f}"))
    gateway_url_main, floor_url_main = gateway_url(JOB), floor_url(JOB)

    for count in (16, 64):
        wall_g, results_g = await concurrent_streams(gateway_url_main, count)
        wall_f, results_f = await concurrent_streams(floor_url_main, count)
        points = count * expected
        lines.append(row(f"{count} streams, wall time", wall_g * 1000, wall_f * 1000, "ms"))
        lines.append(row(f"{count} streams, points/s", points / wall_g, points / wall_f, "", "{:,.0f}"))
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            lines.append(
                row(
                    f"{count} streams, first data_chunk {name}",
                    percentile([r.first_chunk_s for r in results_g], fraction) * 1000,
                    percentile([r.first_chunk_s for r in results_f], fraction) * 1000,
                    "ms",
                )
            )
    peak_g, peak_f = rss_kib(gateway_pid, "VmHWM") / 1024, rss_kib(floor_pid, "VmHWM") / 1024
    lines.append(row("peak RSS after the streams", peak_g, peak_f, "MiB"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50_000, help="candles per interval (3 intervals)")
    parser.add_argument("--runs", type=int, default=7, help="timed single-stream runs per server")
    parser.add_argument("--followers", type=int, default=1000, help="idle follow streams for the memory figure")
    parser.add_argument("--latency-followers", type=int, default=100, help="followers of one job for the latency")
    parser.add_argument("--appends", type=int, default=50, help="worker appends timed for the latency")
    parser.add_argument("--bq-points", type=int, default=2000, help="candles per interval of each backtest (0: skip)")
    parser.add_argument("--only", choices=("streams", "fanout"), default=None, help="run one section only")
    parser.add_argument("--quick", action="store_true", help="fan-out: 8 s per size instead of 30")
    parser.add_argument("--fanout-seconds", type=float, default=30.0, help="fan-out: seconds of appends per size")
    parser.add_argument("--fanout-sizes", default="", help="fan-out: followers x jobs, e.g. 1000x1,10000x100")
    parser.add_argument("--fanout-baseline", default="", help="fan-out: also run a gateway from this source tree")
    parser.add_argument("--fanout-idle", type=int, default=19_000, help="fan-out: idle followers held (0: skip)")
    args = parser.parse_args()
    if args.quick:
        args.fanout_seconds = min(args.fanout_seconds, 8.0)
    from gateway.server import install_uvloop

    install_uvloop()
    with tempfile.TemporaryDirectory(prefix="candle-bench-") as tmp:
        lines = asyncio.run(run(args, Path(tmp)))
    key = DevSigningKey.generate()
    if args.only != "fanout":
        lines.append(row("token verification (warm cache, in process)", verify_cost_us(key), None, "µs"))
    header = [
        "command: make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.platform()}",
    ]
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
