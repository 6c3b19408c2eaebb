"""The floor: the least work the job could take, served the same way as the gateway.

A bare aiohttp handler that ``LRANGE``s the same lists a chunk at a time and
writes the stored bytes spliced into SSE events: no authentication, no
validation, no progress, no resume ids. ``make bench`` runs it in its own
process, beside the gateway's, and reports every gateway figure against it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvloop
from aiohttp import web

# Only the key function: the floor must not pay for the gateway's imports.
from gateway.sources import keys

REDIS = web.AppKey("redis", aioredis.Redis)


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
    await response.write(b"event: all_complete\ndata: {}\n\n")
    await response.write_eof()
    return response


async def _redis_context(app: web.Application) -> AsyncIterator[None]:
    app[REDIS] = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(app["redis_url"], max_connections=64)
    )
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
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
