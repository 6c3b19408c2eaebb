"""Running jobs, read from Redis exactly as the worker contract (SPEC 6) writes them.

One pipeline answers a stream's first question (the job hash and the length
of every requested list); after that each chunk is one ``LRANGE`` of exactly
that chunk, and every few chunks an ``HMGET`` of the job's status rides in
the same pipeline, so events report the status of (nearly) the moment they
were built, and a job that fails mid-stream ends the stream promptly.

Streams of one job that open together share that first question and their
identical chunk reads (``FreshReads``: only reads started after they asked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline

from gateway.errors import DataError, JobNotFound, RedisUnreachable, StoredValueMalformed
from gateway.params import ID_PATTERN
from gateway.redis_client import call_redis, response_error
from gateway.sources import keys
from gateway.sources.base import JOB_STATUSES, Chunk, JobInfo, JobState, ReadPlan, Snapshot, TailPlan
from gateway.sources.batch import PipelineBatch
from gateway.sources.candles import CandleValidator
from gateway.sources.fresh import FreshReads
from gateway.sources.lists import ListChunkReader, ListReads

_STATE_FIELDS: Final = ("status", "current_bar", "error", "backtest_id")
# The job's state rides along with every this-many chunk reads, from the
# this-many-th on (the stream's describe read it just before the first): fresh
# to within a few milliseconds of streaming, for a fraction of a pipeline's
# cost per chunk. A new follow stream's one chunk is then a plain LRANGE.
_STATE_EVERY: Final = 8
# What a snapshot's failure says it was doing ("Redis unreachable while reading the job").
SNAPSHOT_READ: Final = "reading the job"


def job_not_found(job_id: str) -> JobNotFound:
    """The one answer for a job that does not exist, no longer exists, or that the user may not read."""
    return JobNotFound(f"Job '{job_id}' not found")


class RedisJobSource:
    """A job that workers are writing (or have written) to Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        job_id: str,
        lists: ListReads,
        fresh: FreshReads,
        batch: PipelineBatch | None = None,
    ) -> None:
        self._redis = client
        # The process's one: the looks of many jobs in one loop turn share a round trip (batch.py).
        self._batch = PipelineBatch(client, SNAPSHOT_READ) if batch is None else batch
        self._lists = lists
        self._fresh = fresh
        self.job_id = job_id
        self._job_key = keys.job_key(job_id)
        self._reads = 0
        self._described: Snapshot | None = None

    async def describe(self, intervals: Sequence[str]) -> JobInfo:
        # The counts ride in the same round trip: they cost Redis next to nothing.
        # Authorization comes after, per caller: sharing the read shares no access.
        self._described = await self._fresh.read(
            ("snapshot", self.job_id, tuple(intervals)), partial(self.snapshot, intervals)
        )
        return self._described.job

    async def open(self, intervals: Sequence[str], plan: ReadPlan) -> Snapshot:
        assert self._described is not None, "describe() first"
        return self._described

    async def snapshot(self, intervals: Sequence[str], tails: TailPlan | None = None) -> Snapshot:
        """The job hash and the length of every requested list, in one pipeline.

        With ``tails``, the same pipeline reads each list from its start too:
        a follower's look at the job and its new points in one round trip.
        """
        tail_keys = [] if tails is None else [interval for interval in intervals if interval in tails.starts]

        def commands(pipe: Pipeline) -> None:
            pipe.hgetall(self._job_key)
            for interval in intervals:
                pipe.llen(keys.candles_key(self.job_id, interval))
            for interval in tail_keys:
                assert tails is not None
                start = tails.starts[interval]
                # From the element before: the follower checks it is still the one it sent there.
                first = max(0, start - 1)
                pipe.lrange(keys.candles_key(self.job_id, interval), first, start + tails.count - 1)

        replies = await self._batch.execute(commands)
        for reply in replies:
            # A cluster pipeline hands back a node's connection failure as a reply, not raised.
            if isinstance(reply, redis.exceptions.RedisError) and not isinstance(reply, redis.exceptions.ResponseError):
                raise RedisUnreachable(f"Redis unreachable while reading the job ({type(reply).__name__})")
        tail_replies = replies[len(intervals) + 1 :]
        replies = replies[: len(intervals) + 1]
        fields = replies[0]
        if isinstance(fields, redis.exceptions.ResponseError):
            error = response_error(fields, "reading the job record")
            if not isinstance(error, StoredValueMalformed):
                raise error
            # No owner can be read: only an admin gets past authorization to see why.
            job = JobInfo(self.job_id, None, "", "", "", (), JobState("failed", error="job record is not a hash"))
            return Snapshot(job=job, lengths={})
        if not fields:
            raise job_not_found(self.job_id)
        job = parse_job_hash(self.job_id, fields)
        lengths: dict[str, int] = {}
        failures: dict[str, str] = {}
        for interval, length in zip(intervals, replies[1:], strict=True):
            if interval not in job.intervals:
                continue
            if isinstance(length, redis.exceptions.ResponseError):
                error = response_error(length, f"counting interval '{interval}'")
                if not isinstance(error, StoredValueMalformed):
                    raise error
                failures[interval] = f"interval '{interval}' is not stored as a list"
            else:
                lengths[interval] = length
        if not tail_keys:
            return Snapshot(job=job, lengths=lengths, failures=failures)
        assert tails is not None
        found = {}
        for interval, stored in zip(tail_keys, tail_replies, strict=True):
            start = tails.starts[interval]
            if isinstance(stored, list) and (chunk := self._tail_chunk(interval, start, stored, lengths)) is not None:
                found[interval] = (start, chunk)
        return Snapshot(job=job, lengths=lengths, failures=failures, tails=found)

    def _tail_chunk(self, interval: str, start: int, stored: list[bytes], lengths: Mapping[str, int]) -> Chunk | None:
        """The points read from ``start``, as far as the length read just before them counted; None if none or bad.

        A point appended between the count and the read is left for the next
        look; a bad point is left to the chunk read, which reports it.
        """
        before = None
        if start > 0:
            if not stored:
                return None
            before, stored = stored[0], stored[1:]
        stored = stored[: max(0, lengths.get(interval, 0) - start)]
        if not stored:
            return None
        try:
            return CandleValidator(interval, position=start, memo=self._lists.memo).to_chunk(stored, before=before)
        except DataError:
            return None

    async def length(self, interval: str) -> int:
        key = keys.candles_key(self.job_id, interval)
        try:
            length: int = await call_redis(lambda: self._redis.llen(key), f"counting interval '{interval}'")
        except StoredValueMalformed as exc:
            raise StoredValueMalformed(f"interval '{interval}' is not stored as a list") from exc
        return length

    def reader(self, interval: str, start: int, stop: int, chunk_size: int, *, prefetch: bool) -> ListChunkReader:
        fetch = partial(self.read_range, interval)
        return self._lists.reader(fetch, interval, start, stop, chunk_size, prefetch=prefetch, anchored=True)

    async def read_range(self, interval: str, start: int, count: int) -> tuple[list[bytes], JobState | None]:
        """``count`` stored candles from ``start``, and every few chunks the job's state read with them."""
        key = keys.candles_key(self.job_id, interval)
        self._reads += 1
        with_state = self._reads % _STATE_EVERY == 0

        async def read() -> list[Any]:
            if not with_state:
                return [await self._redis.lrange(key, start, start + count - 1), None]
            pipe = self._redis.pipeline(transaction=False)
            pipe.lrange(key, start, start + count - 1)
            pipe.hmget(self._job_key, _STATE_FIELDS)
            return await pipe.execute(raise_on_error=False)

        try:
            stored, state_values = await self._fresh.read(
                (key, start, count, with_state), partial(call_redis, read, f"reading interval '{interval}'")
            )
        except StoredValueMalformed as exc:
            raise StoredValueMalformed(f"interval '{interval}' is not stored as a list") from exc
        if isinstance(stored, redis.exceptions.ResponseError):
            error = response_error(stored, f"reading interval '{interval}'")
            if isinstance(error, StoredValueMalformed):
                raise StoredValueMalformed(f"interval '{interval}' is not stored as a list")
            raise error
        if len(stored) != count:
            raise StoredValueMalformed(
                f"interval '{interval}' holds {start + len(stored)} points,"
                f" fewer than the {start + count} this stream counted: the list was cut or rewritten"
            )
        if state_values is None:
            return stored, None
        if isinstance(state_values, redis.exceptions.ResponseError):
            error = response_error(state_values, "reading the job record")
            if not isinstance(error, StoredValueMalformed):
                raise error
            return stored, JobState("failed", error="job record is not a hash")
        if all(value is None for value in state_values):
            raise job_not_found(self.job_id)  # the hash is gone: as a new request would be told
        return stored, parse_job_state(dict(zip(_STATE_FIELDS, state_values, strict=True)))

    async def aclose(self) -> None:
        """Nothing to release: connections go back to the shared pool per command."""


