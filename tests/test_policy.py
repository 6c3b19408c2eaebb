"""The ordering policy (SPEC 7) as a pure function: every walk, every order, every resume point."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from gateway.params import Order, StreamRequest
from gateway.policy import Action, Complete, SendChunk, Start, next_action
from gateway.position import Phase, StreamPosition, decode_position


@dataclass(frozen=True)
class Job:
    """What a walk needs of the stored data: points per interval, None for an interval not configured."""

    totals: tuple[int | None, ...]
    chunk_size: int
    order: Order

    def request(self) -> StreamRequest:
        return StreamRequest(
            id="job-1",
            intervals=tuple(f"i{n}" for n in range(len(self.totals))),
            limit=50_000,
            chunk_size=self.chunk_size,
            follow=False,
            order=self.order,
            token=None,
            last_event_id=None,
        )


jobs = st.builds(
    Job,
    totals=st.lists(st.one_of(st.none(), st.integers(0, 40)), min_size=1, max_size=6).map(tuple),
    chunk_size=st.integers(1, 12),
    order=st.sampled_from(Order),
)


def apply(position: StreamPosition, action: Action, job: Job) -> None:
    """What the stream does to its position when it sends the action's event."""
    interval = position.intervals[action.index]
    match action:
        case Start(index):
            total = job.totals[index]
            if total is None:
                interval.phase = Phase.FAILED
            else:
                interval.phase, interval.total_points = Phase.STARTED, total
        case SendChunk(index):
            interval.points_sent += min(job.chunk_size, interval.total_points - interval.points_sent)
            interval.chunks_sent += 1
        case Complete(index):
            interval.phase = Phase.COMPLETE


def walk(job: Job, position: StreamPosition | None = None) -> list[Action]:
    request = job.request()
    position = position or StreamPosition.start(request, is_partial=False)
    actions = []
    while (action := next_action(position, job.order)) is not None:
        actions.append(action)
        apply(position, action, job)
        assert len(actions) <= 10_000, "the policy does not terminate"
    return actions


@given(jobs)
def test_every_interval_gets_exactly_its_events(job):
    actions = walk(job)
    for index, total in enumerate(job.totals):
        mine = [a for a in actions if a.index == index]
        if total is None:
            assert mine == [Start(index)]  # interval_not_found, nothing else
            continue
        chunks = math.ceil(total / job.chunk_size)
        assert isinstance(mine[0], Start) and isinstance(mine[-1], Complete)
        assert [type(a) for a in mine[1:-1]] == [SendChunk] * chunks


@given(jobs.filter(lambda job: job.order is Order.SEQUENTIAL))
def test_sequential_order_finishes_each_interval_before_the_next_starts(job):
    indexes = [a.index for a in walk(job)]
    assert indexes == sorted(indexes)
    assert all(a.prefetch for a in walk(job) if isinstance(a, SendChunk))


@given(jobs.filter(lambda job: job.order is Order.INTERLEAVED))
def test_interleaved_order_starts_all_then_sends_one_chunk_per_interval_per_round(job):
    actions = walk(job)
    starts = len(job.totals)
    assert actions[:starts] == [Start(i) for i in range(starts)]
    sent = [0] * starts
    remaining = [math.ceil(total / job.chunk_size) if total is not None else 0 for total in job.totals]
    for previous, action in zip(actions[starts - 1 :], actions[starts:], strict=False):
        if isinstance(action, SendChunk):
            assert not action.prefetch
            # Round robin: no interval gets a chunk ahead of one that has sent fewer.
            unfinished = [i for i in range(starts) if sent[i] < remaining[i]]
            assert sent[action.index] == min(sent[i] for i in unfinished)
            sent[action.index] += 1
        else:
            assert isinstance(action, Complete)
            total = job.totals[action.index]
            assert total is not None
            # interval_complete right after the interval's last chunk (or at once when empty).
            assert total == 0 or previous == SendChunk(action.index, prefetch=False)


@given(jobs, st.data())
def test_resuming_from_any_event_id_continues_the_same_walk(job, data):
    request = job.request()
    uninterrupted = walk(job)
    cut = data.draw(st.integers(0, len(uninterrupted)))
    position = StreamPosition.start(request, is_partial=False)
    for action in uninterrupted[:cut]:
        apply(position, action, job)
    # What a reconnecting client sends back: the position packed into an event id.
    resumed = decode_position(position.encode().decode(), request)
    assert walk(job, resumed) == uninterrupted[cut:]
