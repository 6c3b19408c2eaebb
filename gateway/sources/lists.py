"""Reading a Redis list of JSON candles chunk by chunk: running jobs and cached backtests alike."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from gateway.sources.base import Chunk, JobState
from gateway.sources.candles import CandleValidator, ValidatedChunks

# Reads ``count`` stored candles from a position, and the job's state if the source has one.
RangeFetch = Callable[[int, int], Awaitable[tuple[list[bytes], JobState | None]]]


class ListChunkReader:
    """Chunks of one list from ``start`` to ``stop``, the next one already in flight if asked."""

    def __init__(
        self,
        fetch: RangeFetch,
        interval: str,
        start: int,
        stop: int,
        chunk_size: int,
        *,
        prefetch: bool,
        key: str,
        memo: ValidatedChunks | None,
    ) -> None:
        self._fetch = fetch
        self._position = start
        self._stop = stop
        self._chunk_size = chunk_size
        self._prefetch = prefetch
        self._validator = CandleValidator(interval, position=start, memo=memo, key=key)
        self._pending: asyncio.Future[tuple[list[bytes], JobState | None]] | None = None

    async def next_chunk(self) -> Chunk:
        read = self._pending or self._start_read()
        self._pending = None
        stored, state = await read
        self._position += len(stored)
        if self._prefetch and self._position < self._stop:
            # Overlap the next round trip with validating and writing this chunk.
            self._pending = self._start_read()
        points = self._validator.to_json_array(stored)
        validator = self._validator
        return Chunk(points, len(stored), state, validator.first_time, validator.last_time)

    def _start_read(self) -> asyncio.Future[tuple[list[bytes], JobState | None]]:
        count = min(self._chunk_size, self._stop - self._position)
        return asyncio.ensure_future(self._fetch(self._position, count))

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending  # its result or error is no longer wanted
            self._pending = None
