"""LookupLimit (sources/lookups.py) keeps its expiry whatever happens between its steps (issue 20, item 7).

The counter's key is expired by force between every two commands that touch
it, through a real Valkey behind the tests' own proxy (tests/faults.py),
which holds each command until the expiry landed.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.sources import keys
from gateway.sources.lookups import LookupLimit
from tests.faults import FaultProxy


async def test_the_counter_never_loses_its_expiry_when_the_key_expires_between_the_steps(valkey):
    proxy = await FaultProxy(valkey.port).start()
    direct = aioredis.Redis.from_url(valkey.url)
    proxied = aioredis.Redis.from_url(proxy.url)
    key = keys.warehouse_lookups_key("u1")
    seen = 0

    async def expire_between_steps(args: list[bytes]) -> None:
        nonlocal seen
        if key.encode() not in args:
            return
        seen += 1
        if seen > 1:  # the window's key expires just after the first step
            await direct.delete(key)

    proxy.on_command = expire_between_steps
    try:
        limit = LookupLimit(proxied, per_second=5)
        await limit.spend("u1")
        ttl = await direct.pttl(key)
        # -1 is a counter with no expiry: every later lookup of this user would be refused for good.
        assert 0 < ttl <= 1000, f"the lookup counter's key has PTTL {ttl}"
        assert await direct.get(key) == b"1"
    finally:
        await proxied.aclose()
        await direct.aclose()
        await proxy.close()


async def test_the_counter_counts_and_refuses_beyond_the_limit(valkey):
    client = aioredis.Redis.from_url(valkey.url)
    try:
        limit = LookupLimit(client, per_second=3)
        for _ in range(3):
            await limit.spend("u2")
        refused = 0
        try:
            await limit.spend("u2")
        except Exception as exc:
            refused = getattr(exc, "status", 0)
        assert refused == 429
        assert 0 < await client.pttl(keys.warehouse_lookups_key("u2")) <= 1000
    finally:
        await client.aclose()
