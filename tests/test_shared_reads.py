"""SharedReads (live.py): one read per job and wake-up, started on the first reader's own task.

The endpoint tests (test_live, test_broadcast) show followers sharing reads;
these pin what only a race shows there: the first reader going away, or its
read failing, while others wait on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.live import SharedReads


class _Slow:
    """A read that waits until released, counting how often it ran."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        await self.release.wait()
        return f"read {self.calls}"


async def _first_and_joined(reads: SharedReads, read: Callable[[], Awaitable[str]]) -> tuple[asyncio.Task[str], ...]:
    """Two followers woken by one note: the first starts the read, the second joins it."""
    first = asyncio.create_task(reads.read("job", 0, read))
    await asyncio.sleep(0)
    joined = asyncio.create_task(reads.read("job", 0, read))
    await asyncio.sleep(0)
    return first, joined


async def test_a_read_runs_on_the_first_readers_task_and_later_wakers_join_it():
    reads, slow = SharedReads(), _Slow()
    first, joined = await _first_and_joined(reads, slow)
    slow.release.set()
    assert await first == await joined == "read 1"
    assert slow.calls == 1
    # A follower woken after that read started reads again.
    assert await reads.read("job", reads.started, slow) == "read 2"


async def test_a_first_reader_that_goes_away_leaves_the_read_to_those_who_joined():
    reads, slow = SharedReads(), _Slow()
    first, joined = await _first_and_joined(reads, slow)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    slow.release.set()
    # The read started again for the one who joined (the cancelled one never returned).
    assert await asyncio.wait_for(joined, 2.0) == "read 2"


async def test_a_failed_read_reaches_those_who_joined_and_the_next_waker_reads_again():
    reads = SharedReads()
    release = asyncio.Event()

    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        raise ConnectionError("redis went away")

    readers = await _first_and_joined(reads, failing)
    release.set()
    for reader in readers:
        with pytest.raises(ConnectionError):
            await reader
    assert calls == 1  # the second joined the first's read

    async def fine() -> str:
        return "fresh"

    # Same wake-up mark: a failed read is never handed out again.
    assert await reads.read("job", 0, fine) == "fresh"


async def test_a_cancelled_read_is_never_handed_out_and_the_next_waker_reads_again():
    reads, slow = SharedReads(), _Slow()
    first, joined = await _first_and_joined(reads, slow)
    running = asyncio.all_tasks()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    (handed_over,) = asyncio.all_tasks() - running  # the read going on for the one who joined
    handed_over.cancel()  # stopped too (as at shutdown): the shared read ends cancelled
    with pytest.raises(asyncio.CancelledError):
        await joined
    slow.release.set()
    assert await asyncio.wait_for(reads.read("job", 0, slow), 2.0) == "read 3"
