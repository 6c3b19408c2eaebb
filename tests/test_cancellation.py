"""Every long-running task that awaits Redis ends when it is cancelled, even where redis-py swallows the cancellation.

Python 3.11's ``asyncio.wait_for`` (bpo-42130), which redis-py puts around
every socket write when a socket timeout is set (the gateway always sets
one), returns the write's result instead of raising when the cancellation
lands after the write finished and before the waiting task resumed. The
task's ``cancelling()`` count stays raised, nothing is raised, and a loop
goes on for good: a shutdown that awaits it never ends.

``cancel_where_swallowed`` makes that moment certain instead of rare: it
polls the task on every turn of the event loop and cancels it exactly while
its chain of awaits stands in ``wait_for`` with the inner write already
done. Each test then asserts that the task ends within a generous bound.
On Python 3.12 and later ``wait_for`` no longer swallows; the tests still
assert the same (the task ends promptly when cancelled there).

Real parts: a real Valkey, the gateway's own client (``build_redis_client``,
with its socket timeout), the real loops; follow hubs through the real
endpoint.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.config import RedisSettings
from gateway.limits import StreamSlots
from gateway.live import JobNotes
from gateway.redis_client import build_redis_client, call_redis, raise_if_cancelling
from gateway.resources import NOTES
from tests.conftest import DATASET, PROJECT
from tests.faults import eventually
from tests.helpers import make_candles, open_followers, open_stream, seed_job
from tests.test_backtests import new_backtest

SWALLOWS = sys.version_info < (3, 12)  # bpo-42130: asyncio.wait_for of 3.11 and before
ENDS_WITHIN_S = 5.0  # generous: the machine is shared and loaded
WINDOW_WAIT_S = 20.0


def _in_swallowing_window(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` stands in ``asyncio.wait_for`` whose inner awaitable is already done.

    A cancellation now is swallowed on Python 3.11 (``wait_for`` returns the
    inner result). Walks the task's chain of awaits (``cr_await``, public
    attributes of coroutine objects).
    """
    awaited: Any = task.get_coro()
    while awaited is not None and hasattr(awaited, "cr_frame"):
        frame = awaited.cr_frame
        code = frame.f_code if frame is not None else None
        if code is not None and code.co_name == "wait_for" and code.co_filename.endswith("tasks.py"):
            inner = frame.f_locals.get("fut")
            return isinstance(inner, asyncio.Future) and inner.done()
        awaited = awaited.cr_await
    return False


async def cancel_where_swallowed(task: asyncio.Task[Any], wait_s: float = WINDOW_WAIT_S) -> bool:
    """Cancel ``task`` at the moment 3.11 swallows a cancellation (or, never seen there, after ``wait_s``).

    Returns whether it was cancelled in that moment. Polls on every turn of
    the event loop, so a window of one turn is never missed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not task.done() and loop.time() < deadline:
        await asyncio.sleep(0)
        if _in_swallowing_window(task):
            task.cancel()
            return True
    task.cancel()
    return False


async def ends_within(task: asyncio.Task[Any], seconds: float = ENDS_WITHIN_S) -> bool:
    await asyncio.wait([task], timeout=seconds)
    return task.done()


def _task_named(prefix: str) -> asyncio.Task[Any] | None:
    return next((task for task in asyncio.all_tasks() if task.get_name().startswith(prefix)), None)


@pytest.fixture
async def gateway_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The gateway's own client (its pool, retries and socket timeout: redis-py's ``wait_for`` path)."""
    client = build_redis_client(RedisSettings(url=redis_url))
    yield client
    await client.aclose()


def _loop_of_calls(call: Callable[[], Awaitable[object]]) -> Callable[[], Coroutine[Any, Any, None]]:
    async def loop() -> None:
        while True:
            await call()
            await asyncio.sleep(0.005)

    return loop


@pytest.mark.skipif(not SWALLOWS, reason="bpo-42130 is fixed in Python 3.12: wait_for no longer swallows")
async def test_the_premise_redis_py_swallows_a_cancellation_on_python_3_11(gateway_redis):
    """Without the gateway's check, a loop of plain redis-py calls survives its cancellation."""
    task = asyncio.create_task(_loop_of_calls(lambda: gateway_redis.set("cancel:premise", b"1"))())
    try:
        assert await cancel_where_swallowed(task)
        assert not await ends_within(task, 1.0)
        assert task.cancelling() == 1  # asked, never raised
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=ENDS_WITHIN_S)


async def test_a_loop_of_call_redis_ends_though_redis_py_swallowed_its_cancellation(gateway_redis):
    task = asyncio.create_task(
        _loop_of_calls(lambda: call_redis(lambda: gateway_redis.set("cancel:loop", b"1"), "a test's write"))()
    )
    assert await cancel_where_swallowed(task) or not SWALLOWS
    assert await ends_within(task)
    assert task.cancelled()


