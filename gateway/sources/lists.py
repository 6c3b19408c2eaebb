"""Reading a Redis list of JSON candles chunk by chunk: running jobs and cached backtests alike."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from gateway.sources.base import Chunk, JobState
from gateway.sources.candles import CandleValidator, ValidatedChunks

# Chunks in flight ahead of the one being sent: Redis answers on its own core
# while this one validates and writes. Under load the extra reads only add
# tasks and pool contention, so they are for a process with few readers
# (the measurements are in docs/PERFORMANCE.md, "Snapshot streams").
_READ_AHEAD = 3
_FEW_READERS = 2


class ReadAheadBudget:
    """Reads beyond the first that all readers of a process may have in flight at once."""

    def __init__(self, extra_reads: int = 4) -> None:
        self.free = extra_reads
        self.readers = 0  # readers that read ahead, open now


# Reads ``count`` stored candles from a position, and the job's state if the source has one.
RangeFetch = Callable[[int, int], Awaitable[tuple[list[bytes], JobState | None]]]


class ListReads:
    """What every list reader of a process shares: the validated-chunk memo and the read-ahead budget."""

    def __init__(self) -> None:
        # Each stored chunk is validated once per process, whoever reads it.
        self.memo = ValidatedChunks()
        self.read_ahead = ReadAheadBudget()

    def reader(
        self,
        fetch: RangeFetch,
        interval: str,
        start: int,
        stop: int,
        chunk_size: int,
        *,
        prefetch: bool,
        anchored: bool = False,
    ) -> ListChunkReader:
        """A reader of one interval's stored candles (what ``fetch`` reads) from ``start`` to ``stop``."""
        return ListChunkReader(
            fetch,
            interval,
            start,
            stop,
            chunk_size,
            prefetch=prefetch,
            memo=self.memo,
            budget=self.read_ahead,
            anchored=anchored,
        )


class ListChunkReader:
    """Chunks of one list from ``start`` to ``stop``, the next one already in flight if asked.

    ``anchored``: each read past the list's head takes the element before the
    chunk too (one more element of the same ``LRANGE``), handed on as
    ``Chunk.before`` for the stream's continuity check (a list that workers
    trimmed or rewrote under a reader).
    """

    def __init__(
        self,
        fetch: RangeFetch,
        interval: str,
        start: int,
        stop: int,
        chunk_size: int,
        *,
        prefetch: bool,
        memo: ValidatedChunks | None,
        budget: ReadAheadBudget | None = None,
        anchored: bool = False,
    ) -> None:
        self._fetch = fetch
        self._anchored = anchored
        self._position = start
        self._stop = stop
        self._chunk_size = chunk_size
        self._prefetch = prefetch
        self._validator = CandleValidator(interval, position=start, memo=memo)
        self._pending: deque[asyncio.Future[tuple[list[bytes], JobState | None]]] = deque()
        self._requested = start  # position after the last chunk asked for
        self._budget = budget
        self._borrowed = 0  # reads in flight beyond the first, taken from the budget
        self._counted = prefetch and budget is not None
        if self._counted:
            assert budget is not None
            budget.readers += 1

    async def next_chunk(self) -> Chunk:
        if not self._pending:
            self._pending.append(self._start_read())
        stored, state = await self._pending.popleft()
        self._settle_budget()
        before = None
        if self._anchored and self._position > 0:
            before, stored = (stored[0], stored[1:]) if stored else (None, stored)
        self._position += len(stored)
        # Overlap the next round trips with validating and writing this chunk.
        while self._prefetch and self._requested < self._stop and self._may_read_ahead():
            self._pending.append(self._start_read())
            self._settle_budget()
        return self._validator.to_chunk(stored, state, before, anchored=self._anchored)

    def _may_read_ahead(self) -> bool:
        if not self._pending:
            return True
        if len(self._pending) >= _READ_AHEAD or self._budget is None:
            return False
        return self._budget.free > 0 and self._budget.readers <= _FEW_READERS

    def _settle_budget(self) -> None:
        """Keep the budget's count true: every pending read but the first is borrowed."""
        borrowed = max(0, len(self._pending) - 1)
        if self._budget is not None:
            self._budget.free += self._borrowed - borrowed
        self._borrowed = borrowed

    def _start_read(self) -> asyncio.Future[tuple[list[bytes], JobState | None]]:
        count = min(self._chunk_size, self._stop - self._requested)
        if self._anchored and self._requested > 0:
            read = asyncio.ensure_future(self._fetch(self._requested - 1, count + 1))
        else:
            read = asyncio.ensure_future(self._fetch(self._requested, count))
        self._requested += count
        return read

    async def aclose(self) -> None:
        pending, self._pending = list(self._pending), type(self._pending)()
        try:
            for read in pending:
                read.cancel()
            if pending:
                # Waits without raising the reads' own outcome, but a cancellation of the caller still raises.
                await asyncio.wait(pending)
        finally:
            for read in pending:
                if read.done() and not read.cancelled():
                    read.exception()  # its result or error is no longer wanted
            self._settle_budget()
            if self._counted and self._budget is not None:
                self._budget.readers -= 1
                self._counted = False
