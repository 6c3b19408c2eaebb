"""SharedReads (live.py): one read per job and wake-up, started on the first reader's own task.

The endpoint tests (test_live, test_broadcast) show followers sharing reads;
these pin what only a race shows there: the first reader going away, or its
read failing, while others wait on it.
"""

from __future__ import annotations

import asyncio

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


async def test_a_read_runs_on_the_first_readers_task_and_later_wakers_join_it():
    reads, slow = SharedReads(), _Slow()
    first = asyncio.create_task(reads.read("job", 0, slow))
    await asyncio.sleep(0)
    joined = asyncio.create_task(reads.read("job", 0, slow))
    await asyncio.sleep(0)
    slow.release.set()
    assert await first == await joined == "read 1"
    assert slow.calls == 1
    # A follower woken after that read started reads again.
    assert await reads.read("job", reads.started, slow) == "read 2"


async def test_a_first_reader_that_goes_away_leaves_the_read_to_those_who_joined():
    reads, slow = SharedReads(), _Slow()
    first = asyncio.create_task(reads.read("job", 0, slow))
    await asyncio.sleep(0)
    joined = asyncio.create_task(reads.read("job", 0, slow))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    slow.release.set()
    # The read started again for the one who joined (the cancelled one never returned).
    assert await asyncio.wait_for(joined, 2.0) == "read 2"


async def test_a_failed_read_reaches_those_who_joined_and_the_next_waker_reads_again():
    reads = SharedReads()
    release = asyncio.Event()

    async def failing() -> str:
        await release.wait()
        raise ConnectionError("redis went away")

    first = asyncio.create_task(reads.read("job", 0, failing))
    await asyncio.sleep(0)
    joined = asyncio.create_task(reads.read("job", 0, failing))
    await asyncio.sleep(0)
    release.set()
    for reader in (first, joined):
        with pytest.raises(ConnectionError):
            await reader

    async def fine() -> str:
        return "fresh"

    # Same wake-up mark: a failed read is never handed out again.
    assert await reads.read("job", 0, fine) == "fresh"
