"""Running the application: workers, event loop, the metrics port, graceful shutdown.

``serve`` runs one process, or (``server.workers`` / ``--workers`` > 1) a
parent that forks N workers which all listen on the same port
(``SO_REUSEPORT``: the kernel spreads new connections over them). The parent
only supervises: it forwards SIGTERM/SIGINT to every worker, waits for them,
and exits; a worker that dies on its own stops the others (the orchestrator
restarts the pod). Each worker serves ``/metrics`` on ``metrics.port +
index``.

A worker's shutdown, each phase logged in one line: SIGTERM -> draining
(readiness and new streams answer 503, the port stays open) -> open streams
get ``shutdown_grace_s`` and are then stopped at an event boundary
(``lifecycle.py``) -> the port closes -> the clients close -> exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import gc_policy
from gateway.access_log import RedactingAccessLogger
from gateway.app import create_app
from gateway.config import Settings
from gateway.connections import ConnectionGuard, connection_cap
from gateway.errors import ConfigError
from gateway.limits import retry_after_seconds
from gateway.metrics import metrics_app, set_enabled
from gateway.resources import LIFECYCLE
from gateway.runner import GatewayRunner

log = logging.getLogger(__name__)

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
_BACKLOG = 1024
_WORKER_STOP_WAIT_S = 2.0  # beyond the grace, before the parent kills a worker that does not exit


class StartupError(Exception):
    """The server cannot start; the message is one line that says what to do."""


def install_uvloop() -> None:
    """uvloop where available: measurably cheaper socket writes (docs/PERFORMANCE.md)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - it is a declared dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def runner_options(settings: Settings) -> dict[str, Any]:
    """Options shared by ``serve`` and the dev server."""
    return {
        "access_log_class": RedactingAccessLogger,
        "access_log": logging.getLogger("gateway.access") if settings.server.access_log else None,
        # A client that goes away cancels its handler at once: no work, task or
        # connection outlives the stream.
        "handler_cancellation": True,
        # Streams are drained before the port closes (Lifecycle.drain); what is
        # left then is short requests.
        "shutdown_timeout": settings.server.shutdown_grace_s,
        # An idle connection between requests (aiohttp's default is an hour); streams are not idle.
        "keepalive_timeout": settings.server.keepalive_timeout_s,
    }


def require_redis_url(settings: Settings) -> None:
    """``serve`` talks to a configured Redis, never to an embedded one (that is ``dev``'s, and ``make run``'s).

    A production replica that quietly ran a private Redis of its own would
    serve nothing its workers wrote; an empty ``redis.url`` stops start-up.
    """
    if not settings.redis.url:
        raise ConfigError(
            "redis.url (GATEWAY_REDIS_URL)",
            "empty: serve needs a Redis, e.g. GATEWAY_REDIS_URL=redis://redis:6379/0"
            " (an embedded Valkey is for `candle-gateway dev` only)",
        )


