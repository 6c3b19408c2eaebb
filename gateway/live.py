"""Follow mode's wake-ups: per process, one subscription and one hub per followed job.

Workers publish a note on ``job:{id}:events`` after each change (SPEC 6).
The gateway treats any note as "look again" and never depends on one
arriving. Everything here is per *job*, never per follower, so that ten
thousand idle followers cost what one does:

- the process subscribes to a job's channel when its first follow stream
  registers and unsubscribes after the last one leaves;
- a note wakes the job's hub (``hub.py``), which reads once and writes to
  every follower; the hub's own timer (``follow.recheck_interval_s``)
  covers lost notes;
- the hubs' looks at their jobs go to Redis as one pipeline per loop turn
  for every job woken in it, a few pipelines in flight at most
  (``sources/batch.py``); their other reads (a chunk when more than one
  was appended) go through one gate of ``follow.max_reads_in_flight``, so
  followers never take the whole pool from new streams, and a read that
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
from collections.abc import AsyncIterator
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from gateway.hub import Hub
from gateway.redis_client import is_cluster, raise_if_cancelling
from gateway.sources import keys

log = logging.getLogger(__name__)

# How long a new follower may wait for its subscription, and an idle reader sleeps.
_RECONCILE_S: Final = 0.05
_RETRY_DELAY_S: Final = 1.0


class Registration:
    """One follow stream's hold on its job's notes: the job's hub, and the notes heard when it registered."""

    __slots__ = ("heard_at", "hub")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.heard_at = hub.notes_heard


class _Job:
    __slots__ = ("hub", "streams")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.streams = 0  # follow streams of the job registered in this process


class JobNotes:
    """The process's subscriptions and hubs, shared by all followers of each job.

    One task owns each pub/sub connection: it alone subscribes, unsubscribes
    and reads (redis-py's connection is not safe to drive from two tasks at
    once). Between short reads it brings the subscriptions in line with the
    jobs that have followers.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        recheck_interval_s: float,
        max_reads_in_flight: int = 16,
        status_min_interval_s: float = 1.0,
    ) -> None:
        self._client = client
        self._recheck_interval_s = recheck_interval_s
        self._status_min_interval_s = status_min_interval_s
        self._max_reads_in_flight = max_reads_in_flight
        self._gate: asyncio.Semaphore | None = None
        self._jobs: dict[bytes, _Job] = {}
        self._listeners: list[_Listener] = [_Listener(self, sharded=False)]
        if is_cluster(client):
            self._listeners.append(_Listener(self, sharded=True))
        self._readers: list[asyncio.Task[None]] = []
        self._hub_tasks: set[asyncio.Task[None]] = set()  # running hubs (a hub outlives its job's last stream briefly)
        self.closed = False

    @property
    def subscribed_jobs(self) -> int:
        """How many job channels this process listens to (for tests and metrics)."""
        return len(self._listeners[0].subscribed)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Registration]:
        """Notes of ``job_id`` reach its hub for the body's duration."""
        channel = keys.events_channel(job_id).encode()
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._max_reads_in_flight)
        job = self._jobs.get(channel)
        if job is None:
            hub = Hub(
                self._gate,
                recheck_interval_s=self._recheck_interval_s,
                status_min_interval_s=self._status_min_interval_s,
                running=self._hub_tasks,
            )
            job = self._jobs[channel] = _Job(hub)
        job.streams += 1
        if not self._readers or all(reader.done() for reader in self._readers):
            self._readers = [
                asyncio.create_task(listener.run(), name=f"job-notes-{listener.kind}") for listener in self._listeners
            ]
        try:
            yield Registration(job.hub)
        finally:
            job.streams -= 1
            if not job.streams:
                self._jobs.pop(channel, None)

    def hub(self, job_id: str) -> Hub | None:
        """The hub of a job followed in this process (for tests and operators)."""
        job = self._jobs.get(keys.events_channel(job_id).encode())
        return None if job is None else job.hub

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
            job.hub.noted(asyncio.get_running_loop().time())

    async def aclose(self) -> None:
        # The flag as well as the cancel: redis-py's get_message can swallow a
        # cancellation that lands inside its own timeout, and the reader would
        # then poll on forever (a shutdown that never ended, seen in a test run).
        self.closed = True
        for reader in self._readers:
            reader.cancel()
        # Hubs too: their followers are gone by now (drained), but a hub notices that only at its next pass.
        hubs = list(self._hub_tasks)
        for hub in hubs:
            hub.cancel()
        if waited := [*self._readers, *hubs]:
            await asyncio.wait(waited, timeout=2.0)
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
            # A cancellation redis-py swallowed (a subscribe's write, bpo-42130) ends the reader all the same.
            raise_if_cancelling()
            try:
                if self._pubsub is None:
                    self._pubsub = self._connect()
                await self._reconcile(self._pubsub)
                if not self.subscribed:
                    await asyncio.sleep(_RECONCILE_S)
                    continue
                message = await self._next(self._pubsub)
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("job notes connection (%s) failed (%s); re-checks cover meanwhile", self.kind, exc)
                await self._drop()
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            except Exception:
                # Not Redis's own error (uvloop's RuntimeError on a reset transport, a bug):
                # the listener must not end over it, or notes stop for good.
                log.exception("job notes connection (%s) failed; re-checks cover meanwhile", self.kind)
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
