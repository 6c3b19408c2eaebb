"""``make bench BENCH_ARGS="--only fanout"``: many live followers on one gateway.

For each size (followers x jobs) it starts a fresh gateway (``python -m
gateway serve``, one process, or with ``--fanout-workers 1,2`` one run with
each ``--workers`` count) on one embedded Valkey, and a raw-socket client in
a process of its own (``python -m bench.fanout client``) that opens the
follow streams (one connection each: SO_REUSEPORT spreads them over the
workers; the row says how), then:

- connect: how many follow streams a second the gateway accepted (each
  counted once its snapshot's ``interval_complete`` arrived), opened
  ``--fanout-connect-concurrency`` at a time (64);
- idle: gateway CPU and the gateway's Redis reads per second (commandstats
  of the read commands) while nothing is appended, and memory per follower
  (CPU and memory of all the gateway's processes: with workers, the parent
  and its workers);
- live: one append per job every 200 ms (``JobWriter``, as a worker would)
  for the run's duration; delivered fraction (appended points that reached
  every follower within 2 s of the last append), append -> receipt
  p50/p95/p99, gateway CPU, the gateway's Redis reads per second, data_chunk
  events per second, ``connection_error`` events and refused (non-200)
  streams, and the client's own CPU (to show it is not the bottleneck).

With ``--fanout-nchan`` each size also runs nchan (``bench/nchan.py``: nginx's
pub/sub module, one worker) in the gateway's place, same client, same
message sizes, one publication per job every 200 ms: the yardstick of the
issue that asked for the hub.

With ``--fanout-floor`` each size first runs ``bench/floor.py``'s follow
mode in the gateway's place (same client, appender and Valkey): the least
a follow server can do per append, for reading the gateway's row against.

Times are wall-clock (``time.time()``) in both processes, on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import aiohttp
import redis.asyncio as aioredis

from bench.compression import Decoder
from bench.processes import cpu_seconds, rss_kib, server_process
from gateway.devtools.dev_auth import DevSigningKey, mint_token
from gateway.devtools.ports import free_port, free_port_block
from gateway.devtools.processes import gateway_serve, wait_for_port
from gateway.workers import JobWriter, candle

APPEND_EVERY_S = 0.2
START = datetime(2020, 1, 1, tzinfo=UTC)


def raise_open_files() -> None:
    """Up to the hard limit: 10,000 sockets on each side need more than the usual 1,024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def job_id(n: int) -> str:
    return f"fanout-{n}"


# -- the client process ---------------------------------------------------------