# -- how many workers ---------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may actually use: its affinity, bounded by the cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(v2: Path = _CGROUP_V2_CPU_MAX) -> float | None:
    """The container's CPU quota in CPUs (``quota / period``), or None when there is none."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(_CGROUP_V1_QUOTA.read_text())
        period_us = int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def worker_count(setting: int | str) -> int:
    """``server.workers`` (or ``--workers``) as a number: ``auto`` is ``usable_cpus()``."""
    return usable_cpus() if setting == "auto" else int(setting)


# -- serving -----------------------------------------------------------------------


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    require_redis_url(settings)
    workers = worker_count(settings.server.workers)
    if workers == 1:
        return run_worker(settings, index=0, workers=1)
    return _supervise(settings, workers)


def run_worker(settings: Settings, *, index: int, workers: int) -> int:
    """One serving process (worker ``index`` of ``workers``); returns its exit status."""
    install_uvloop()
    try:
        asyncio.run(_serve(settings, index, workers))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0


async def _serve(settings: Settings, index: int, workers: int) -> None:
    server = settings.server
    # Ports first: a busy one is one line, before anything else is started or logged.
    public = bind(server.host, server.port, reuse_port=workers > 1, what="port", setting="SERVER_PORT")
    metrics_port = settings.metrics.port + index if settings.metrics.port else 0
    set_enabled(bool(metrics_port))
    try:
        private = (
            bind(server.host, metrics_port, reuse_port=False, what="metrics port", setting="METRICS_PORT")
            if metrics_port
            else None
        )
    except StartupError:
        public.close()  # not held until the process exits: a caller that runs on (tests, a supervisor) may retry
        raise
    app = create_app(settings)
    runner = GatewayRunner(app, **runner_options(settings))
    metrics_runner: web.AppRunner | None = None
    listener: asyncio.Server | None = None
    await runner.setup()
    try:
        listener = await guarded_listener(runner, public, settings)
        gc_policy.settle_after_startup()
        metrics_text = "off (metrics.port = 0)"
        if private is not None:
            metrics_runner = web.AppRunner(metrics_app(), access_log=None)
            await metrics_runner.setup()
            await web.SockSite(metrics_runner, private).start()
            metrics_text = f"http://{server.host}:{metrics_port}/metrics"
        log.info(
            "serving on http://%s:%d (worker %d of %d, pid %d); metrics %s",
            server.host,
            server.port,
            index + 1,
            workers,
            os.getpid(),
            metrics_text,
        )
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await stop.wait()
        log.info("%s received: shutting down", received[0] if received else "stop")
        await app[LIFECYCLE].drain(server.shutdown_grace_s)
    finally:
        if listener is not None:
            listener.close()  # as aiohttp's site would: no new connection, the open ones shut down below
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("stopped (pid %d)", os.getpid())


async def guarded_listener(runner: web.AppRunner, sock: socket.socket, settings: Settings) -> asyncio.Server:
    """Serve ``runner``'s app on ``sock`` through ``ConnectionGuard`` (gateway/connections.py)."""
    assert runner.server is not None
    server = settings.server
    guard = ConnectionGuard(
        runner.server,
        header_timeout_s=server.header_timeout_s,
        max_connections=connection_cap(server.max_connections),
        retry_after_s=retry_after_seconds(server.retry_ms),
        keepalive_timeout_s=server.keepalive_timeout_s,
    )
    log.info("at most %d client connections (server.max_connections)", guard.max_connections)
    return await asyncio.get_running_loop().create_server(guard, sock=sock, backlog=_BACKLOG)


def bind(host: str, port: int, *, reuse_port: bool, what: str, setting: str) -> socket.socket:
    """A listening socket on ``host:port``; ``StartupError`` (one line, what to do) if it cannot be had."""
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise StartupError(_listen_error(exc, host, port, what, setting)) from exc
    return sock


def _listen_error(exc: OSError, host: str, port: int, what: str, setting: str) -> str:
    section, _, key = setting.lower().partition("_")
    where = f"set GATEWAY_{setting} or {section}.{key}"
    if exc.errno == errno.EADDRINUSE:
        return f"{what} {port} is in use: stop what holds it, or {where}"
    if exc.errno == errno.EACCES:
        return f"{what} {port} needs privileges to bind: use a port above 1023 ({where})"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return f"cannot listen on {host}:{port} ({exc.strerror or exc}): set GATEWAY_SERVER_HOST or server.host"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


# -- the parent of N workers ------------------------------------------------------


def _supervise(settings: Settings, workers: int) -> int:
    """Fork ``workers`` processes on one port; forward SIGTERM/SIGINT; wait; exit."""
    context = multiprocessing.get_context("fork")
    stopping = False

    def forward(signum: int, _: Any) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s received: stopping %d workers", signal.Signals(signum).name, workers)
        stopping = True
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    # Workers install their own handlers; the parent's apply to the parent only.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    processes = [
        context.Process(target=_worker_main, args=(settings, index, workers), name=f"gateway-worker-{index}")
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    log.info("started %d workers on port %d (pids %s)", workers, settings.server.port,
             ", ".join(str(p.pid) for p in processes))  # fmt: skip
    status = 0
    while any(process.is_alive() for process in processes):
        for process in processes:
            process.join(timeout=0.2)
            if process.exitcode is not None and process.exitcode != 0 and not stopping:
                log.error("worker pid %s exited with status %s: stopping the others", process.pid, process.exitcode)
                status = process.exitcode if process.exitcode > 0 else 1
                forward(signal.SIGTERM, None)
    deadline_s = settings.server.shutdown_grace_s + _WORKER_STOP_WAIT_S
    for process in processes:
        process.join(timeout=deadline_s)
        if process.exitcode is None:
            process.kill()
        elif process.exitcode != 0 and status == 0 and not stopping:
            status = process.exitcode
    log.info("all workers stopped")
    return status


def _worker_main(settings: Settings, index: int, workers: int) -> None:
    # Not the parent's forwarding handlers: the worker's loop installs its own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(run_worker(settings, index=index, workers=workers))
