"""Building jobs and reading streams in tests."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from gateway.resources import NOTES
from gateway.sources.candles import Candle
from gateway.workers import JobWriter, candle
from tests.sse_client import Event, Transcript, event_reader, next_events, read_stream

START = datetime(2025, 4, 1, tzinfo=UTC)
STEPS = {"day": timedelta(days=1), "minute": timedelta(minutes=1), "3minute": timedelta(minutes=3)}


def make_candles(
    count: int, *, step: timedelta = timedelta(minutes=1), start: datetime = START, first: int = 0
) -> list[Candle]:
    """``count`` distinct candles, ``first`` positions into an ascending series."""
    out = []
    for i in range(first, first + count):
        price = 1000 + (i % 97) * 0.25
        out.append(candle(start + i * step, price, price + 1.5, price - 1.25, price + 0.5, 1000 + i))
    return out


def expected_points(candles: Sequence[Candle]) -> list[dict[str, Any]]:
    """The data points a client should receive for these candles."""
    return [
        {
            "time": c.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "open": c.open,
            "high": c.high,
            "low": c.low,
            "close": c.close,
            "volume": c.volume,
        }
        for c in candles
    ]


async def seed_job(
    writer: JobWriter,
    *,
    user_id: str = "alice",
    counts: dict[str, int],
    status: str = "running",
    current_bar: int | None = 50,
    configured: Sequence[str] | None = None,
    symbol: str = "LTF",
    exchange: str = "NSE",
) -> dict[str, list[Candle]]:
    """A job whose intervals hold ``counts`` candles each; returns the candles."""
    intervals = list(configured if configured is not None else counts)
    await writer.create(
        user_id=user_id,
        symbol=symbol,
        exchange=exchange,
        intervals=intervals,
        status=status,
        current_bar=current_bar,
    )
    stored = {}
    for name, count in counts.items():
        stored[name] = make_candles(count, step=STEPS.get(name, timedelta(minutes=1)))
        for start in range(0, count, 5000):
            await writer.append(name, stored[name][start : start + 5000])
    return stored


def stream_path(job_id: str) -> str:
    return f"/api/sse/backtest/{job_id}/data/multi"


async def open_stream(
    client: TestClient,
    job_id: str,
    *,
    token: str | None = None,
    headers: Any = None,  # a mapping of header names to values
    **params: Any,
):
    query = {key: str(value) for key, value in params.items()}
    if token is not None:
        query["token"] = token
    return await client.get(stream_path(job_id), params=query, headers=headers or {})


async def stream(client: TestClient, job_id: str, **kwargs: Any) -> Transcript:
    """Open a stream, check it is SSE, read it to the end."""
    response = await open_stream(client, job_id, **kwargs)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return await read_stream(response)


async def send_raw(port: int, request: bytes, *, until_closed: bool = False) -> bytes:
    """``request``'s bytes as they are, on a new connection; the answer's first bytes, or all until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        read = reader.read() if until_closed else reader.read(65536)
        answer = await asyncio.wait_for(read, 5)
    finally:
        writer.close()
    return answer


def chunk_count(total: int, chunk_size: int) -> int:
    return math.ceil(total / chunk_size)


async def open_followers(
    client: TestClient, job_id: str, token: Callable[[], str], count: int, **params: Any
) -> list[tuple[ClientResponse, Callable[[], Awaitable[Event]]]]:
    """``count`` follow streams of ``job_id``, each read to the end of its snapshot (every interval's interval_complete).

    Returns each response with its ``next_event`` reader, for the live events that follow.
    """
    readers = []
    for _ in range(count):
        response = await open_stream(client, job_id, token=token(), **({"follow": "true"} | params))
        assert response.status == 200
        next_event = event_reader(response)
        for _ in str(params["intervals"]).split(","):
            while (await next_events(next_event, 1))[0].event != "interval_complete":
                pass
        readers.append((response, next_event))
    return readers


async def follow_and_append(
    client: TestClient, writer: JobWriter, job_id: str, token: Callable[[], str], *, seeded: int, **params: Any
) -> tuple[ClientResponse, Callable[[], Awaitable[Event]], Event]:
    """A running job of one interval (``params["intervals"]``) with ``seeded`` candles, one follow
    stream read through its snapshot, then one candle appended by ``writer``.

    The snapshot is checked to be exactly ``interval_start``, its chunks and ``interval_complete``;
    returns the stream, its ``next_event`` reader and the live event that brought the candle,
    checked: a ``data_chunk`` with ``seeded + 1`` points sent and exactly that candle.
    """
    interval = str(params["intervals"])
    await seed_job(writer, counts={interval: seeded})
    response = await open_stream(client, job_id, token=token(), **({"follow": "true"} | params))
    assert response.status == 200
    next_event = event_reader(response)
    chunks = chunk_count(seeded, int(params.get("chunk_size", 500)))
    snapshot = await next_events(next_event, chunks + 2)
    assert [e.event for e in snapshot] == ["interval_start", *["data_chunk"] * chunks, "interval_complete"]
    # The process subscribes to the job's notes just after the stream starts: append once it
    # listens, so that the note (not the re-check a second later) is what brings the candle.
    assert client.app is not None
    notes = client.app[NOTES]
    for _ in range(200):
        if notes.subscribed_jobs:
            break
        await asyncio.sleep(0.01)
    appended = make_candles(1, step=STEPS.get(interval, timedelta(minutes=1)), first=seeded)
    await writer.append(interval, appended)
    live = (await next_events(next_event, 1))[0]
    assert (live.event, live.payload["points_sent"]) == ("data_chunk", seeded + 1)
    assert live.payload["data_points"] == expected_points(appended)
    return response, next_event, live


def group_sizes(client, job_id: str) -> list[int]:
    """How many followers each group of the job's hub (``hub.py``) writes to, smallest first."""
    from gateway.resources import NOTES

    hub = client.server.app[NOTES].hub(job_id)
    return sorted(len(group.members) for group in hub.groups) if hub is not None else []
