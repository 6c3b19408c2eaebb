"""The floor: the least work the job could take, served the same way as the gateway.

A bare aiohttp handler that ``LRANGE``s the same lists a chunk at a time and
writes the stored bytes spliced into SSE events: no authentication, no
validation, no progress, no resume ids. ``make bench`` runs it in its own
process, beside the gateway's, and reports every gateway figure against it.

With ``follow=true`` (one interval) it is the fan-out bench's floor
(``--fanout-floor``): the stream stays open after the snapshot, and the
process does the least a follow server can do per append. It subscribes to
each followed job's channel; per note it reads the job's new points once
(one ``LRANGE``), builds one event and writes it straight into every
follower's socket (one ``transport.write`` each, as the gateway's cohorts
do), with no job hash, no status, no validation and no per-follower state.
Followers of one job must have joined before its next append (the bench
appends only after every follower is connected).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvloop
from aiohttp import web

# Only the key function: the floor must not pay for the gateway's imports.
from gateway.sources import keys

REDIS = web.AppKey("redis", aioredis.Redis)


class _Followed:
    """One job's followers: their sockets, and how many points of the interval they were all sent."""

    def __init__(self, key: str, sent: int) -> None:
        self.key = key
        self.sent = sent
        self.transports: list[asyncio.Transport] = []
        self.reading: asyncio.Task[None] | None = None
        self.again = False


class _Fanout:
    """The floor's follow mode: one subscription, one read per note and job, one write per follower."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self.jobs: dict[bytes, _Followed] = {}
        self._listening: asyncio.Task[None] | None = None

    def join(self, job_id: str, key: str, sent: int, transport: asyncio.Transport) -> None:
        channel = keys.events_channel(job_id).encode()
        followed = self.jobs.setdefault(channel, _Followed(key, sent))
        followed.transports.append(transport)
        if self._listening is None:
            self._listening = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        subscribed: set[bytes] = set()
        while True:
            if new := set(self.jobs) - subscribed:
                await pubsub.subscribe(*new)
                subscribed |= new
            message = await pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "message":
                followed = self.jobs.get(message["channel"])
                if followed is None:
                    continue
                if followed.reading is not None and not followed.reading.done():
                    followed.again = True  # the running read goes round once more
                else:
                    followed.reading = asyncio.create_task(self._deliver(followed))

    async def _deliver(self, followed: _Followed) -> None:
        while True:
            followed.again = False
            stored: list[bytes] = await self._client.lrange(followed.key, followed.sent, -1)  # type: ignore[assignment]
            if stored:
                followed.sent += len(stored)
                frame = b'event: data_chunk\ndata: {"interval":"day","points_sent":%d,"data_points":[%b]}\n\n' % (
                    followed.sent,
                    b",".join(stored),
                )
                chunk = b"%x\r\n%b\r\n" % (len(frame), frame)  # HTTP/1.1 chunked (not gateway.sse's: its imports)
                followed.transports = [t for t in followed.transports if not t.is_closing()]
                for transport in followed.transports:
                    transport.write(chunk)
            if not followed.again:
                return


FANOUT = web.AppKey("fanout", _Fanout)


async def floor_stream(request: web.Request) -> web.StreamResponse:
    client = request.app[REDIS]
    job_id = request.match_info["id"]
    intervals = request.query["intervals"].split(",")
    limit = int(request.query.get("limit", "1000"))
    chunk_size = int(request.query.get("chunk_size", "500"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    event_id = 0
    for interval in intervals:
        key = keys.candles_key(job_id, interval)
        total = min(await client.llen(key), limit)
        head = b'{"interval":"' + interval.encode() + b'","data_points":['
        for start in range(0, total, chunk_size):
            stored: list[bytes] = await client.lrange(key, start, min(start + chunk_size, total) - 1)  # type: ignore[assignment]
            event_id += 1
            await response.write(b"id: %d\nevent: data_chunk\ndata: " % event_id + head + b",".join(stored) + b"]}\n\n")
    if request.query.get("follow") == "true":
        await response.write(b"event: interval_complete\ndata: {}\n\n")
        assert request.transport is not None and len(intervals) == 1
        request.app[FANOUT].join(job_id, keys.candles_key(job_id, intervals[0]), total, request.transport)
        await asyncio.Future()  # until the server stops: the fan-out writes from here on
    await response.write(b"event: all_complete\ndata: {}\n\n")
    await response.write_eof()
    return response


async def _redis_context(app: web.Application) -> AsyncIterator[None]:
    app[REDIS] = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(app["redis_url"], max_connections=64)
    )
    app[FANOUT] = _Fanout(app[REDIS])
    yield
    await app[REDIS].aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.install()
    app = web.Application()
    app["redis_url"] = args.redis_url
    app.cleanup_ctx.append(_redis_context)
    app.router.add_get("/api/sse/backtest/{id}/data/multi", floor_stream)
    # A bench process with nothing to save: SIGTERM ends it at once (follow streams held open
    # and a subscription reader would otherwise keep aiohttp's graceful stop waiting).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, handle_signals=False)


if __name__ == "__main__":
    main()
