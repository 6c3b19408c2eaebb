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
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from bench.compression import compression_section
from bench.fanout import fanout_section, worker_counts
from bench.processes import cpu_seconds, idle_follower_kib, rss_kib, server_process
from bench.seeding import INTERVALS, write_idle_job, write_job
from gateway.config import BigQuerySettings
from gateway.devtools.bigquery_emulator import (
    BigQueryEmulator,
    create_warehouse,
    emulator_client,
    insert_backtest,
    insert_candles,
    loading_client,
)
from gateway.devtools.bigquery_proxy import CountingProxy
from gateway.devtools.dev_auth import CertificateEndpoint, DevSigningKey, mint_token
from gateway.devtools.embedded_redis import EmbeddedRedis
from gateway.devtools.ports import free_port, free_port_block
from gateway.devtools.processes import gateway_serve
from gateway.server import usable_cpus
from gateway.sources import keys
from gateway.sources.warehouse import Warehouse
from gateway.workers import JobWriter, candle

PROJECT = "bench-candles"
JOB = "bench-job"
IDLE_JOB = "bench-idle-job"
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
    await write_job(client, JOB, points)
    await write_idle_job(client, IDLE_JOB)


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
        insert_candles(client, "backtests", "candles", rows, batch_rows=20_000)
        ids.append(backtest_id)
    client.close()
    return ids


def query_round_trip_ms(emulator: BigQueryEmulator, points: int, runs: int) -> float:
    """Median time of the gateway's own first-page query, straight through the client."""
    settings = BigQuerySettings(project=PROJECT, api_endpoint=emulator.endpoint)
    warehouse = Warehouse(settings, emulator_client(settings))

    async def once() -> float:
        started = time.perf_counter()
        await warehouse.read_interval("bt_1700000000.000", "minute", first_rows=min(points, 1000))
        return time.perf_counter() - started

    async def measure() -> list[float]:
        return [await once() for _ in range(runs)]

    try:
        return statistics.median(asyncio.run(measure())) * 1000
    finally:
        warehouse.close()


def warehouse_cost(proxy: CountingProxy) -> tuple[int, int, int]:
    """Queries for metadata, queries for candles, result pages: what the proxy saw (then forgets)."""
    counts = proxy.counts()
    proxy.clear()
    return counts["query:metadata"], counts["query:candles"], counts["page"]


def cost_text(costs: Sequence[tuple[int, int, int]]) -> str:
    """``1 + 3 q, 12 p``: lookups + candle queries, result pages; the distinct ones of several runs."""
    return ", ".join(sorted({f"{m} + {c} q, {p} p" for m, c, p in costs}))


@dataclass
class Tree:
    """A gateway under measurement: this source tree, or the base one (``--warehouse-baseline``)."""

    name: str
    source: str | None
    proxy: CountingProxy
    base: str = ""
    cold: list[str] = field(default_factory=list)  # one fresh backtest per timed cold stream
    crowd: str = ""  # the backtest the 10 streams at once read
    # This tree's cold backtests re-opened right after their cold stream (nothing waited for).
    reopened: list[StreamResult] = field(default_factory=list)


