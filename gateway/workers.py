"""The worker side of the Redis contract (SPEC 6), for job workers written in Python.

Workers in other languages follow SPEC 6 directly; this module is the
reference implementation, and the demo job and the tests write through it.
Every change is one MULTI/EXEC transaction that also publishes a note on the
job's channel, so a follower never sees a note before the data it announces.

On a Redis Cluster the note is a sharded ``SPUBLISH`` inside the same
transaction (the channel carries the job's hash tag, so it lives in the
job's slot): the shard that owns the job delivers it, instead of every node
of the cluster relaying a classic ``PUBLISH``. ``sharded=False`` keeps the
classic ``PUBLISH`` (sent right after the transaction, since a keyless
command cannot join a cluster transaction); the gateway hears both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from gateway.redis_client import is_cluster
from gateway.sources import keys
from gateway.sources.base import JOB_STATUSES
from gateway.sources.candles import Candle, encode_candle

_encode = msgspec.json.Encoder().encode


class JobWriter:
    """Creates one job's records and appends its candles, as a worker would."""

    def __init__(self, client: aioredis.Redis, job_id: str, *, sharded: bool | None = None) -> None:
        self._redis = client
        self.job_id = job_id
        self._job_key = keys.job_key(job_id)
        self._channel = keys.events_channel(job_id)
        self._cluster = is_cluster(client)
        # Sharded notes by default on a cluster (cheaper there); classic PUBLISH elsewhere.
        self._sharded = self._cluster if sharded is None else sharded

    def _note(self, pipe: Pipeline, note: bytes) -> bytes | None:
        """Queue the note in ``pipe``; or return it, to be published after the transaction."""
        if self._sharded:
            pipe.spublish(self._channel, note)
            return None
        if self._cluster:
            return note
        pipe.publish(self._channel, note)
        return None

    async def _publish_after(self, note: bytes | None) -> None:
        if note is not None:
            await self._redis.publish(self._channel, note)

    async def create(
        self,
        *,
        user_id: str,
        symbol: str,
        exchange: str,
        intervals: Sequence[str],
        status: str = "queued",
        from_date: date | None = None,
        to_date: date | None = None,
        current_bar: int | None = None,
    ) -> None:
        """Write the job hash (replacing any earlier one)."""
        fields: dict[FieldT, EncodableT] = {
            "user_id": user_id,
            "symbol": symbol,
            "exchange": exchange,
            "intervals": ",".join(intervals),
            "status": _checked_status(status),
            "updated_at": _now(),
        }
        if from_date is not None:
            fields["from_date"] = from_date.isoformat()
        if to_date is not None:
            fields["to_date"] = to_date.isoformat()
        if current_bar is not None:
            fields["current_bar"] = str(current_bar)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._job_key)
            pipe.hset(self._job_key, mapping=fields)
            after = self._note(pipe, _encode({"status": status}))
            await pipe.execute()
        await self._publish_after(after)

    async def append(self, interval: str, candles: Iterable[Candle]) -> int:
        """Append candles (ascending time) to an interval; returns the list's new length."""
        return await self.append_raw(interval, [encode_candle(candle) for candle in candles])

    async def append_raw(self, interval: str, stored: Sequence[bytes]) -> int:
        """Append already encoded candles as they are (tests use it to store bad ones)."""
        key = keys.candles_key(self.job_id, interval)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCH makes the published length exact even with several writers.
                    await pipe.watch(key)
                    length: int = await pipe.llen(key)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if stored:
                        pipe.rpush(key, *stored)
                    pipe.hset(self._job_key, "updated_at", _now())
                    new_length = length + len(stored)
                    after = self._note(pipe, _encode({"interval": interval, "length": new_length}))
                    await pipe.execute()
                    break
                except redis.exceptions.WatchError:
                    continue
        await self._publish_after(after)
        return new_length

    async def update(
        self,
        *,
        status: str | None = None,
        current_bar: int | None = None,
        error: str | None = None,
        backtest_id: str | None = None,
    ) -> None:
        """Change the status, current bar, error text or backtest id, and note it."""
        fields: dict[FieldT, EncodableT] = {"updated_at": _now()}
        note: dict[str, str | int] = {}
        if status is not None:
            fields["status"] = note["status"] = _checked_status(status)
        if current_bar is not None:
            fields["current_bar"] = str(current_bar)
            note["current_bar"] = current_bar
        if error is not None:
            fields["error"] = error
        if backtest_id is not None:
            fields["backtest_id"] = note["backtest_id"] = backtest_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._job_key, mapping=fields)
            after = self._note(pipe, _encode(note))
            await pipe.execute()
        await self._publish_after(after)


def candle(time: datetime, open: float, high: float, low: float, close: float, volume: int) -> Candle:
    """A candle with its time in UTC, ready to append."""
    return Candle(time=time.astimezone(UTC), open=open, high=high, low=low, close=close, volume=volume)


def _checked_status(status: str) -> str:
    if status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {sorted(JOB_STATUSES)}, not {status!r}")
    return status


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
