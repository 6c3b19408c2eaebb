"""Real gateway processes (``python -m gateway serve``) for the operations tests, and a resuming client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from gateway.devtools.ports import free_port, free_port_block
from gateway.devtools.processes import gateway_serve, start_server, wait_for_port
from tests.sse_client import Event, SSEParser, Transcript

# wait_for_port too: the nginx and CLI tests wait with it for processes of their own.
__all__ = ["REPO", "Replica", "ResumingClient", "replica_env", "wait_for_port"]

REPO = Path(__file__).resolve().parent.parent


class Replica:
    """One gateway process on its own port, its stderr kept in a file."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], args: Sequence[str] = ()) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port_block(4)  # room for workers' metrics.port + i
        self.log_path = workdir / f"{name}.log"
        self.env = {
            # No GATEWAY_* of the surrounding shell: only what the test says.
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            "GATEWAY_SERVER_PORT": str(self.port),
            "GATEWAY_METRICS_PORT": str(self.metrics_port),
            **env,
        }
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.terminated_at: float | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Replica:
        self.process = await start_server(
            gateway_serve(*self.args), env=self.env, log=self.log_path, port=self.port, cwd=REPO
        )
        return self

    def terminate(self) -> None:
        """SIGTERM; a thread notes the exit time, so that a busy test loop does not inflate it."""
        process = self.process
        assert process is not None
        self.terminated_at = time.monotonic()
        process.send_signal(signal.SIGTERM)

        def note_exit() -> None:
            process.wait()
            self.exited_at = time.monotonic()

        self._waiter = threading.Thread(target=note_exit, daemon=True)
        self._waiter.start()

    exited_at: float | None = None

    async def wait(self, timeout_s: float = 20) -> float:
        """Wait for the process to exit; seconds from ``terminate`` to its exit."""
        assert self.process is not None and self.terminated_at is not None
        deadline = time.monotonic() + timeout_s
        while self.exited_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not exit; log:\n{self.log()}")
            await asyncio.sleep(0.01)
        return self.exited_at - self.terminated_at

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def replica_env(redis_url: str, certs_url: str, project: str, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_AUTH_CERTS_URL": certs_url,
        "GATEWAY_AUTH_FIREBASE_PROJECT_ID": project,
        "GATEWAY_SERVER_MAX_STREAMS_PER_USER": "0",
        "GATEWAY_SERVER_RETRY_MS": "100",
        **extra,
    }


class ResumingClient:
    """An EventSource-like client: on a cut it reconnects with its last id, trying the bases in turn.

    A 503 (a draining replica) or a refused connection moves on to the next
    base, as an ingress's ``proxy_next_upstream`` would.
    """

    def __init__(self, session: aiohttp.ClientSession, bases: Sequence[str], path: str, query: dict[str, str]):
        self.session = session
        self.bases = list(bases)
        self.path = path
        self.query = query
        self.events: list[Event] = []
        self.connections = 0
        self.refusals = 0
        self.first_events = asyncio.Event()

    async def run(self, start: int = 0, max_connections: int = 50) -> list[Event]:
        index = start
        while self.connections < max_connections:
            base = self.bases[index % len(self.bases)]
            headers = {"Last-Event-ID": self.events[-1].id or ""} if self.events else {}
            try:
                async with self.session.get(base + self.path, params=self.query, headers=headers) as response:
                    if response.status == 204:
                        return self.events
                    if response.status != 200:
                        self.refusals += 1
                        await response.read()
                        index += 1
                        await asyncio.sleep(0.05)
                        continue
                    self.connections += 1
                    parser, transcript = SSEParser(), Transcript()
                    with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                        async for chunk in response.content.iter_any():
                            for event in parser.feed(chunk, transcript):
                                self.events.append(event)
                                self.first_events.set()
                    if self.events and self.events[-1].event == "all_complete":
                        return self.events
                    if self.events and self.events[-1].event == "error":
                        return self.events
            except (aiohttp.ClientConnectionError, OSError):
                self.refusals += 1
                index += 1
                await asyncio.sleep(0.05)
                continue
            # A cut: reconnect after a short delay, preferably elsewhere (the same base may be draining).
            index += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"no end after {self.connections} connections")

    def points(self) -> list[dict[str, object]]:
        return [point for e in self.events if e.event == "data_chunk" for point in e.payload["data_points"]]