async def test_a_cleanup_after_a_caught_cancellation_still_reaches_redis(gateway_redis):
    """Only a cancellation asked for during a call is raised: a task cleaning up after one is left alone."""
    started = asyncio.Event()

    async def cleans_up() -> str:
        try:
            started.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await call_redis(lambda: gateway_redis.set("cancel:cleanup", b"1"), "a cleanup")
            await call_redis(lambda: gateway_redis.set("cancel:cleanup", b"2"), "a second cleanup")
            raise
        return "not cancelled"

    task = asyncio.create_task(cleans_up())
    await started.wait()
    task.cancel()
    await asyncio.wait([task], timeout=ENDS_WITHIN_S)
    assert task.cancelled()
    assert await gateway_redis.get("cancel:cleanup") == b"2"


async def test_the_slot_heartbeat_ends_though_redis_py_swallowed_its_cancellation(gateway_redis):
    slots = StreamSlots(gateway_redis, max_per_user=4, ttl_s=3, retry_after_s=1)
    slots.start()
    heartbeat = _task_named("stream-slot-heartbeat")
    assert heartbeat is not None
    try:
        assert await cancel_where_swallowed(heartbeat) or not SWALLOWS
        assert await ends_within(heartbeat)
    finally:
        await slots.aclose()


async def test_the_slot_refresher_ends_though_redis_py_swallowed_its_cancellation(gateway_redis):
    slots = StreamSlots(gateway_redis, max_per_user=4, ttl_s=1, retry_after_s=1)  # refreshes every 1/3 s
    slot = await slots.acquire("cancel-user")
    refresher = _task_named("stream-slot-refresh")
    assert refresher is not None
    try:
        assert await cancel_where_swallowed(refresher) or not SWALLOWS
        assert await ends_within(refresher)
    finally:
        slots.release(slot)
        await slots.aclose()


async def test_the_job_notes_listener_ends_though_redis_py_swallowed_its_cancellation(gateway_redis):
    notes = JobNotes(gateway_redis, recheck_interval_s=30.0)
    try:
        async with notes.follow("cancel-job"):
            listener = _task_named("job-notes-classic")
            assert listener is not None
            # Its subscribe is a write: cancelled right there, the reader must still end
            # (not only when ``aclose`` also raises its flag).
            assert await cancel_where_swallowed(listener) or not SWALLOWS
            assert await ends_within(listener)
    finally:
        await notes.aclose()


async def test_a_follow_hub_ends_though_redis_py_swallowed_its_cancellation(make_gateway, writer, token):
    """A hub cancelled while it reads ends, and its followers' streams with it.

    Its reads reach redis-py from other tasks today (its looks from the pipeline
    batch's, sources/batch.py; its catch-up chunks from the list readers'), which
    a cancellation of the hub does not reach: no moment to swallow it is expected.
    Should one appear (a read moved into the hub's task), the cancellation lands
    there, and the hub must end all the same (``raise_if_cancelling`` each pass).
    Each append is bigger than the stream's chunk, so the hub reads catch-up chunks too.
    """
    _, w, response, hub = await _one_follower_in_its_hub(make_gateway, writer, token, "cancel-hub-job", 0.05)
    appending = asyncio.create_task(_append_until_cancelled(w))
    try:
        await cancel_where_swallowed(hub, wait_s=3.0)  # in such a moment if one comes, else after 3 s of reads
        assert await ends_within(hub)
    finally:
        appending.cancel()
    # Its follower's stream ends (it resumes by Last-Event-ID on another hub).
    await asyncio.wait_for(response.content.read(), ENDS_WITHIN_S * 2)


async def test_a_shutdown_stops_a_follow_hub_that_still_has_its_task(make_gateway, writer, token):
    """``JobNotes.aclose`` cancels the process's hubs: none outlives the app, however long its re-check timer."""
    client, _, response, hub = await _one_follower_in_its_hub(make_gateway, writer, token, "cancel-hub-shutdown", 30.0)
    await client.server.app[NOTES].aclose()
    assert await ends_within(hub)
    response.close()


async def _one_follower_in_its_hub(
    make_gateway: Any, writer: Any, token: Any, job: str, recheck_interval_s: float
) -> tuple[Any, Any, Any, asyncio.Task[Any]]:
    """A gateway, the job's writer, one follow stream of the job and its hub's task, once the hub runs."""
    client = await make_gateway(follow={"recheck_interval_s": recheck_interval_s}, server={"max_streams_per_user": 0})
    w = writer(job)
    await seed_job(w, counts={"minute": 1})
    follow = {"intervals": "minute", "follow": "true", "chunk_size": 1}
    ((response, _),) = await open_followers(client, job, token, 1, **follow)
    assert await eventually(lambda: _holds(_task_named("follow-hub") is not None), ENDS_WITHIN_S)
    hub = _task_named("follow-hub")
    assert hub is not None
    return client, w, response, hub


