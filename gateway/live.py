"""Follow mode's wake-ups: per process, one subscription, one re-check timer and one read per followed job.

Workers publish a note on ``job:{id}:events`` after each change (SPEC 6).
The gateway treats any note as "look again" and never depends on one
arriving. Everything here is per *job*, never per follower, so that ten
thousand idle followers cost what one does:

- the process subscribes to a job's channel when its first follower arrives
  and unsubscribes after the last one leaves;
- a note wakes every follower of the job; woken followers share one read of
  the job (``SharedReads``) and one encoding of each event (``FrameCache``);
- one timer per job (``follow.recheck_interval_s``) covers lost notes: when
  no note arrived during the last interval, it reads the job once and wakes
  the followers only if something changed. An idle follower is an
  ``asyncio.Event`` that nobody sets: no timer, no task switch, no read, no
  Redis connection;
- reads of followers go through one gate of ``follow.max_reads_in_flight``,
  so followers never take the whole pool from new streams, and a read that
  waits for the gate holds no connection.

On a Redis Cluster (``redis.cluster = true``) notes may come by classic
``PUBLISH`` (broadcast to every node, so one connection to any node hears
them) or by sharded ``SPUBLISH`` (heard only on the shard that owns the
channel's slot): the process listens for both, with one connection for the
classic channels and one per shard for the sharded ones (redis-py's
``ClusterPubSub.ssubscribe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from gateway import metrics
from gateway.broadcast import Cohort, Leave, Seat, wire_for
from gateway.errors import GatewayError
from gateway.follow import LeadWith
from gateway.redis_client import RedisBusy, is_cluster
from gateway.sources import keys
from gateway.stream import CandleStream

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a new follower may wait for its subscription, and an idle reader sleeps.
_RECONCILE_S: Final = 0.05
_RETRY_DELAY_S: Final = 1.0


class SharedReads:
    """Reads that all followers of one job in this process can share.

    A note wakes every follower of the job at once, and each would read the
    same job state and the same new chunk. A follower instead joins a read of
    the same key that *started after it woke* (so it sees everything that was
    there when it woke), or starts one that later wakers join. At 100
    followers this turns 200 Redis round trips per append into 2.
    """

    _KEEP: Final = 64  # recent reads remembered, per job

    def __init__(self, gate: asyncio.Semaphore | None = None) -> None:
        self.started = 0  # reads started so far: a follower's wake-up mark
        self._gate = gate
        self._reads: OrderedDict[Hashable, tuple[int, asyncio.Future[Any]]] = OrderedDict()

    def start(self, key: Hashable, woke_at: int, read: Callable[[], Awaitable[T]]) -> tuple[int, asyncio.Future[T]]:
        """The read of ``key`` that started at or after ``woke_at`` (started now if there is none)."""
        entry = self._joinable(key, woke_at)
        if entry is None:
            future = asyncio.ensure_future(self._gated(read))
            entry = (self._remember(key, future), future)
        return entry

    async def read(self, key: Hashable, woke_at: int, read: Callable[[], Awaitable[T]]) -> T:
        entry = self._joinable(key, woke_at)
        if entry is None:
            return await self._read_here(key, read)
        future: asyncio.Future[T] = entry[1]
        if future.done():
            return future.result()  # the common case at many followers: no task switch, no shield
        # shield: one follower leaving must not cancel the others' read.
        result: T = await asyncio.shield(future)
        return result

    async def _read_here(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """Start the read on the caller's own task; followers that wake meanwhile join its future.

        No task of its own: under load every task switch waits a whole turn
        of the event loop, and a cohort's leader is most often its job's only
        reader. If the caller is cancelled mid-read (its stream went away),
        the read goes on in a task for those who joined.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._remember(key, future)
        try:
            result = await self._gated(read)
        except asyncio.CancelledError:
            if not future.done():
                _chain(asyncio.ensure_future(self._gated(read)), future)
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody may have joined, and the caller raises it anyway
            raise
        future.set_result(result)
        return result

    def _joinable(self, key: Hashable, woke_at: int) -> tuple[int, asyncio.Future[Any]] | None:
        """The read of ``key`` a follower woken at ``woke_at`` may share: started since, and not failed."""
        entry = self._reads.get(key)
        if entry is None or entry[0] < woke_at:
            return None
        future = entry[1]
        # cancelled() first: exception() raises on a cancelled future (a read handed over and then stopped)
        if future.done() and (future.cancelled() or future.exception() is not None):
            return None
        return entry

    def _remember(self, key: Hashable, future: asyncio.Future[Any]) -> int:
        mark = self.started
        self.started += 1
        self._reads[key] = (mark, future)
        self._reads.move_to_end(key)
        if len(self._reads) > self._KEEP:
            self._reads.popitem(last=False)
        return mark

    async def _gated(self, read: Callable[[], Awaitable[T]]) -> T:
        if self._gate is None:
            return await read()
        async with self._gate:  # waiting here holds no Redis connection
            return await read()


