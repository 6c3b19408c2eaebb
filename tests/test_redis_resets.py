"""TCP resets and drops on the gateway's Redis connections (issue 20, item 1), against a real ``serve``.

The gateway runs as its own process (``python -m gateway serve``, on uvloop
as in production) and reaches a real Valkey through the tests' own proxy
(tests/faults.py), which resets every connection at once with an RST
(SO_LINGER 0) or drops every packet for a while. Then:

- every follow stream ends, and ends on the wire: its connection closes
  (with ``all_complete``, or ``connection_error`` to resume from);
- a new stream opened meanwhile gets 200 or 503, never 500;
- the log holds no error that was not mapped (uvloop's ``RuntimeError`` on a
  closed transport), no task that died unobserved, no stopped follow hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from gateway.workers import JobWriter
from tests.conftest import PROJECT
from tests.helpers import seed_job, stream_path
from tests.replicas import Replica, replica_env
from tests.sse_client import SSEParser, Transcript

JOB = "reset-job"
FOLLOWERS = 50
NEW_STREAMS = 20


class Follower:
    """One follow stream read to its end; ``closed_at`` is when the server closed it (None: still open)."""

    def __init__(self) -> None:
        self.transcript = Transcript()
        self.live = asyncio.Event()
        self.closed_at: float | None = None
        self.status = 0

    async def run(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        parser = SSEParser()
        async with session.get(url, headers=headers) as response:
            self.status = response.status
            with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                async for chunk in response.content.iter_any():
                    parser.feed(chunk, self.transcript)
                    if "interval_complete" in self.transcript.names:
                        self.live.set()
        self.closed_at = time.monotonic()
        self.live.set()


async def _new_stream_status(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with session.get(url, headers=headers) as response:
        if response.status == 200:
            await response.content.readany()  # its first events came
        return response.status


@pytest.mark.parametrize("fault", ["reset", "drop_5s"])
async def test_redis_connections_cut_under_live_streams(valkey, proxy, direct, cert_endpoint, token, tmp_path, fault):
    writer = JobWriter(direct, JOB)
    await seed_job(writer, counts={"day": 10})
    env = replica_env(
        proxy.url,
        cert_endpoint.url,
        PROJECT,
        GATEWAY_SERVER_MAX_STREAMS_PER_USER="200",
        GATEWAY_REDIS_OUTAGE_WAIT_S="3",
        GATEWAY_REDIS_SOCKET_TIMEOUT_S="2",
        GATEWAY_FOLLOW_RECHECK_INTERVAL_S="0.5",
    )
    replica = await Replica("reset", tmp_path, env).start()
    url = replica.base + stream_path(JOB) + "?intervals=day&follow=true"
    headers = {"Authorization": f"Bearer {token()}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            followers = [Follower() for _ in range(FOLLOWERS)]
            tasks = [asyncio.create_task(f.run(session, url, headers)) for f in followers]
            await asyncio.wait_for(asyncio.gather(*(f.live.wait() for f in followers)), timeout=30)
            assert [f.status for f in followers] == [200] * FOLLOWERS
            if fault == "reset":
                assert proxy.reset() > 0
                new = await asyncio.gather(*(_new_stream_status(session, url, headers) for _ in range(NEW_STREAMS)))
            else:
                proxy.black_hole()
                opening = asyncio.gather(*(_new_stream_status(session, url, headers) for _ in range(NEW_STREAMS)))
                await asyncio.sleep(5)
                proxy.heal()
                new = await opening
            assert set(new) <= {200, 503}, new
            # The job goes on and completes: every stream must end, and its connection close.
            await writer.update(status="completed")
            completed_at = time.monotonic()
            done, pending = await asyncio.wait(tasks, timeout=30)
            hanging = [f for f in followers if f.closed_at is None]
            for task in pending:
                task.cancel()
            assert not hanging, (
                f"{len(hanging)} of {FOLLOWERS} streams still open 30 s after the job completed; last events: "
                f"{[f.transcript.names[-3:] for f in hanging[:5]]}"
            )
            for follower in followers:
                last = follower.transcript.events[-1]
                assert last.event == "all_complete" or last.payload.get("error") == "connection_error", (
                    follower.transcript.names[-5:]
                )
            closed = sorted(f.closed_at - completed_at for f in followers if f.closed_at is not None)
            assert closed[-1] < 30
            ends = [f.transcript.events[-1].event for f in followers]
            print(  # the figures docs/OPERATIONS.md quotes (pytest -s)
                f"{fault}: new streams {sorted(new)}; followers ended {ends.count('all_complete')} all_complete, "
                f"{ends.count('error')} connection_error; closed {closed[len(closed) // 2]:.2f} s (median), "
                f"{closed[int(len(closed) * 0.95)]:.2f} s (p95) after the job completed"
            )
    finally:
        replica.terminate()
        with contextlib.suppress(TimeoutError):
            await replica.wait()
        replica.stop()
    output = replica.log()
    for unmapped in (
        "Task exception was never retrieved",
        "unable to perform operation",
        "follow hub stopped",
        "Traceback",
        " 500 ",
    ):
        assert unmapped not in output, f"{unmapped!r} in the gateway's log:\n{output[-6000:]}"