class _Follower(asyncio.Protocol):
    """One follow stream read off a raw socket: only the live data_chunk's points_sent is parsed."""

    def __init__(
        self, client: _Client, follower: int, request: bytes, coding: str = "identity", *, live_at_once: bool = False
    ) -> None:
        self._client = client
        self._follower = follower
        self._request = request
        self._live_at_once = live_at_once  # no snapshot (nchan): live from the response's status line
        self._buffer = b""
        self._head = b""
        # A compressed stream (--coding): the chunked body de-framed and decoded before the events are split.
        self._decoder = None if coding == "identity" else Decoder(coding)
        self._raw = b""
        self._in_body = False
        self._chunk_left = 0
        self._skip = 0
        self._arrived: list[tuple[float, bytes]] = []  # coded reads, stamped, not yet decoded
        self.ready = asyncio.get_running_loop().create_future()
        self.status_ok: bool | None = None
        self.live = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self._request)  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self.status_ok is None:
            head = self._head + data
            if b"\r\n" not in head:
                self._head = head
                return
            self.status_ok = head.startswith(b"HTTP/1.1 200")
            if not self.status_ok:
                self._client.refused += 1
                self._done()
                return
            if self._live_at_once:
                self.live = True
                self._done()
            data, self._head = head, b""
        if self._decoder is not None:
            # Stamped now, decoded once this poll's reads are all stamped: a burst of
            # 10,000 coded reads would otherwise stamp its last ones late by the
            # decoding of the first (the client's cost, not the gateway's latency).
            if not self._arrived:
                asyncio.get_running_loop().call_soon(self._decode_arrived)
            self._arrived.append((time.time(), data))
            return
        self._events(data, time.time())

    def _decode_arrived(self) -> None:
        arrived, self._arrived = self._arrived, []
        for at, data in arrived:
            self._events(self._decoded(data), at)

    def _events(self, data: bytes, now: float) -> None:
        buffer = self._buffer + data
        *events, self._buffer = buffer.split(b"\n\n")
        for event in events:
            if not self.live:
                if b"event: interval_complete" in event:
                    self.live = True
                    self._done()
                continue
            if b"event: data_chunk" in event:
                at = event.find(b'"points_sent":') + 14
                self._client.record(self._follower, int(event[at : event.find(b",", at)]), now)
            elif b"connection_error" in event:
                self._client.connection_errors += 1

    def _decoded(self, data: bytes) -> bytes:
        """The decoded body bytes in ``data`` (headers skipped, chunk framing removed)."""
        raw = self._raw + data
        if not self._in_body:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return b""
            raw, self._in_body = raw[end + 4 :], True
        body = []
        while raw:
            if self._chunk_left:
                body.append(raw[: self._chunk_left])
                taken = len(body[-1])
                raw, self._chunk_left = raw[taken:], self._chunk_left - taken
                self._skip = 2 if not self._chunk_left else 0  # the CRLF after a chunk's data
            elif self._skip:
                skipped = min(self._skip, len(raw))
                raw, self._skip = raw[skipped:], self._skip - skipped
            else:
                end = raw.find(b"\r\n")
                if end < 0:
                    break
                self._chunk_left, raw = int(raw[:end], 16), raw[end + 2 :]
                if not self._chunk_left:
                    raw = b""  # the body's end
        self._raw = raw
        assert self._decoder is not None
        return self._decoder.decode(b"".join(body))

    def _done(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.live:
            self._client.closed += 1
        self._done()


class _Client:
    def __init__(self) -> None:
        self.followers = array("I")
        self.points = array("I")
        self.times = array("d")
        self.refused = self.connection_errors = self.closed = 0

    def record(self, follower: int, points_sent: int, at: float) -> None:
        self.followers.append(follower)
        self.points.append(points_sent)
        self.times.append(at)


async def _client_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    client = _Client()
    transports: list[asyncio.BaseTransport] = []
    in_flight = asyncio.Semaphore(args.concurrency)

    async def open_one(n: int) -> None:
        job = n % args.jobs
        path = f"/api/sse/backtest/{job_id(job)}/data/multi?intervals=day&follow=true&token={args.token}"
        if args.nchan:
            path = f"/sub/{job_id(job)}"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Accept-Encoding: {args.coding}\r\n\r\n"
        ).encode()
        async with in_flight:
            transport, follower = await loop.create_connection(
                lambda: _Follower(client, n, request, args.coding, live_at_once=args.nchan), "127.0.0.1", args.port
            )
            transports.append(transport)
            await follower.ready

    started, cpu_started = time.time(), time.process_time()
    await asyncio.gather(*(open_one(n) for n in range(args.followers)))
    connect_s, connect_cpu_s = time.time() - started, time.process_time() - cpu_started
    print(json.dumps({"connect_s": connect_s, "connect_cpu_s": connect_cpu_s, "refused": client.refused}), flush=True)
    # Wait for the bench to say stop (a line on stdin), reading streams meanwhile.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()
    _write_records(client, Path(args.out))
    print(
        json.dumps({"connection_errors": client.connection_errors, "closed": client.closed, "refused": client.refused}),
        flush=True,
    )
    for transport in transports:
        transport.close()


def _write_records(client: _Client, path: Path) -> None:
    with path.open("wb") as out:
        for column in (client.followers, client.points, client.times):
            out.write(len(column).to_bytes(8, "little"))
            column.tofile(out)


def client_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--followers", type=int, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--nchan", action="store_true", help="subscribe to nchan's /sub/<job> instead")
    parser.add_argument("--coding", default="identity", help="Accept-Encoding of every follower: identity, gzip, zstd")
    args = parser.parse_args(argv)
    raise_open_files()
    from gateway.server import install_uvloop

    install_uvloop()
    asyncio.run(_client_main(args))