async def cold_side_by_side(args: argparse.Namespace, trees: list[Tree], token: str) -> list[str]:
    """Cold streams of fresh backtests, the trees alternating (each first in turn); then 10 at once each."""
    query = f"intervals={','.join(INTERVALS)}&limit={args.bq_points}&chunk_size=500&token={token}"
    cold: dict[str, list[StreamResult]] = {tree.name: [] for tree in trees}
    costs: dict[str, list[tuple[int, int, int]]] = {tree.name: [] for tree in trees}
    crowd: dict[str, list[StreamResult]] = {}
    crowd_costs: dict[str, tuple[int, int, int]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for run in range(args.bq_runs):
            for tree in trees[run % len(trees) :] + trees[: run % len(trees)]:
                warehouse_cost(tree.proxy)
                url = f"{tree.base}/api/sse/backtest/{tree.cold[run]}/data/multi?{query}"
                cold[tree.name].append(await read_one(session, url))
                costs[tree.name].append(warehouse_cost(tree.proxy))
                if tree is trees[0]:
                    tree.reopened.append(await read_one(session, url))
        for tree in trees:
            url = f"{tree.base}/api/sse/backtest/{tree.crowd}/data/multi?{query}"
            crowd[tree.name] = list(await asyncio.gather(*(read_one(session, url) for _ in range(10))))
            crowd_costs[tree.name] = warehouse_cost(tree.proxy)
    expected = 3 * args.bq_points
    for result in [r for results in (*cold.values(), *crowd.values(), trees[0].reopened) for r in results]:
        assert result.points == expected, f"a stream carried {result.points} points, not {expected}"

    def ms(results: Sequence[StreamResult], first_chunk: bool) -> list[float]:
        return [(r.first_chunk_s if first_chunk else r.total_s) * 1000 for r in results]

    this, base = trees[0].name, trees[-1].name
    names = f"{this} | {base} | {this} / {base}" if len(trees) > 1 else f"{this} | - | -"
    lines = [
        "",
        f"cold backtests of 3 x {args.bq_points:,} candles, chunk_size 500, {args.bq_runs} fresh backtests per tree,"
        " the trees alternating; median (min-max); q = queries (lookups + candles), p = result pages",
        "",
        f"| measure | {names} |",
        "|---|---|---|---|",
    ]
    for label, first_chunk in (("cold backtest, first data_chunk", True), ("cold backtest, whole", False)):
        figures = [ms(cold[tree.name], first_chunk) for tree in trees]
        cells = [f"{statistics.median(f):.0f} ms ({min(f):.0f}-{max(f):.0f})" for f in figures]
        ratio = f"{statistics.median(figures[0]) / statistics.median(figures[-1]):.2f}" if len(trees) > 1 else "-"
        lines.append(f"| {label} | {cells[0]} | {cells[-1] if len(trees) > 1 else '-'} | {ratio} |")
    cost_cells = [cost_text(costs[tree.name]) for tree in trees]
    lines.append(f"| cold backtest, BigQuery requests per stream | {cost_cells[0]} | {cost_cells[-1]} | - |")
    crowd_cells = [cost_text([crowd_costs[tree.name]]) for tree in trees]
    lines.append(
        f"| 10 streams of one cold backtest at once, BigQuery requests | {crowd_cells[0]} | {crowd_cells[-1]} | - |"
    )
    slowest = [max(ms(crowd[tree.name], True)) for tree in trees]
    lines.append(
        row("10 at once, slowest first data_chunk", slowest[0], slowest[-1] if len(trees) > 1 else None, "ms", "{:.0f}")
    )
    return lines


async def bigquery_figures(
    args: argparse.Namespace,
    proxy: CountingProxy,
    base: str,
    token: str,
    ids: Sequence[str],
    reopened: Sequence[StreamResult],
    job_url: str,
) -> list[str]:
    """This tree's backtests re-opened right after their cold stream (measured then), and cached; a running job."""
    query = f"intervals={','.join(INTERVALS)}&limit={args.bq_points}&chunk_size=500&token={token}"

    def url(backtest_id: str) -> str:
        return f"{base}/api/sse/backtest/{backtest_id}/data/multi?{query}"

    cached, job = [], []
    async with aiohttp.ClientSession() as session:
        for bt in ids:  # side by side, alternating, so that both see the same machine
            cached.append(await read_one(session, url(bt)))
            job.append(await read_one(session, job_url))
    expected = 3 * args.bq_points
    for result in cached + job:
        assert result.points == expected, f"a stream carried {result.points} points, not {expected}"
    assert warehouse_cost(proxy) == (0, 0, 0), "a cached backtest asked BigQuery"

    def median_ms(results: Sequence[StreamResult], first_chunk: bool = False) -> float:
        return statistics.median(r.first_chunk_s if first_chunk else r.total_s for r in results) * 1000

    return [
        "",
        f"this tree, the same backtests again (cached), {len(ids)} runs; reference: a running job of the same size",
        "",
        "| measure | gateway | reference | ratio |",
        "|---|---|---|---|",
        row(
            "re-opened right after, first data_chunk vs cached",
            median_ms(reopened, True),
            median_ms(cached, True),
            "ms",
            "{:.2f}",
        ),
        row("re-opened right after, whole vs running job", median_ms(reopened), median_ms(job), "ms"),
        row("cached backtest, first data_chunk vs running job", median_ms(cached, True), median_ms(job, True), "ms"),
        row("cached backtest, whole vs running job", median_ms(cached), median_ms(job), "ms"),
    ]


async def warehouse_section(
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
    key: DevSigningKey,
    client: aioredis.Redis,
    redis_url: str,
) -> list[str]:
    """The gateway against the BigQuery emulator, through a counting proxy; the base tree beside it if given."""
    loop = asyncio.get_running_loop()
    emulator = BigQueryEmulator(work / "bqemulator", project=PROJECT)
    await loop.run_in_executor(None, emulator.start)
    trees = [Tree("this tree", None, CountingProxy(emulator.endpoint))]
    if args.warehouse_baseline:
        trees.append(Tree("base tree", args.warehouse_baseline, CountingProxy(emulator.endpoint)))
    try:
        loaded = time.perf_counter()
        per_tree = args.bq_runs + 1
        ids = await loop.run_in_executor(None, load_backtests, emulator, per_tree * len(trees), args.bq_points)
        for n, tree in enumerate(trees):
            *tree.cold, tree.crowd = ids[n * per_tree : (n + 1) * per_tree]
        print(f"loaded {len(ids)} backtests in {time.perf_counter() - loaded:.1f} s", file=sys.stderr)
        round_trip = await loop.run_in_executor(None, query_round_trip_ms, emulator, args.bq_points, args.bq_runs)
        job_id = "bench-bq-size-job"
        await client.delete(keys.job_key(job_id), *(keys.candles_key(job_id, i) for i in INTERVALS))
        await write_job(client, job_id, args.bq_points)
        token = mint_token(key, PROJECT, "bench", lifetime_s=3600)
        async with contextlib.AsyncExitStack() as stack:
            for tree in trees:
                port = free_port()
                tree_env = {
                    **env,
                    "GATEWAY_SERVER_PORT": str(port),
                    "GATEWAY_METRICS_PORT": str(free_port()),
                    "GATEWAY_BIGQUERY_PROJECT": PROJECT,
                    "GATEWAY_BIGQUERY_API_ENDPOINT": await tree.proxy.start(),
                }
                stack.push_async_callback(tree.proxy.close)
                log = work / f"bq-gateway-{'base' if tree.source else 'this'}.log"
                await stack.enter_async_context(server_process(gateway_serve(), tree_env, port, log, cwd=tree.source))
                tree.base = f"http://127.0.0.1:{port}"
            query = f"intervals={','.join(INTERVALS)}&limit={args.bq_points}&chunk_size=500&token={token}"
            job_url = f"{trees[0].base}/api/sse/backtest/{job_id}/data/multi?{query}"
            lines = [
                row("BigQuery emulator, one interval's query with its first page (1,000 rows)", round_trip, None, "ms")
            ]
            lines += await cold_side_by_side(args, trees, token)
            this = trees[0]
            lines += await bigquery_figures(args, this.proxy, this.base, token, this.cold, this.reopened, job_url)
            return lines
    finally:
        await loop.run_in_executor(None, emulator.stop)


async def ops_section(
    args: argparse.Namespace, work: Path, env: dict[str, str], key: DevSigningKey, redis_url: str
) -> list[str]:
    """64 concurrent streams: metrics on and off (their cost), 1 and 2 workers (the gain), the floor beside them.

    Each configuration runs in a fresh process, the configurations alternate
    over ``--ops-rounds`` rounds (so drift hits all alike), and each figure is
    the median of its rounds with the range beside it.
    """
    token = mint_token(key, PROJECT, "bench", lifetime_s=3600)
    query = f"intervals={','.join(INTERVALS)}&limit={args.points}&chunk_size=500"
    configs: list[tuple[str, dict[str, str], list[str]]] = [
        ("1 worker, metrics on", {}, []),
        ("1 worker, metrics off (metrics.port = 0)", {"GATEWAY_METRICS_PORT": "0"}, []),
        ("2 workers, metrics on", {}, ["--workers", "2"]),
    ]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    floor_walls: list[float] = []
    expected: int = 3 * args.points
    count: int = args.ops_streams
    for _ in range(args.ops_rounds):
        for name, extra, cli in configs:
            port = free_port()
            cmd = gateway_serve(*cli)
            metrics_port = str(free_port_block(2))
            process_env = {**env, "GATEWAY_SERVER_PORT": str(port), "GATEWAY_METRICS_PORT": metrics_port, **extra}
            log = work / f"ops-gateway-{len(walls[name])}-{name.split(',')[0].replace(' ', '')}.log"
            async with server_process(cmd, process_env, port, log) as process:
                url = f"http://127.0.0.1:{port}/api/sse/backtest/{JOB}/data/multi?{query}&token={token}"
                try:
                    await concurrent_streams(url, 4)  # warm-up: every worker's connections and caches
                    cpu_before = cpu_seconds(process.pid)
                    wall, results = await concurrent_streams(url, count)
                    cpus[name].append(cpu_seconds(process.pid) - cpu_before)
                except aiohttp.ClientError:
                    print(f"{name} failed; its log:\n{log.read_text()[-3000:]}", file=sys.stderr)
                    raise
                assert all(r.points == expected for r in results)
                walls[name].append(wall)
        floor_port = free_port()
        floor_cmd = [sys.executable, "-m", "bench.floor", "--redis-url", redis_url, "--port", str(floor_port)]
        async with server_process(floor_cmd, {}, floor_port, work / "ops-floor.log"):
            url = f"http://127.0.0.1:{floor_port}/api/sse/backtest/{JOB}/data/multi?{query}"
            await concurrent_streams(url, 4)
            floor_walls.append((await concurrent_streams(url, count))[0])

    def points_per_s(wall: float) -> float:
        return count * expected / wall

    floor = statistics.median(floor_walls)
    lines = [
        "",
        f"{count} concurrent streams, {args.ops_rounds} rounds (median, range), {os.cpu_count()} cores"
        f" (usable: {usable_cpus()})",
        "",
        "| configuration | wall time | points/s | / floor (points/s) | server CPU |",
        "|---|---|---|---|---|",
    ]
    for name, runs in [*walls.items(), ("floor (bench/floor.py, 1 process)", floor_walls)]:
        median = statistics.median(runs)
        cpu = cpus.get(name)
        cpu_text = f"{statistics.median(cpu):.2f} s ({min(cpu):.2f}-{max(cpu):.2f})" if cpu else "-"
        lines.append(
            f"| {name} | {median * 1000:.0f} ms ({min(runs) * 1000:.0f}-{max(runs) * 1000:.0f}) |"
            f" {points_per_s(median):,.0f} | {floor / median:.2f} | {cpu_text} |"
        )
    one, off, two = (statistics.median(walls[name]) for name, _, _ in configs)
    cpu_on, cpu_off = (statistics.median(cpus[name]) for name, _, _ in configs[:2])
    events = count * (3 + 3 * -(-args.points // 500) + 1)
    lines.append("")
    lines.append(
        f"metrics cost: wall time on / off = {one / off:.3f}; server CPU on / off = {cpu_on / cpu_off:.3f}"
        f" ({(cpu_on - cpu_off) / events * 1e6:+.1f} µs per event over {events:,} events)"
    )
    lines.append(f"workers gain: points/s with 2 workers / 1 worker = {one / two:.2f}")
    return lines


def verify_cost_us(key: DevSigningKey) -> tuple[float, float]:
    """Microseconds per ``TokenVerifier.verify`` with a warm certificate cache, in process.

    First for tokens it has not seen (the RS256 verification), then for one
    presented again (remembered: its claims checked, no signature).
    """
    from gateway import auth
    from gateway.config import AuthSettings

    async def measure() -> tuple[float, float]:
        async with certificate_endpoint(key) as certs_url, aiohttp.ClientSession() as session:
            settings = AuthSettings(firebase_project_id=PROJECT, certs_url=certs_url)
            verifier = auth.TokenVerifier(settings, auth.CertificateCache(session, settings))
            rounds = 500
            tokens = [mint_token(key, PROJECT, f"bench-{n}") for n in range(rounds + 1)]
            await verifier.verify(tokens[-1])
            started = time.perf_counter()
            for token in tokens[:rounds]:
                await verifier.verify(token)
            first = (time.perf_counter() - started) / rounds * 1e6
            started = time.perf_counter()
            for _ in range(rounds):
                await verifier.verify(tokens[-1])
            return first, (time.perf_counter() - started) / rounds * 1e6

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
        if args.only == "warehouse":
            return await warehouse_only(args, work, key, client, redis_url)
        if args.only == "compression":
            async with certificate_endpoint(key) as certs_url:
                lines = await compression_section(args, work, _compression_env(redis_url, certs_url), key, client)
            await client.aclose()
            return lines
        seeded = time.perf_counter()
        await seed(client, args.points)
        print(f"seeded 3 x {args.points} candles in {time.perf_counter() - seeded:.1f} s", file=sys.stderr)
        async with certificate_endpoint(key) as certs_url:
            if args.only == "ops":
                ops_env = {
                    "GATEWAY_REDIS_URL": redis_url,
                    "GATEWAY_AUTH_CERTS_URL": certs_url,
                    "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
                    "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
                    "GATEWAY_SERVER_ACCESS_LOG": "false",
                    "GATEWAY_METRICS_PORT": str(free_port()),
                }
                lines = await ops_section(args, work, ops_env, key, redis_url)
                await client.aclose()
                return lines
            gateway_port, floor_port = free_port(), free_port()
            env = {
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_AUTH_CERTS_URL": certs_url,
                "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
                "GATEWAY_SERVER_PORT": str(gateway_port),
                # Not the default 9090: another gateway on this machine may hold it.
                "GATEWAY_METRICS_PORT": str(free_port()),
                "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
                "GATEWAY_SERVER_ACCESS_LOG": "false",
            }
            gateway_cmd = gateway_serve()
            floor_cmd = [
                sys.executable,
                "-m",
                "bench.floor",
                "--redis-url",
                redis_url,
                "--port",
                str(floor_port),
            ]
            async with (
                server_process(gateway_cmd, env, gateway_port, work / "gateway.log") as gateway,
                server_process(floor_cmd, {}, floor_port, work / "floor.log") as floor,
            ):
                lines = await measure(args, client, key, gateway.pid, floor.pid, gateway_port, floor_port)
            # Followers on a fresh gateway, so its heap is not the one the big streams grew.
            follow_port = free_port()
            follow_env = {**env, "GATEWAY_SERVER_PORT": str(follow_port)}
            async with server_process(gateway_cmd, follow_env, follow_port, work / "follow.log") as follower_gateway:
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
                per_follower = await idle_follower_kib(
                    f"{base}/api/sse/backtest/{IDLE_JOB}/data/multi?intervals=day&follow=true&token={token}",
                    follower_gateway.pid,
                    args.followers,
                )
                lines.append(row(f"RSS per idle follow stream ({args.followers})", per_follower, None, "KiB"))
            if args.bq_points and args.only is None:
                lines += await warehouse_section(args, work, env, key, client, redis_url)
            if args.ops_rounds and args.only is None:
                lines += await ops_section(args, work, env, key, redis_url)
            if args.only is None and args.compress_runs:
                lines += [
                    "",
                    *await compression_section(args, work, _compression_env(redis_url, certs_url), key, client),
                ]
            if args.only is None:
                lines += ["", *await fanout_section(args, work, redis_url, certs_url, PROJECT, key)]
        await client.aclose()
        return lines
    finally:
        valkey.stop()


async def warehouse_only(
    args: argparse.Namespace, work: Path, key: DevSigningKey, client: aioredis.Redis, redis_url: str
) -> list[str]:
    """``--only warehouse``: the warehouse section alone."""
    async with certificate_endpoint(key) as certs_url:
        env = {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_AUTH_CERTS_URL": certs_url,
            "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
            "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
            "GATEWAY_SERVER_ACCESS_LOG": "false",
        }
        lines = await warehouse_section(args, work, env, key, client, redis_url)
    await client.aclose()
    return lines


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


def _compression_env(redis_url: str, certs_url: str) -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_AUTH_CERTS_URL": certs_url,
        "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
        "GATEWAY_METRICS_PORT": str(free_port()),
        "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
        "GATEWAY_SERVER_ACCESS_LOG": "false",
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50_000, help="candles per interval (3 intervals)")
    parser.add_argument("--runs", type=int, default=7, help="timed single-stream runs per server")
    parser.add_argument("--followers", type=int, default=1000, help="idle follow streams for the memory figure")
    parser.add_argument("--latency-followers", type=int, default=100, help="followers of one job for the latency")
    parser.add_argument("--appends", type=int, default=50, help="worker appends timed for the latency")
    parser.add_argument("--bq-points", type=int, default=20_000, help="candles per interval of each backtest (0: skip)")
    parser.add_argument("--bq-runs", type=int, default=3, help="cold backtests timed (each loaded into the emulator)")
    parser.add_argument(
        "--warehouse-baseline",
        default="",
        help="warehouse: also run a gateway from this source tree (e.g. the base commit, git archive), alternating",
    )
    parser.add_argument("--ops-rounds", type=int, default=3, help="rounds of the metrics/workers comparison (0: skip)")
    parser.add_argument("--ops-streams", type=int, default=64, help="concurrent streams of that comparison")
    parser.add_argument(
        "--only",
        choices=["streams", "warehouse", "ops", "fanout", "compression"],
        help="run one section only: streams (vs the floor), warehouse (BigQuery emulator), "
        "ops (metrics on/off, 1 and 2 workers), fanout (followers x jobs), compression (codecs vs identity)",
    )
    parser.add_argument("--compress-runs", type=int, default=5, help="compression: CPU rounds per codec (0: skip)")
    parser.add_argument("--compress-link-runs", type=int, default=3, help="compression: throttled-link rounds")
    parser.add_argument("--compress-idle", type=int, default=1000, help="compression: idle followers per codec")
    parser.add_argument(
        "--gzip-variants",
        default="zlib:1:13:5,zlib-ng:2:13:5",
        help="compression: gzip by other deflates alongside the gateway's, LIBRARY:LEVEL:WBITS:MEMLEVEL,... "
        "(zlib or zlib-ng; '' for none)",
    )
    parser.add_argument(
        "--fanout-codings",
        default="identity",
        help="fan-out: Accept-Encoding of the followers, each a run of every size, e.g. identity,zstd,gzip",
    )
    parser.add_argument("--quick", action="store_true", help="fan-out: 8 s per size instead of 30")
    parser.add_argument("--fanout-seconds", type=float, default=30.0, help="fan-out: seconds of appends per size")
    parser.add_argument("--fanout-sizes", default="", help="fan-out: followers x jobs, e.g. 1000x1,10000x100")
    parser.add_argument("--fanout-baseline", default="", help="fan-out: also run a gateway from this source tree")
    parser.add_argument(
        "--fanout-floor",
        action="store_true",
        help="fan-out: also run bench/floor.py's follow mode at each size (the least work per append)",
    )
    parser.add_argument(
        "--fanout-nchan", action="store_true", help="fan-out: also run nchan (nginx, 1 worker) at each size"
    )
    parser.add_argument("--fanout-idle", type=int, default=19_000, help="fan-out: idle followers held (0: skip)")
    parser.add_argument(
        "--fanout-connect-concurrency",
        type=int,
        default=64,
        help="fan-out: follow streams the client opens at once (a reconnect storm: more)",
    )
    parser.add_argument(
        "--fanout-workers",
        type=worker_counts,
        default="1",
        help="fan-out: gateway worker processes (--workers), e.g. 1,2 runs every size with 1, then 2",
    )
    args = parser.parse_args()
    if args.quick:
        args.fanout_seconds = min(args.fanout_seconds, 8.0)
    from gateway.server import install_uvloop

    install_uvloop()
    with tempfile.TemporaryDirectory(prefix="candle-bench-") as tmp:
        lines = asyncio.run(run(args, Path(tmp)))
    key = DevSigningKey.generate()
    if args.only in (None, "streams"):
        first, again = verify_cost_us(key)
        lines.append(row("token verification (warm cache, in process)", first, None, "µs"))
        lines.append(row("the same token presented again (remembered)", again, None, "µs"))
    header = [
        "command: make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.platform()}",
    ]
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
