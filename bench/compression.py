"""``make bench BENCH_ARGS="--only compression"``: compressed streams against identity, side by side in one run.

One gateway (``python -m gateway serve``) serves a job of 3 intervals x
``--points`` random-walk candles (prices move by a few ticks, volumes vary:
JSON as varied as real candles, unlike the repeating series of the other
sections), read with ``Accept-Encoding`` identity, zstd and gzip in turn:

- bytes on the wire of the whole stream, per codec (decoded and checked);
- server CPU per whole stream, per codec (the gateway process's user+system
  time around each stream; rounds alternate the codecs), median and range;
- time to the whole chart through a throttled link: a userland TCP proxy of
  20 Mbit/s from server to client and 20 ms each way (40 ms round trip),
  from the request to the last event decoded;
- RSS per idle follow stream, per codec, each on a fresh gateway;
- gzip by other deflates (``--gzip-variants``, ``bench/gzip_variant.py``):
  each from a gateway of its own, its bytes and CPU in the same rounds, and
  in process, the deflate and CRC-32 alone on the stream's own events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from backports.zstd import ZstdDecompressor

from bench.gzip_variant import GzipVariant, swapped_in
from bench.gzip_variant import command as variant_command
from bench.processes import cpu_seconds, idle_follower_kib, server_process
from bench.seeding import INTERVALS, RandomWalk, write_idle_job, write_job
from gateway.compression import Codec
from gateway.devtools.dev_auth import DevSigningKey, mint_token
from gateway.devtools.ports import free_port
from gateway.devtools.processes import gateway_serve

JOB = "bench-compress-job"
IDLE_JOB = "bench-compress-idle"
CODINGS = ("identity", "zstd", "gzip")
LINK_BITS_PER_S = 20_000_000
ONE_WAY_S = 0.020


async def seed_random_walk(client: aioredis.Redis, points: int) -> None:
    """3 intervals x ``points`` random-walk candles (seeded: every run streams the same bytes)."""
    await write_job(client, JOB, points, status="completed", make=RandomWalk(seed=22))
    await write_idle_job(client, IDLE_JOB)


class Decoder:
    """A client's decoding of one body: gzip, or zstd of one or more frames."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._gzip = zlib.decompressobj(31) if coding == "gzip" else None
        self._zstd = ZstdDecompressor() if coding == "zstd" else None

    def decode(self, data: bytes) -> bytes:
        if self._gzip is not None:
            return self._gzip.decompress(data)
        if self._zstd is None:
            return data
        out = b""
        while data:
            if self._zstd.eof:
                self._zstd = ZstdDecompressor()
            out += self._zstd.decompress(data)
            data = self._zstd.unused_data if self._zstd.eof else b""
        return out


async def read_coded(session: aiohttp.ClientSession, url: str, coding: str) -> tuple[int, int, float]:
    """One whole stream in ``coding``: (bytes on the wire, points decoded, seconds to the last event decoded)."""
    started = time.perf_counter()
    wire = points = 0
    decoder, tail = Decoder(coding), b""
    async with session.get(url, headers={"Accept-Encoding": coding}) as response:
        assert response.status == 200, f"{url}: {response.status}"
        assert response.headers.get("Content-Encoding", "identity") == coding, response.headers
        async for block in response.content.iter_any():
            wire += len(block)
            plain = decoder.decode(block)
            window = tail + plain
            points += window.count(b'"time"') - tail.count(b'"time"')
            tail = plain[-16:] if len(plain) >= 16 else (tail + plain)[-16:]
    return wire, points, time.perf_counter() - started


async def read_plain(session: aiohttp.ClientSession, url: str) -> bytes:
    """One whole stream's body as sent uncoded."""
    async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
        assert response.status == 200, f"{url}: {response.status}"
        return await response.read()


