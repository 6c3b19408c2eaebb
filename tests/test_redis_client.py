"""The gateway's Redis client (redis_client.py) against a real Valkey: writes on the caller's task, still timed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis.exceptions

from gateway.config import RedisSettings
from gateway.redis_client import build_redis_client


async def test_a_command_on_a_warm_connection_is_written_on_the_callers_task(redis_url):
    client = build_redis_client(RedisSettings(url=redis_url, max_connections=1))
    loop = asyncio.get_running_loop()
    started = []

    def counting_factory(loop: asyncio.AbstractEventLoop, coro, **kwargs):
        started.append(getattr(coro, "__qualname__", coro))
        return asyncio.Task(coro, loop=loop, **kwargs)

    try:
        await client.set("redis-client-test", "1")  # connects: the handshake is redis-py's own
        loop.set_task_factory(counting_factory)
        try:
            assert await client.get("redis-client-test") == b"1"
            pipe = client.pipeline(transaction=False)
            pipe.get("redis-client-test")
            pipe.llen("redis-client-test-list")
            assert await pipe.execute() == [b"1", 0]
        finally:
            loop.set_task_factory(None)
        # redis-py's asyncio.wait_for around each write started one per command. (Its
        # pipeline still hands the connection back to the pool in a task of its own.)
        assert "AbstractConnection._send_packed_command" not in started
        assert started == ["BlockingConnectionPool.release"]
    finally:
        await client.aclose()


async def test_a_write_that_redis_does_not_take_still_times_out(valkey):
    client = build_redis_client(RedisSettings(url=valkey.url, socket_timeout_s=0.5, retries=0))
    try:
        pid = int((await client.info("server"))["process_id"])
        os.kill(pid, signal.SIGSTOP)  # Valkey stops reading: the socket buffers fill, the write waits
        try:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError, match="writing to socket"):
                await client.set("big", b"x" * (64 << 20))
            assert 0.4 < time.monotonic() - started < 3.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await client.ping()  # a fresh connection afterwards
    finally:
        await client.aclose()