def _read_records(path: Path) -> tuple[array[int], array[int], array[float]]:
    jobs, points, times = array("I"), array("I"), array("d")
    with path.open("rb") as source:
        for column in (jobs, points, times):
            count = int.from_bytes(source.read(8), "little")
            column.fromfile(source, count)
    return jobs, points, times


# -- the bench side ---------------------------------------------------------------


@dataclass
class FanoutResult:
    followers: int
    jobs: int
    connect_per_s: float
    # CPU per new stream while they connect (ms), the gateway's and the client's: what a
    # connect rate would be with a core each, which the shared 2 cores cannot show.
    connect_cpu_ms: float
    client_connect_cpu_ms: float
    refused: int
    idle_cpu: float
    idle_redis_per_s: float
    rss_per_follower_kib: float
    live_cpu: float = 0.0
    live_redis_per_s: float = 0.0
    delivered: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    connection_errors: int = 0
    events_per_s: float = 0.0
    label: str = ""
    client_cpu: float = 0.0
    followers_per_worker: list[int] = field(default_factory=list)  # with --workers > 1


# What the gateway reads with (HGETALL, LRANGE, HMGET are the gateway's alone; the
# workers' LLEN, one per append, is subtracted): the appends' own commands are not counted.
_READS = ("hgetall", "lrange", "hmget", "llen", "evalsha")


async def _commands(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {"calls": 0})["calls"]) for name in _READS)


async def _seed(client: aioredis.Redis, jobs: int) -> list[JobWriter]:
    writers = []
    for n in range(jobs):
        await client.delete(f"job:{{{job_id(n)}}}", f"job:{{{job_id(n)}}}:candles:day")
        writer = JobWriter(client, job_id(n))
        await writer.create(user_id="bench", symbol="LTF", exchange="NSE", intervals=["day"], status="running")
        await writer.append("day", [candle(START, 1.0, 2.0, 0.5, 1.5, 10)])
        writers.append(writer)
    return writers