async def _append_until_cancelled(w: Any) -> None:
    """Three candles every 20 ms: each note makes the hub look, then read two chunks more (in its task)."""
    first = 1
    while True:
        raise_if_cancelling()  # its own cancel can be swallowed by redis-py too (bpo-42130)
        await w.append("minute", make_candles(3, first=first))
        first += 3
        await asyncio.sleep(0.02)


async def _holds(value: bool) -> bool:
    return value


# -- cache fills (gateway/sources/cache.py): the fill and its lock keeper ------------------


async def _cold_fill(make_gateway, bq_proxy, bq, token) -> tuple[Any, asyncio.Task[Any]]:
    """A cold backtest interval being read from a slow warehouse (a page a second); the stream reading it."""
    backtest_id, _ = new_backtest(bq, {"minute": 5000})
    bigquery = {
        "project": PROJECT,
        "dataset": DATASET,
        "api_endpoint": bq_proxy.url,
        "page_rows": 1000,
        "fill_lock_ttl_s": 0.5,  # the keeper refreshes every 1/6 s
    }
    client = await make_gateway(bigquery=bigquery, server={"max_streams_per_user": 0})
    bq_proxy.delay_s = 1.0
    reading = asyncio.create_task(
        open_stream(client, backtest_id, token=token(), intervals="minute", limit=50000, chunk_size=500)
    )
    return client, reading


async def test_a_cache_fills_lock_keeper_ends_though_redis_py_swallowed_its_cancellation(
    make_gateway, bq_proxy, bq, token
):
    """A keeper left running would keep the lock of a read nobody makes: no other stream could take it over."""
    _, reading = await _cold_fill(make_gateway, bq_proxy, bq, token)
    try:
        assert await eventually(lambda: _holds(_task_named("cache-fill-lock ") is not None), 20.0)
        keeper = _task_named("cache-fill-lock ")
        assert keeper is not None
        assert await cancel_where_swallowed(keeper) or not SWALLOWS
        assert await ends_within(keeper)
    finally:
        bq_proxy.delay_s = 0.0
        reading.cancel()


async def test_a_cache_fill_ends_though_redis_py_swallowed_its_cancellation(make_gateway, bq_proxy, bq, token):
    """Cancelled (a shutdown) while it stages a page: it ends there, not after reading the whole interval."""
    _, reading = await _cold_fill(make_gateway, bq_proxy, bq, token)
    try:
        assert await eventually(lambda: _holds(_task_named("cache-fill ") is not None), 20.0)
        fill = _task_named("cache-fill ")
        assert fill is not None
        assert await cancel_where_swallowed(fill) or not SWALLOWS
        assert await ends_within(fill, 3.0)  # under the four pages (a second each) still to read
    finally:
        bq_proxy.delay_s = 0.0
        reading.cancel()


async def test_the_background_tasks_stop_promptly_while_redis_hangs(valkey, direct):
    """A hung Redis (SIGSTOP): the heartbeat, refresher and notes listener blocked in calls stop at once on close."""
    # A socket timeout far above the bound asserted: on a loaded machine the bound needs room,
    # and what it tells apart (stopped at once, or only when redis-py's timeout ran out) stays clear.
    client = build_redis_client(RedisSettings(url=valkey.url, socket_timeout_s=30.0, retries=2))
    slots = StreamSlots(client, max_per_user=4, ttl_s=1, retry_after_s=1)
    notes = JobNotes(client, recheck_interval_s=30.0)
    pid = int((await direct.info("server"))["process_id"])
    try:
        slots.start()
        slot = await slots.acquire("hung-user")
        async with notes.follow("hung-job"):
            assert await eventually(lambda: _holds(notes.hears("hung-job")), ENDS_WITHIN_S)
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(1.5)  # the heartbeat and the refresher are now waiting for answers
            started = asyncio.get_running_loop().time()
            await notes.aclose()
            slots.release(slot)
            await slots.aclose()  # gives releases 1 s, then cancels them
            took = asyncio.get_running_loop().time() - started
        # redis-py alone would wait out its socket timeout (30 s) per attempt.
        assert took < 10.0, took  # the releases are given 1 s before they are cancelled
        assert _task_named("stream-slot-") is None and _task_named("job-notes-") is None
    finally:
        os.kill(pid, signal.SIGCONT)
        await client.aclose()
