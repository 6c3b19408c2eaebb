"""``python -m bench.send_floor``: the floor of fan-out, one small write to each of N loopback sockets.

What a follow cohort's pass costs with nothing of the gateway in it: a
uvloop server holds N TCP connections from a client process that reads them
all (as the fan-out bench's client does), and writes one 400-byte frame to
every connection in one loop (``transport.write``, one ``send`` each), a pass
every 200 ms. It prints the wall and CPU time of each pass: the gateway's
delivery of one event to N followers cannot take less.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import uvloop

from bench.fanout import raise_open_files
from gateway.devtools.ports import free_port

FRAME = b"x" * 400


async def _serve(followers: int, passes: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    all_connected = asyncio.Event()

    class Held(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]
            if len(transports) == followers:
                all_connected.set()

    server = await loop.create_server(Held, "127.0.0.1", port, backlog=4096)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.send_floor", "client", str(port), str(followers)
    )
    await all_connected.wait()
    walls, cpus = [], []
    for _ in range(passes):
        wall, cpu = time.perf_counter(), time.process_time()
        for transport in transports:
            transport.write(FRAME)
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
        await asyncio.sleep(0.2)
    client.terminate()
    server.close()
    print(
        f"{followers:,} sockets, {passes} passes: wall {min(walls):.0f}-{max(walls):.0f} ms"
        f" (median {statistics.median(walls):.0f}), CPU {min(cpus):.0f}-{max(cpus):.0f} ms"
        f" (median {statistics.median(cpus):.0f}): {statistics.median(cpus) / followers * 1000:.1f} µs CPU a write"
    )


async def _read_all(port: int, followers: int) -> None:
    loop = asyncio.get_running_loop()

    class Reader(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    for _ in range(followers):
        await loop.create_connection(Reader, "127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    raise_open_files()
    if sys.argv[1:2] == ["client"]:
        uvloop.run(_read_all(int(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.send_floor")
    parser.add_argument("--followers", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    uvloop.run(_serve(args.followers, args.passes, free_port()))


if __name__ == "__main__":
    main()
