"""The benchmark's server processes, and what they cost (CPU, memory), read from /proc.

A gateway with ``--workers N`` is a supervising parent and N forked workers:
every figure here is of a process together with its child processes, so
that one or several workers are measured alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from gateway.devtools.processes import start_server


@contextlib.asynccontextmanager
async def server_process(
    args: list[str], env: dict[str, str], port: int, log: Path, cwd: str | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``args`` with this environment plus ``env``, once ``port`` accepts; terminated on the way out."""
    process = await start_server(args, env={**os.environ, **env}, log=log, port=port, cwd=cwd)
    try:
        yield process
    finally:
        stopping = time.monotonic()
        process.terminate()
        # Ending 19,000 streams (a log line each) takes seconds; a stop that hangs is a failure.
        process.wait(timeout=60)
        print(f"{' '.join(args[1:4])}: exited {time.monotonic() - stopping:.1f} s after SIGTERM", file=sys.stderr)


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (a gateway's workers; a forked worker starts none of its own)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *children]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its child processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in family(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/<pid>/status (VmRSS: resident now, VmHWM: its peak), summed over the family."""
    return sum(_status_kib(member, field) for member in family(pid))


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


async def idle_follower_kib(url: str, pid: int, count: int, coding: str | None = None) -> float:
    """KiB of process ``pid``'s memory per idle follow stream of ``url`` (each past its snapshot).

    ``coding``: the streams' ``Accept-Encoding`` (None: aiohttp's default), checked on each answer.
    """
    headers = {} if coding is None else {"Accept-Encoding": coding}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        responses = []
        for _ in range(count):
            response = await session.get(url, headers=headers)
            if coding is not None:
                assert response.headers.get("Content-Encoding", "identity") == coding
            await response.content.readuntil(b"event: interval_complete")
            responses.append(response)
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        for response in responses:
            response.close()
    return (after - before) / count