class ThrottledLink:
    """A TCP proxy: server -> client at ``bits_per_s`` after ``one_way_s``, client -> server after ``one_way_s``.

    The bytes the server sends are queued at the link's rate (a bottleneck
    with a deep buffer), each read arriving ``one_way_s`` after it left.
    """

    def __init__(self, upstream_port: int, bits_per_s: float = LINK_BITS_PER_S, one_way_s: float = ONE_WAY_S) -> None:
        self._upstream_port = upstream_port
        self._bytes_per_s = bits_per_s / 8
        self._one_way_s = one_way_s
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ThrottledLink:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        up = asyncio.create_task(self._pipe(client_reader, server_writer, rate=None))
        down = asyncio.create_task(self._pipe(server_reader, client_writer, rate=self._bytes_per_s))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        link_free_at = 0.0

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(16384):
                now = loop.time()
                departs = max(now, link_free_at) + (len(data) / rate if rate else 0.0)
                link_free_at = departs
                queue.put_nowait((departs + self._one_way_s, data))
            queue.put_nowait((link_free_at + self._one_way_s, b""))
            await delivering
        finally:
            delivering.cancel()


def _shown(label: str) -> str:
    """A row's name: the gateway's gzip says which deflate it is, as the variants' rows do."""
    return f"gzip, {GzipVariant.gateways().label} (the gateway's)" if label == "gzip" else label


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:,.0f} ms ({min(values) * 1000:,.0f}-{max(values) * 1000:,.0f})"