def parse_job_hash(job_id: str, fields: Mapping[bytes, bytes]) -> JobInfo:
    """The job hash as a ``JobInfo``; a malformed record becomes a failed job, never a crash."""
    text = {name.decode(errors="replace"): value.decode(errors="replace") for name, value in fields.items()}
    intervals = tuple(name.strip() for name in text.get("intervals", "").split(",") if name.strip())
    missing = [name for name in ("user_id", "symbol", "exchange", "intervals", "status") if not text.get(name)]
    state = parse_job_state(text)
    backtest_id = text.get("backtest_id") or None
    if missing:
        # Only the owner (or an admin) gets as far as this message.
        state = JobState(status="failed", error=f"job record lacks {', '.join(missing)}")
    elif backtest_id is not None and not ID_PATTERN.fullmatch(backtest_id):
        # It would become a cache key and a query parameter: refuse it here.
        state = JobState(status="failed", error="job record has an invalid backtest_id")
        backtest_id = None
    return JobInfo(
        job_id=job_id,
        backtest_id=backtest_id,
        user_id=text.get("user_id", ""),
        symbol=text.get("symbol", ""),
        exchange=text.get("exchange", ""),
        intervals=intervals,
        state=state,
    )


def parse_job_state(fields: Mapping[str, str | bytes | None]) -> JobState:
    """Status, current bar, error text and backtest id from the job hash (bytes or str values)."""
    status, current_bar, error, backtest_id = (_text(fields.get(name)) for name in _STATE_FIELDS)
    if status not in JOB_STATUSES:
        return JobState(status="failed", error=f"job record has an unknown status {status!r}")
    bar: int | None = None
    if current_bar:
        try:
            bar = int(current_bar)
        except ValueError:
            return JobState(status="failed", error=f"job record has a non-integer current_bar {current_bar!r}")
    if backtest_id and not ID_PATTERN.fullmatch(backtest_id):
        # It would become a cache key and a query parameter: refuse it here.
        return JobState(status="failed", error="job record has an invalid backtest_id")
    return JobState(status=status, current_bar=bar, error=error or None, backtest_id=backtest_id or None)


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