def _chain(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    """``target`` gets ``source``'s outcome when it has one."""

    def copy(done: asyncio.Future[T]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (exc := done.exception()) is not None:
            target.set_exception(exc)
            target.exception()  # retrieved: those who joined may all have gone
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


class FrameCache:
    """Encoded events of one job, shared by its followers that would send the very same bytes.

    ``CandleStream`` keys a frame by everything its bytes depend on (the
    event, its id, the request's shape, the job state and the chunk), so a
    hit is exactly the frame the stream would have built itself.
    """

    _KEEP: Final = 256

    def __init__(self) -> None:
        self._frames: OrderedDict[Hashable, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        frame = self._frames.get(key)
        if frame is None:
            self.misses += 1
        else:
            self.hits += 1
        return frame

    def put(self, key: Hashable, frame: bytes) -> None:
        self._frames[key] = frame
        if len(self._frames) > self._KEEP:
            self._frames.popitem(last=False)


Probe = Callable[[], Awaitable[object]]


class _Job:
    """What the process keeps for one followed job."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self.streams = 0  # follow streams of the job in this process
        # The followers a note wakes: streams waiting on their own task, and cohort leaders (not riders).
        self.followers: set[Follower] = set()
        self.cohorts: list[Cohort] = []
        self.reads = SharedReads(gate)
        self.frames = FrameCache()
        # key -> (how many followers use it, the read): one probe per distinct request.
        self.probes: dict[Hashable, tuple[int, Probe]] = {}
        self.seen: dict[Hashable, object] = {}  # probe key -> what its last probe read
        self.noted = False  # a note arrived since the last tick
        self.timer: asyncio.TimerHandle | None = None
        self.probing: asyncio.Task[None] | None = None

    def wake_all(self, woke_at: int | None = None, note_at: float | None = None) -> None:
        mark = self.reads.started if woke_at is None else woke_at
        for follower in self.followers:
            follower.notify(mark, note_at)


class Follower:
    """One stream's view of its job: ``wait_for_change`` returns when the job (probably) changed."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._changed = asyncio.Event()
        self._woke_at = self._noted_at = job.reads.started
        # When the earliest note not yet answered by a look reached the process (loop clock).
        self._note_at: float | None = None

    @property
    def frames(self) -> FrameCache:
        """Frames shared with the job's other followers."""
        return self._job.frames

    def notify(self, woke_at: int, note_at: float | None = None) -> None:
        # Marked when the note arrives, not when this task next runs: by then
        # another follower may have started the read this one can join. A
        # follower still busy with an earlier note keeps its current mark
        # until it waits again, so that the reads of one round stay shared
        # and followers of one job stay at one position (and share frames).
        self._noted_at = woke_at
        if self._note_at is None:
            self._note_at = note_at
        self._changed.set()

    def looked(self) -> None:
        """The look a note caused has handed its events to the sockets: how long after the note (a metric)."""
        if self._note_at is not None:
            if metrics.SWITCH.on:
                metrics.NOTE_TO_WRITTEN_SECONDS.observe(asyncio.get_running_loop().time() - self._note_at)
            self._note_at = None

    async def wait_for_change(self) -> None:
        await self._changed.wait()
        self._changed.clear()
        self._woke_at = self._noted_at

    def watch(self, key: Hashable, probe: Probe) -> None:
        """Let the job's re-check timer run ``probe`` (a shared read summing up the job) for this follower."""
        count, _ = self._job.probes.get(key, (0, probe))
        self._job.probes[key] = (count + 1, probe)

    def unwatch(self, key: Hashable) -> None:
        entry = self._job.probes.get(key)
        if entry is None or entry[0] <= 1:
            self._job.probes.pop(key, None)
            self._job.seen.pop(key, None)
        else:
            self._job.probes[key] = (entry[0] - 1, entry[1])

    async def shared(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or the result of an identical read another follower started since this one woke."""
        return await self._job.reads.read(key, self._woke_at, read)

    async def ride(self, stream: CandleStream, seat: Seat, lead: LeadWith) -> Leave | None:
        """Board the job's cohort at ``stream``'s position (starting one, led by ``lead``) until let go.

        None when the stream cannot board now (a note is pending, it has not
        sent its first data_chunk, its response cannot be written to directly).
        While it rides, notes do not wake it: the cohort's leader reads for it.
        """
        job = self._job
        if self._changed.is_set() or (wire := wire_for(stream, seat)) is None:
            return None
        cohort = next((cohort for cohort in job.cohorts if cohort.accepts(stream)), None)
        if cohort is None:
            cohort = Cohort(stream, partial(self._lead, lead), job.cohorts.remove)
            job.cohorts.append(cohort)
        job.followers.discard(self)
        try:
            return await cohort.ride(stream, seat, wire)
        finally:
            job.followers.add(self)
            # It adopted what the leader sent: its next read must start after that.
            self._woke_at = self._noted_at = job.reads.started

    async def _lead(self, lead: LeadWith, leader: CandleStream) -> None:
        feed = Follower(self._job)
        self._job.followers.add(feed)
        try:
            await lead(leader, feed)
        finally:
            self._job.followers.discard(feed)


class JobNotes:
    """The process's subscriptions and re-check timers, shared by all followers of each job.

    One task owns each pub/sub connection: it alone subscribes, unsubscribes
    and reads (redis-py's connection is not safe to drive from two tasks at
    once). Between short reads it brings the subscriptions in line with the
    jobs that have followers.
    """

    def __init__(self, client: aioredis.Redis, recheck_interval_s: float, max_reads_in_flight: int = 16) -> None:
        self._client = client
        self._recheck_interval_s = recheck_interval_s
        self._max_reads_in_flight = max_reads_in_flight
        self._gate: asyncio.Semaphore | None = None
        self._jobs: dict[bytes, _Job] = {}
        self._listeners: list[_Listener] = [_Listener(self, sharded=False)]
        if is_cluster(client):
            self._listeners.append(_Listener(self, sharded=True))
        self._readers: list[asyncio.Task[None]] = []
        self.closed = False

    @property
    def subscribed_jobs(self) -> int:
        """How many job channels this process listens to (for tests and metrics)."""
        return len(self._listeners[0].subscribed)

    @property
    def followed_jobs(self) -> int:
        """How many jobs have followers in this process."""
        return len(self._jobs)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Follower]:
        """Notes of ``job_id`` for the body's duration."""
        channel = keys.events_channel(job_id).encode()
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._max_reads_in_flight)
        job = self._jobs.get(channel)
        if job is None:
            job = self._jobs[channel] = _Job(self._gate)
            self._arm(job)
        follower = Follower(job)
        job.followers.add(follower)
        job.streams += 1
        if not self._readers or all(reader.done() for reader in self._readers):
            self._readers = [
                asyncio.create_task(listener.run(), name=f"job-notes-{listener.kind}") for listener in self._listeners
            ]
        try:
            yield follower
        finally:
            job.followers.discard(follower)
            job.streams -= 1
            if not job.streams:
                self._jobs.pop(channel, None)
                if job.timer is not None:
                    job.timer.cancel()

    def wanted(self) -> set[bytes]:
        return set(self._jobs)

    def hears(self, job_id: str) -> bool:
        """Whether Redis confirmed this process's subscription to the job's notes (and it still holds).

        A follower registered while this holds is woken by every change
        written after it registered, so a stream that registers before it
        reads the job needs no look of its own after its snapshot. Only on a
        single server: a cluster's sharded subscriptions move with their
        slots (redis-py resubscribes on its own), so there it always looks.
        Were a note missed all the same, the job's re-check timer still finds
        the change: later, never lost.
        """
        listeners = self._listeners
        return len(listeners) == 1 and keys.events_channel(job_id).encode() in listeners[0].confirmed

    def noted(self, channel: bytes) -> None:
        job = self._jobs.get(channel)
        if job is not None:
            job.noted = True
            job.wake_all(note_at=asyncio.get_running_loop().time())

    # -- the re-check timer, one per job -----------------------------------

    def _arm(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.timer = loop.call_later(self._recheck_interval_s, self._tick, job)

    def _tick(self, job: _Job) -> None:
        if not job.streams:
            return
        self._arm(job)
        if job.noted:
            job.noted = False  # notes arrive: the followers were woken by them
            return
        if job.probing is None or job.probing.done():
            job.probing = asyncio.create_task(self._probe(job), name="job-recheck")

    async def _probe(self, job: _Job) -> None:
        for key, (_, probe) in list(job.probes.items()):
            mark, future = job.reads.start(key, job.reads.started, probe)
            try:
                summary = await asyncio.shield(future)
            except RedisBusy:
                continue  # try again at the next tick
            except GatewayError:
                job.wake_all(mark)  # let the followers meet the error (connection_error, job_not_found...)
                continue
            if job.seen.get(key) != summary:
                job.seen[key] = summary
                job.wake_all(mark)

    async def aclose(self) -> None:
        # The flag as well as the cancel: redis-py's get_message can swallow a
        # cancellation that lands inside its own timeout, and the reader would
        # then poll on forever (a shutdown that never ended, seen in a test run).
        self.closed = True
        for reader in self._readers:
            reader.cancel()
        if self._readers:
            await asyncio.wait(self._readers, timeout=2.0)
        for job in self._jobs.values():
            if job.timer is not None:
                job.timer.cancel()
            if job.probing is not None:
                job.probing.cancel()
        for listener in self._listeners:
            await listener.aclose()


class _Listener:
    """One kind of subscription (classic or sharded) and the task that reads it."""

    def __init__(self, notes: JobNotes, *, sharded: bool) -> None:
        self._notes = notes
        self.sharded = sharded
        self.kind = "sharded" if sharded else "classic"
        self.subscribed: set[bytes] = set()
        # Of those, the ones Redis confirmed (classic only): a note published from now on reaches us.
        self.confirmed: set[bytes] = set()
        self._pubsub: PubSub | None = None

    def _connect(self) -> PubSub:
        client = self._notes._client
        if isinstance(client, RedisCluster):
            return ClusterPubSub(client, ignore_subscribe_messages=True)
        return client.pubsub(ignore_subscribe_messages=False)  # the confirmations mark ``confirmed``

    async def run(self) -> None:
        while not self._notes.closed:
            try:
                if self._pubsub is None:
                    self._pubsub = self._connect()
                await self._reconcile(self._pubsub)
                if not self.subscribed:
                    await asyncio.sleep(_RECONCILE_S)
                    continue
                message = await self._next(self._pubsub)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("job notes connection (%s) failed (%s); re-checks cover meanwhile", self.kind, exc)
                await self._drop()
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            if message is None:
                continue
            kind = message.get("type")
            if kind == "subscribe" and message["channel"] in self.subscribed:
                self.confirmed.add(message["channel"])
            elif kind == "unsubscribe":
                self.confirmed.discard(message["channel"])  # a later subscribe's confirmation follows it
            elif kind in ("message", "smessage"):
                self._notes.noted(message["channel"])

    async def _next(self, pubsub: PubSub) -> dict[str, Any] | None:
        if self.sharded:
            assert isinstance(pubsub, ClusterPubSub)
            message = await pubsub.get_sharded_message(timeout=_RECONCILE_S / max(1, len(pubsub.node_pubsub_mapping)))
        else:
            message = await pubsub.get_message(timeout=_RECONCILE_S)
        return message

    async def _reconcile(self, pubsub: PubSub) -> None:
        wanted = self._notes.wanted()
        if new := wanted - self.subscribed:
            if self.sharded:
                assert isinstance(pubsub, ClusterPubSub)
                await pubsub.ssubscribe(*new)
            else:
                await pubsub.subscribe(*new)
            self.subscribed |= new
        if gone := self.subscribed - wanted:
            self.confirmed -= gone
            if self.sharded:
                assert isinstance(pubsub, ClusterPubSub)
                await pubsub.sunsubscribe(*gone)
            else:
                await pubsub.unsubscribe(*gone)
            self.subscribed -= gone

    async def _drop(self) -> None:
        """Forget the connection: the next round makes a new one and subscribes again."""
        self.subscribed.clear()
        self.confirmed.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        await self._drop()