async def _append_for(writers: list[JobWriter], duration_s: float) -> dict[tuple[int, int], float]:
    """One append per job every 200 ms, jobs spread over the period; (job, new length) -> time."""
    appended: dict[tuple[int, int], float] = {}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s

    async def one(n: int, writer: JobWriter) -> None:
        await asyncio.sleep(APPEND_EVERY_S * n / len(writers))
        length, tick = 1, loop.time()
        while tick < stop_at:
            at = time.time()
            bar = candle(START + timedelta(days=length), 1.0, 2.0, 0.5, 1.5, 10)
            length = await writer.append("day", [bar])
            appended[(n, length)] = at
            tick += APPEND_EVERY_S
            await asyncio.sleep(max(0.0, tick - loop.time()))

    await asyncio.gather(*(one(n, writer) for n, writer in enumerate(writers)))
    return appended


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _start_client(
    port: int,
    token: str,
    followers: int,
    jobs: int,
    out: Path,
    concurrency: int,
    nchan: bool = False,
    coding: str = "identity",
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.fanout", "client", "--port", str(port), "--token", token,
         "--followers", str(followers), "--jobs", str(jobs), "--out", str(out),
         "--concurrency", str(concurrency), "--coding", coding, *(["--nchan"] if nchan else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip


async def run_size(
    followers: int,
    jobs: int,
    duration_s: float,
    *,
    redis_client: aioredis.Redis,
    gateway_pid: int,
    port: int,
    token: str,
    work: Path,
    idle_s: float = 5.0,
    workers: int = 1,
    metrics_port: int = 0,
    connect_concurrency: int = 64,
    nchan: bool = False,
    coding: str = "identity",
) -> FanoutResult:
    writers = [] if nchan else await _seed(redis_client, jobs)
    out = work / f"fanout-{followers}x{jobs}.bin"
    # Summed over the gateway's processes. With workers this includes what each forked worker
    # faults in of the shared libraries on its first streams (about 10 MiB each on the bench
    # machine, VmRSS's RssFile part): a fixed cost that small sizes spread over few followers.
    rss_before = rss_kib(gateway_pid)
    connect_cpu0 = cpu_seconds(gateway_pid)
    client = _start_client(port, token, followers, jobs, out, connect_concurrency, nchan, coding)
    assert client.stdin is not None and client.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        connected = json.loads(await loop.run_in_executor(None, client.stdout.readline))
        connect_cpu_s = cpu_seconds(gateway_pid) - connect_cpu0
        await asyncio.sleep(1.0)
        rss_after = rss_kib(gateway_pid)
        # Outside the idle window: how SO_REUSEPORT spread the connections.
        spread = await _followers_per_worker(metrics_port, workers) if workers > 1 else []
        cpu0, commands0, t0 = cpu_seconds(gateway_pid), await _commands(redis_client), time.time()
        await asyncio.sleep(idle_s)
        cpu1, commands1, t1 = cpu_seconds(gateway_pid), await _commands(redis_client), time.time()
        result = FanoutResult(
            followers=followers,
            jobs=jobs,
            connect_per_s=followers / connected["connect_s"],
            connect_cpu_ms=connect_cpu_s * 1000 / followers,
            client_connect_cpu_ms=connected["connect_cpu_s"] * 1000 / followers,
            refused=connected["refused"],
            idle_cpu=(cpu1 - cpu0) / (t1 - t0),
            idle_redis_per_s=(commands1 - commands0) / (t1 - t0),
            rss_per_follower_kib=(rss_after - rss_before) / followers,
            followers_per_worker=spread,
        )
        if duration_s <= 0:
            return result
        client_cpu0 = cpu_seconds(client.pid)
        if nchan:
            from bench.nchan import publish_for

            appended = await publish_for(port, jobs, duration_s)
        else:
            appended = await _append_for(writers, duration_s)
        await asyncio.sleep(2.0)  # the last appends' deliveries
        cpu2, commands2, t2 = cpu_seconds(gateway_pid), await _commands(redis_client), time.time()
        result.client_cpu = (cpu_seconds(client.pid) - client_cpu0) / (t2 - t1)
        client.stdin.write(b"stop\n")
        client.stdin.flush()
        ended = json.loads(await loop.run_in_executor(None, client.stdout.readline))
    finally:
        if client.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                client.stdin.close()
            await loop.run_in_executor(None, client.wait)
    result.live_cpu = (cpu2 - cpu1) / (t2 - t1)
    result.live_redis_per_s = (commands2 - commands1 - len(appended)) / (t2 - t1)
    result.connection_errors = ended["connection_errors"]
    result.refused += ended["refused"]
    followers_col, points_col, times_col = _read_records(out)
    out.unlink()
    latencies: list[float] = []
    seen = [1] * followers  # points each follower had before the live part (the seeded one)
    for follower, points, at in zip(followers_col, points_col, times_col, strict=True):
        job = follower % jobs
        # One chunk may carry several appends: each counts from its own append.
        latencies.extend(at - appended[(job, k)] for k in range(seen[follower] + 1, points + 1) if (job, k) in appended)
        seen[follower] = max(seen[follower], points)
    per_job = [0] * jobs
    for job, _ in appended:
        per_job[job] += 1
    expected = sum(per_job[follower % jobs] for follower in range(followers))
    latencies.sort()
    result.delivered = len(latencies) / expected if expected else float("nan")
    result.p50_ms = _percentile(latencies, 0.5) * 1000
    result.p95_ms = _percentile(latencies, 0.95) * 1000
    result.p99_ms = _percentile(latencies, 0.99) * 1000
    received_points = len(points_col)
    result.events_per_s = received_points / duration_s
    return result


def table(results: Sequence[FanoutResult]) -> list[str]:
    lines = [
        "| followers x jobs | connect /s | CPU / connect: gateway, client | idle CPU | idle Redis reads/s |"
        " RSS / follower | delivered |"
        " append -> receipt p50 / p95 / p99 | live CPU | live Redis reads/s | events /s |"
        " connection_error / refused | client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        live = (
            f"{r.delivered:.2%} | {r.p50_ms:.0f} / {r.p95_ms:.0f} / {r.p99_ms:.0f} ms | {r.live_cpu:.0%} |"
            f" {r.live_redis_per_s:,.0f} | {r.events_per_s:,.0f}"
            if r.events_per_s
            else "- | - | - | - | -"
        )
        lines.append(
            f"| {r.followers:,} x {r.jobs:,}{' ' + r.label if r.label else ''}"
            f" | {r.connect_per_s:,.0f} | {r.connect_cpu_ms:.2f}, {r.client_connect_cpu_ms:.2f} ms"
            f" | {r.idle_cpu:.1%} | {r.idle_redis_per_s:,.0f} |"
            f" {r.rss_per_follower_kib:.1f} KiB | {live} | {r.connection_errors} / {r.refused} | {r.client_cpu:.0%} |"
        )
    return lines


SIZES = ((1000, 1), (10_000, 1), (10_000, 100))


@dataclass(frozen=True)
class _Run:
    """One gateway process and its followers: a row of the table."""

    followers: int
    jobs: int
    workers: int
    source: str | None = None  # another source tree's gateway (--fanout-baseline)
    idle_only: bool = False
    floor: bool = False  # bench/floor.py's follow mode instead of a gateway (--fanout-floor)
    nchan: bool = False  # nchan (bench/nchan.py) instead of a gateway (--fanout-nchan)
    coding: str = "identity"  # the followers' Accept-Encoding (--fanout-codings)


def _runs(args: argparse.Namespace, worker_counts: Sequence[int]) -> list[_Run]:
    """Each size: the floor, then each worker count (the baseline just before each); then the idle followers."""
    sizes = list(SIZES)
    if args.fanout_sizes:
        sizes = [tuple(int(x) for x in size.split("x")) for size in args.fanout_sizes.split(",")]  # type: ignore[misc]
    sources = [args.fanout_baseline, None] if args.fanout_baseline else [None]
    runs = []
    for followers, jobs in sizes:
        if args.fanout_floor:
            runs.append(_Run(followers, jobs, 1, floor=True))
        if args.fanout_nchan:
            runs.append(_Run(followers, jobs, 1, nchan=True))
        codings = [coding.strip() for coding in getattr(args, "fanout_codings", "identity").split(",")]
        runs += [
            _Run(followers, jobs, w, source, coding=coding)
            for w in worker_counts
            for source in sources
            for coding in codings
        ]
    runs += [_Run(args.fanout_idle, 1, w, idle_only=True) for w in worker_counts]
    return [run for run in runs if run.followers > 0]


def worker_counts(option: str) -> list[int]:
    """``--fanout-workers`` as numbers: "1,2" -> [1, 2]."""
    counts = [int(count) for count in option.split(",")]
    if not counts or min(counts) < 1:
        raise ValueError(f"--fanout-workers {option}: worker counts are 1 or more")
    return counts


def _check_baseline_workers(source: str, counts: Sequence[int]) -> None:
    """Stop at once, not after an hour of runs, if the baseline tree cannot run the worker counts asked for."""
    if max(counts) == 1:
        return
    help_text = subprocess.run(
        [*gateway_serve(), "--help"],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,  # a tree whose help fails cannot run workers either
    ).stdout
    if "--workers" not in help_text:
        raise SystemExit(f"--fanout-baseline {source} has no --workers: run it with --fanout-workers 1")


async def _followers_per_worker(metrics_port: int, workers: int) -> list[int]:
    """Each worker's ``gateway_followers`` gauge, from its /metrics (worker i: metrics.port + i)."""
    counts = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index in range(workers):
            async with session.get(f"http://127.0.0.1:{metrics_port + index}/metrics") as response:
                text = await response.text()
            gauge = next(line for line in text.splitlines() if line.startswith("gateway_followers "))
            counts.append(round(float(gauge.split()[1])))
    return counts


def _label(run: _Run, counts: Sequence[int], followers_per_worker: Sequence[int]) -> str:
    """ "(2 workers: 503 + 497 followers) baseline"; no worker part when only the default single worker runs."""
    parts = []
    if list(counts) != [1]:
        spread = f": {' + '.join(f'{n:,}' for n in followers_per_worker)} followers" if run.workers > 1 else ""
        parts.append(f"({run.workers} worker{'s' if run.workers > 1 else ''}{spread})")
    if run.source:
        parts.append("baseline")
    if run.coding != "identity":
        parts.append(run.coding)
    if run.floor:
        return "floor (bench/floor.py, 1 process)"
    if run.nchan:
        return "nchan (nginx, 1 worker)"
    return " ".join(parts)


async def fanout_section(
    args: argparse.Namespace, work: Path, redis_url: str, certs_url: str, project: str, key: DevSigningKey
) -> list[str]:
    """Every size on a fresh gateway (with each ``--fanout-workers`` count), then 19,000 idle followers."""
    raise_open_files()
    token = mint_token(key, project, "bench", lifetime_s=3600)
    duration = args.fanout_seconds
    counts: list[int] = args.fanout_workers
    if args.fanout_baseline:
        _check_baseline_workers(args.fanout_baseline, counts)
    client = aioredis.Redis.from_url(redis_url)
    results = []
    notes = []
    if args.fanout_nchan:
        from bench.nchan import ensure_nchan

        if (why := ensure_nchan()) is not None:
            notes.append(f"nchan rows skipped: {why}")
            args.fanout_nchan = False
    try:
        for run in _runs(args, counts):
            port = free_port()
            env = {
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_AUTH_CERTS_URL": certs_url,
                "GATEWAY_AUTH_FIREBASE_PROJECT_ID": project,
                "GATEWAY_SERVER_PORT": str(port),
                "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
                "GATEWAY_SERVER_ACCESS_LOG": "false",
                # Thousands of open streams: no grace, or stopping the gateway outlasts the bench's wait.
                "GATEWAY_SERVER_SHUTDOWN_GRACE_S": "0",
            }
            command = gateway_serve(*(["--workers", str(run.workers)] if run.workers > 1 else []))
            metrics_port = free_port_block(run.workers)
            # Not the default 9090, which another gateway on this machine may hold. A baseline tree
            # may predate metrics.port (an unknown setting stops start-up), unless it has --workers,
            # which came with it.
            if run.source is None or run.workers > 1:
                env["GATEWAY_METRICS_PORT"] = str(metrics_port)
            name = f"fanout-{run.followers}x{run.jobs}-{run.workers}w{'-baseline' if run.source else ''}-{run.coding}"
            if run.floor:
                name += "-floor"
                command = [sys.executable, "-m", "bench.floor", "--redis-url", redis_url, "--port", str(port)]
            if os.environ.get("BENCH_PROFILE") and not run.floor:  # a pyinstrument profile of each gateway
                profile = Path(os.environ["BENCH_PROFILE"]) / f"{name}.txt"  # of the parent only, with workers
                # main(), not `-m gateway`: its run() leaves with os._exit, before pyinstrument writes.
                program = "import sys; from gateway.__main__ import main; sys.exit(main())"
                command = [sys.executable, "-m", "pyinstrument", "-o", str(profile), "-c", program, *command[3:]]
            # The baseline runs in its own tree: ``python -m`` puts the working directory first on
            # sys.path, ahead of PYTHONPATH, so from here it would run this tree's gateway.
            if run.nchan:
                from bench.nchan import nchan_server

                server = nchan_server(work / f"{name}-nginx", port)
            else:
                server = server_process(command, env, port, work / f"{name}.log", cwd=run.source)
            async with server as gateway:
                await asyncio.sleep(0.5)
                # Every worker listening (it binds the public port before its metrics port):
                # until then SO_REUSEPORT gives every connection to the ones that do.
                for index in range(1, run.workers):
                    await wait_for_port(metrics_port + index, gateway)
                result = await run_size(
                    run.followers,
                    run.jobs,
                    0 if run.idle_only else duration,
                    redis_client=client,
                    gateway_pid=gateway.pid,
                    port=port,
                    token=token,
                    work=work,
                    workers=run.workers,
                    metrics_port=metrics_port,
                    connect_concurrency=args.fanout_connect_concurrency,
                    nchan=run.nchan,
                    coding=run.coding,
                )
                result.label = _label(run, counts, result.followers_per_worker)
                print(table([result])[-1], file=sys.stderr)
                results.append(result)
    finally:
        await client.aclose()
    processes = (
        "one gateway process"
        if counts == [1]
        else f"gateway with {' / '.join(map(str, counts))} worker processes (CPU and RSS: all of its processes)"
    )
    return [
        f"fan-out: one append per job every {APPEND_EVERY_S * 1000:.0f} ms for {duration:.0f} s;"
        f" {processes}; raw-socket client in its own process",
        *notes,
        "",
        *table(results),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_command(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m bench.fanout client ... (make bench BENCH_ARGS='--only fanout' runs it)")