async def compression_section(
    args: argparse.Namespace, work: Path, env: dict[str, str], key: DevSigningKey, client: aioredis.Redis
) -> list[str]:
    """The figures of docs/PERFORMANCE.md's "Compressed streams" section."""
    seeded = time.perf_counter()
    await seed_random_walk(client, args.points)
    print(
        f"compression: seeded 3 x {args.points} random-walk candles in {time.perf_counter() - seeded:.1f} s",
        file=sys.stderr,
    )
    token = mint_token(key, env["GATEWAY_AUTH_FIREBASE_PROJECT_ID"], "bench", lifetime_s=3600)
    query = f"intervals={','.join(INTERVALS)}&limit=50000&token={token}"
    port = free_port()
    variants = [GzipVariant.parse(spec) for spec in args.gzip_variants.split(",") if spec]
    lines: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        gateway = await stack.enter_async_context(
            server_process(gateway_serve(), {**env, "GATEWAY_SERVER_PORT": str(port)}, port, work / "compress.log")
        )
        # Each gzip variant from a gateway of its own, read in the same rounds as the gateway's codecs.
        variant_gateways: dict[GzipVariant, tuple[int, int]] = {}
        for n, variant in enumerate(variants):
            variant_port = free_port()
            process = await stack.enter_async_context(
                server_process(
                    variant_command(variant, "serve"),
                    {**env, "GATEWAY_SERVER_PORT": str(variant_port), "GATEWAY_METRICS_PORT": str(free_port())},
                    variant_port,
                    work / f"compress-variant-{n}.log",
                )
            )
            variant_gateways[variant] = (variant_port, process.pid)
        path = f"/api/sse/backtest/{JOB}/data/multi?{query}"
        url = f"http://127.0.0.1:{port}{path}"
        # (label, url, coding, pid): the gateway's own codecs, then the variants' gzip.
        readers = [(coding, url, coding, gateway.pid) for coding in CODINGS] + [
            (f"gzip, {variant.label}", f"http://127.0.0.1:{variant_port}{path}", "gzip", pid)
            for variant, (variant_port, pid) in variant_gateways.items()
        ]
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
            wire: dict[str, int] = {}
            cpu: dict[str, list[float]] = {label: [] for label, *_ in readers}
            for label, reader_url, coding, _ in readers:  # warm-up, and the byte counts
                wire[label], points, _ = await read_coded(session, reader_url, coding)
                assert points == 3 * args.points, (label, points)
            for _ in range(args.compress_runs):
                for label, reader_url, coding, pid in readers:
                    before = cpu_seconds(pid)
                    await read_coded(session, reader_url, coding)
                    cpu[label].append(cpu_seconds(pid) - before)
            plain = await read_plain(session, url)
            times: dict[str, list[float]] = {coding: [] for coding in CODINGS}
            async with ThrottledLink(port) as link:
                slow_url = url.replace(f":{port}/", f":{link.port}/")
                for _ in range(args.compress_link_runs):
                    for coding in CODINGS:
                        _, points, seconds = await read_coded(session, slow_url, coding)
                        assert points == 3 * args.points
                        times[coding].append(seconds)
    identity_cpu = statistics.median(cpu["identity"])
    identity_time = statistics.median(times["identity"])
    lines += [
        f"compressed streams: 3 x {args.points:,} random-walk candles, chunk_size 500;"
        f" CPU over {args.compress_runs} rounds, link ({LINK_BITS_PER_S / 1e6:.0f} Mbit/s,"
        f" {2 * ONE_WAY_S * 1000:.0f} ms"
        f" round trip) over {args.compress_link_runs} (codecs alternating)",
        "",
        "| codec | bytes on the wire | fewer than identity | server CPU per stream (median, range) |"
        " CPU vs identity | time to the whole chart through the link (median, range) | vs identity |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, *_ in readers:
        through_link = (
            f" {_ms(times[label])} | {statistics.median(times[label]) / identity_time:.2f}x |"
            if label in times
            else " - | - |"
        )
        lines.append(
            f"| {_shown(label)} | {wire[label] / 1e6:.2f} MB | {wire['identity'] / wire[label]:.1f}x |"
            f" {_ms(cpu[label])} | {statistics.median(cpu[label]) / identity_cpu:.2f}x |{through_link}"
        )
    if variants:
        lines += ["", *deflate_alone(plain, variants, args.compress_runs)]
    lines += ["", *live_options(variants=variants)]
    if args.compress_idle:
        lines += ["", "| codec | RSS per idle follow stream |", "|---|---|"]
        for coding in CODINGS:
            idle_port = free_port()
            idle_env = {**env, "GATEWAY_SERVER_PORT": str(idle_port)}
            async with server_process(gateway_serve(), idle_env, idle_port, work / f"idle-{coding}.log") as gateway:
                url = f"http://127.0.0.1:{idle_port}/api/sse/backtest/{IDLE_JOB}/data/multi?intervals=day&follow=true&token={token}"
                per = await idle_follower_kib(url, gateway.pid, args.compress_idle, coding)
            lines.append(f"| {coding} | {per:.1f} KiB ({args.compress_idle:,} followers) |")
    return lines


def deflate_alone(plain: bytes, variants: Sequence[GzipVariant], rounds: int) -> list[str]:
    """The gzip coding alone, in process: the stream's own events coded one write each, and their CRC-32.

    The gateway's gzip and each variant on the same events, in alternating
    rounds (median and range of CPU time); the bytes are checked to decode.
    """
    from gateway import compression

    events = [event + b"\n\n" for event in plain.split(b"\n\n") if event]
    assert b"".join(events) == plain
    own = f"{GzipVariant.gateways().label} (the gateway's)"
    options: list[tuple[str, GzipVariant | None]] = [(own, None), *((variant.label, variant) for variant in variants)]
    cpu: dict[str, list[float]] = {label: [] for label, _ in options}
    crc: dict[str, list[float]] = {label: [] for label, _ in options}
    size: dict[str, int] = {}
    for _ in range(max(rounds, 1)):
        for label, variant in options:
            with swapped_in(variant) if variant else contextlib.nullcontext():
                encoder = compression.encoder_for(compression.Codec.GZIP)
                assert encoder is not None
                started = time.process_time()
                coded = [encoder.encode(event) for event in events]
                coded.append(encoder.finish())
                cpu[label].append(time.process_time() - started)
                crc32 = compression._crc32  # the module's own, as its encoders call it
                started, value = time.process_time(), 0
                for event in events:
                    value = crc32(event, value)
                crc[label].append(time.process_time() - started)
            body = b"".join(coded)
            assert zlib.decompress(body, 31) == plain, label
            size[label] = len(body)
    lines = [
        f"gzip alone, in process: the stream's {len(plain) / 1e6:.2f} MB as {len(events):,} events,"
        f" each coded and sync-flushed as one write ({max(rounds, 1)} rounds, alternating)",
        "",
        "| gzip | bytes | fewer than identity | CPU (median, range) | vs the gateway's | CRC-32 alone (median) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _ in options:
        lines.append(
            f"| {label} | {size[label] / 1e6:.2f} MB | {len(plain) / size[label]:.1f}x | {_ms(cpu[label])} |"
            f" {statistics.median(cpu[label]) / statistics.median(cpu[own]):.2f}x |"
            f" {statistics.median(crc[label]) * 1000:.1f} ms |"
        )
    return lines


def live_options(followers: int = 2000, events: int = 20, variants: Sequence[GzipVariant] = ()) -> list[str]:
    """Encode once, write many under compression, measured in process: one compressor per follower, or one shared.

    A live event (one candle, ~330 bytes) to ``followers`` followers of one
    job, each of whose own compressors first took a 500-candle snapshot
    chunk (its history). Per event: CPU of the coding for all followers and
    the bytes each receives; per follower: the compressor's memory.
    """
    rng = random.Random(7)
    snapshot = b"event: data_chunk\ndata: {" + b",".join(
        b'{"time":"2020-01-01T%02d:%02d:00Z","open":%.2f,"high":%.2f,"low":%.2f,"close":%.2f,"volume":%d}'
        % (i // 60 % 24, i % 60, 1000 + rng.random(), 1001 + rng.random(), 999 + rng.random(), 1000 + rng.random(),
           rng.randint(100, 900_000))
        for i in range(500)
    ) + b"}\n\n"  # fmt: skip

    def live_event(n: int) -> bytes:
        return (
            b'id: 3.0.1.%d\nevent: data_chunk\ndata: {"interval":"minute",'
            b'"data_points":[{"time":"2020-01-02T00:%02d:00Z",'
            b'"open":%.2f,"high":%.2f,"low":%.2f,"close":%.2f,"volume":%d}],"points_sent":%d,"total_points":%d,'
            b'"chunk_index":%d,"is_last_chunk":false,"is_partial":true,"current_bar":%d,"job_status":"running"}\n\n'
            % (n, n % 60, 1000 + rng.random(), 1001 + rng.random(), 999 + rng.random(), 1000 + rng.random(),
               rng.randint(100, 900_000), 500 + n, 500 + n, 1 + n, n)
        )  # fmt: skip

    lines = [
        f"encode once, write many: a one-candle live event ({len(live_event(0))} bytes) to {followers:,} followers"
        f" of one job, {events} events (in process)",
        "",
        "| codec | option | CPU per event for all followers | bytes per follower per event |"
        " compressor memory per follower |",
        "|---|---|---|---|---|",
    ]
    rows: list[tuple[Codec, str, GzipVariant | None]] = [
        (Codec.ZSTD, "zstd", None),
        (Codec.GZIP, _shown("gzip"), None),
        *((Codec.GZIP, f"gzip, {variant.label}", variant) for variant in variants),
    ]
    for codec, label, variant in rows:
        with swapped_in(variant) if variant else contextlib.nullcontext():
            lines += _live_rows(codec, label, followers, events, snapshot, live_event)
    return lines


def _live_rows(
    codec: Codec, label: str, followers: int, events: int, snapshot: bytes, live_event: Callable[[int], bytes]
) -> list[str]:
    from gateway.compression import LiveEncoder, encoder_for

    own = [encoder_for(codec) for _ in range(followers)]
    rss0 = _rss_kib_self()
    # zlib's and zlib-ng's allocations are traced (zstd's are not): an earlier row's freed
    # memory taken again shows no RSS growth, so the larger of the two counts.
    tracemalloc.start()
    for encoder in own:
        assert encoder is not None
        encoder.encode(snapshot)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_follower_kib = max(_rss_kib_self() - rss0, traced / 1024) / followers
    started, size = time.process_time(), 0
    for n in range(events):
        frame = live_event(n)
        for encoder in own:
            assert encoder is not None
            size += len(encoder.encode(frame))
    own_cpu = (time.process_time() - started) / events
    own_bytes = size / events / followers
    for encoder in own:
        assert encoder is not None
        encoder.hand_over()  # frees each compressor, as boarding a hub group does
    del own
    shared = LiveEncoder(codec)
    riders = [encoder_for(codec) for _ in range(followers)]
    started, size = time.process_time(), 0
    for n in range(events):
        frame = live_event(n)
        coded = shared.encode(frame)
        for rider in riders:
            assert rider is not None
            rider.took(frame, shared)  # gzip's CRC-32 and length; nothing for zstd
        size += len(coded)
    shared_cpu = (time.process_time() - started) / events
    return [
        f"| {label} | a compressor per follower | {own_cpu * 1000:.2f} ms | {own_bytes:.0f} |"
        f" {per_follower_kib:.0f} KiB (freed when it boards) |",
        f"| {label} | one shared per group (chosen) | {shared_cpu * 1000:.2f} ms | {size / events:.0f} | 0 |",
    ]


def _rss_kib_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
