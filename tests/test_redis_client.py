"""The gateway's Redis client (redis_client.py) against a real Valkey: a write Redis does not take is timed out."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis.exceptions

from gateway.config import RedisSettings
from gateway.redis_client import build_redis_client


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
