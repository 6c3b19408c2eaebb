"""nchan (nginx's pub/sub module) as the fan-out's yardstick: ``make bench BENCH_ARGS="--only fanout --fanout-nchan"``.

One nginx worker (``worker_processes 1``, against one gateway process)
serves EventSource subscribers at ``/sub/<job>`` and takes publications at
``/pub/<job>``; the bench's appender posts one message per job every 200
ms, the body a gateway ``data_chunk`` of one candle would carry (same
size, same ``points_sent``), and nchan names the event ``data_chunk``: the
raw-socket client of ``bench/fanout.py`` reads both servers alike. nchan
neither authenticates nor sends a snapshot, so its connect cost is the
floor of a bare subscription.

The Debian package ``libnginx-mod-nchan`` is installed with apt-get where
it is missing (as root; otherwise the nchan rows are skipped, saying why).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from bench.fanout import APPEND_EVERY_S, job_id
from bench.processes import server_process

MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def ensure_nchan() -> str | None:
    """None when nginx and nchan are there (installing the package if need be), else why not."""
    if shutil.which("nginx") and MODULE.exists():
        return None
    if shutil.which("apt-get") is None:
        return "no apt-get to install libnginx-mod-nchan"
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "libnginx-mod-nchan"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or not MODULE.exists():
        return f"apt-get install libnginx-mod-nchan failed: {done.stderr.strip()[-200:]}"
    return None


def _config(work: Path, port: int) -> str:
    return f"""
load_module {MODULE};
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 40000; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    nchan_max_reserved_memory 256M;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/sub/([\\w-]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_eventsource_event data_chunk;
            nchan_subscriber_first_message newest;
        }}
        location ~ ^/pub/([\\w-]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 4;
            nchan_message_timeout 60s;
        }}
    }}
}}
"""


def _write_config(work: Path, port: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(_config(work, port))
    return conf


@contextlib.asynccontextmanager
async def nchan_server(work: Path, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """nginx with nchan, one worker, on ``port``; yields the master (its worker is its child)."""
    conf = _write_config(work, port)
    command = ["nginx", "-c", str(conf), "-p", str(work)]
    async with server_process(command, {}, port, work / "nginx.log") as master:
        yield master


def message(points_sent: int) -> bytes:
    """What a gateway data_chunk of one daily candle carries, with this ``points_sent``."""
    return (
        b'{"interval":"day","data_points":[{"time":"2020-01-02T00:00:00Z","open":1.0,"high":2.0,'
        b'"low":0.5,"close":1.5,"volume":10}],"points_sent":%d,"total_points":%d,"chunk_index":%d,'
        b'"is_last_chunk":false,"is_partial":true,"current_bar":null,"job_status":"running",'
        b'"progress":{"total_intervals":1,"completed_intervals":["day"],"current_interval":"day",'
        b'"overall_progress":{"day":{"total_points":%d,"total_chunks":%d,"chunks_sent":%d,"points_sent":%d}}}}'
    ) % ((points_sent,) * 7)


async def publish_for(port: int, jobs: int, duration_s: float) -> dict[tuple[int, int], float]:
    """One publication per job every 200 ms, jobs spread over the period; (job, points_sent) -> time."""
    appended: dict[tuple[int, int], float] = {}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> None:
            await asyncio.sleep(APPEND_EVERY_S * n / jobs)
            length, tick = 1, loop.time()
            url = f"http://127.0.0.1:{port}/pub/{job_id(n)}"
            while tick < stop_at:
                length += 1
                at = time.time()
                async with session.post(url, data=message(length)) as response:
                    assert response.status in (200, 201, 202), response.status
                appended[(n, length)] = at
                tick += APPEND_EVERY_S
                await asyncio.sleep(max(0.0, tick - loop.time()))

        await asyncio.gather(*(one(n) for n in range(jobs)))
    return appended
