"""The stream of a running job, through the real endpoint (SPEC 2, 3, 5, 6)."""

from __future__ import annotations

import pytest

from tests.conftest import CODINGS
from tests.helpers import expected_points, seed_job, stream

# Every test here runs with the stream sent as it is, gzip and zstd (issue 22).
pytestmark = CODINGS

JOB = "fWroZTP6KfwS3ZjTEFa3"


async def test_seed_example_streams_every_event_as_the_spec_shows(client, writer, token):
    stored = await seed_job(writer(JOB), counts={"day": 103, "minute": 5000, "3minute": 1667})

    transcript = await stream(client, JOB, token=token(), intervals="day,minute,3minute", limit=5000)

    assert transcript.names == (
        ["interval_start", "data_chunk", "interval_complete"]
        + ["interval_start"]
        + ["data_chunk"] * 10
        + ["interval_complete"]
        + ["interval_start"]
        + ["data_chunk"] * 4
        + ["interval_complete"]
        + ["all_complete"]
    )
    events = transcript.events
    assert events[0].retry is not None and 3000 <= events[0].retry <= 6000
    assert all(event.retry is None for event in events[1:])
    assert all(event.id for event in events)
    assert len({event.id for event in events}) == len(events)

    assert events[0].payload == {
        "interval": "day", "interval_index": 0, "total_intervals": 3,
        "total_points": 103, "total_chunks": 1, "chunk_size": 500,
        "backtest_id": None, "job_id": JOB, "symbol": "LTF", "exchange": "NSE",
        "is_partial": True, "current_bar": 50, "job_status": "running",
    }  # fmt: skip
    assert events[1].payload == {
        "interval": "day",
        "data_points": expected_points(stored["day"]),
        "points_sent": 103, "total_points": 103, "chunk_index": 0, "is_last_chunk": True,
        "is_partial": True, "current_bar": 50, "job_status": "running",
        "progress": {
            "total_intervals": 3, "completed_intervals": [], "current_interval": "day",
            "overall_progress": {
                "day": {"total_points": 103, "total_chunks": 1, "chunks_sent": 1, "points_sent": 103},
                "minute": {"total_points": 5000, "total_chunks": 10, "chunks_sent": 0, "points_sent": 0},
                "3minute": {"total_points": 1667, "total_chunks": 4, "chunks_sent": 0, "points_sent": 0},
            },
        },
    }  # fmt: skip
    assert events[2].payload == {
        "interval": "day", "total_points": 103, "points_sent": 103,
        "backtest_id": None, "job_id": JOB, "is_partial": True, "job_status": "running",
    }  # fmt: skip
    minute_chunks = [e.payload for e in transcript.named("data_chunk") if e.payload["interval"] == "minute"]
    assert [c["chunk_index"] for c in minute_chunks] == list(range(10))
    assert [c["points_sent"] for c in minute_chunks] == [500 * (i + 1) for i in range(10)]
    assert [c["is_last_chunk"] for c in minute_chunks] == [False] * 9 + [True]
    assert [p for c in minute_chunks for p in c["data_points"]] == expected_points(stored["minute"])
    assert minute_chunks[3]["progress"]["completed_intervals"] == ["day"]
    assert minute_chunks[3]["progress"]["overall_progress"]["minute"] == {
        "total_points": 5000, "total_chunks": 10, "chunks_sent": 4, "points_sent": 2000,
    }  # fmt: skip
    three = [e.payload for e in transcript.named("data_chunk") if e.payload["interval"] == "3minute"]
    assert [len(c["data_points"]) for c in three] == [500, 500, 500, 167]
    assert [p for c in three for p in c["data_points"]] == expected_points(stored["3minute"])
    assert events[-1].payload == {
        "intervals": ["day", "minute", "3minute"],
        "completed_intervals": ["day", "minute", "3minute"],
        "total_points": {"day": 103, "minute": 5000, "3minute": 1667},
        "backtest_id": None, "job_id": JOB, "job_status": "running",
    }  # fmt: skip


async def test_response_headers_tell_proxies_not_to_buffer(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 3})
    response = await client.get(f"/api/sse/backtest/{JOB}/data/multi", params={"intervals": "day", "token": token()})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    raw = await response.read()
    # Exact framing of the first event: id, event, one data line, retry, blank line.
    first = raw.split(b"\n\n", 1)[0].split(b"\n")
    assert first[0].startswith(b"id: ")
    assert first[1] == b"event: interval_start"
    assert first[2].startswith(b'data: {"interval":"day","interval_index":0,')
    assert first[3].startswith(b"retry: ") and 3000 <= int(first[3][7:]) <= 6000  # jittered


@pytest.mark.parametrize(
    ("limit", "chunk_size", "stored", "expected_sizes"),
    [
        (1, 1, 10, [1]),
        (1, 5000, 10, [1]),
        (10, 3, 10, [3, 3, 3, 1]),
        (10, 10, 10, [10]),
        (50000, 5000, 12, [12]),
        (1000, 1, 3, [1, 1, 1]),
        (5, 500, 3, [3]),
    ],
)
async def test_limit_and_chunk_size_cut_the_first_points_into_chunks(
    client, writer, token, limit, chunk_size, stored, expected_sizes
):
    candles = await seed_job(writer(JOB), counts={"minute": stored})
    transcript = await stream(client, JOB, token=token(), intervals="minute", limit=limit, chunk_size=chunk_size)
    chunks = [e.payload for e in transcript.named("data_chunk")]
    assert [len(c["data_points"]) for c in chunks] == expected_sizes
    total = sum(expected_sizes)
    assert transcript.named("interval_start")[0].payload["total_points"] == total
    assert transcript.named("interval_start")[0].payload["total_chunks"] == len(expected_sizes)
    assert [p for c in chunks for p in c["data_points"]] == expected_points(candles["minute"][:total])


async def test_empty_interval_gets_start_and_complete_without_chunks(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 0, "minute": 2})
    transcript = await stream(client, JOB, token=token(), intervals="day,minute")
    assert transcript.names == [
        "interval_start", "interval_complete",
        "interval_start", "data_chunk", "interval_complete", "all_complete",
    ]  # fmt: skip
    assert transcript.events[0].payload["total_points"] == 0
    assert transcript.events[0].payload["total_chunks"] == 0
    assert transcript.events[1].payload["points_sent"] == 0
    assert transcript.events[-1].payload["completed_intervals"] == ["day", "minute"]


async def test_completed_job_is_not_partial(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 4}, status="completed", current_bar=None)
    transcript = await stream(client, JOB, token=token(), intervals="day")
    for event in transcript.events[:-1]:
        assert event.payload["is_partial"] is False
        assert event.payload["job_status"] == "completed"
    assert transcript.events[0].payload["current_bar"] is None
    assert transcript.events[-1].payload["job_status"] == "completed"


async def test_repeated_intervals_are_streamed_once_in_first_position(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 1, "minute": 1})
    transcript = await stream(client, JOB, token=token(), intervals="minute,day,minute")
    assert [e.payload["interval"] for e in transcript.named("interval_start")] == ["minute", "day"]
    assert transcript.events[-1].payload["intervals"] == ["minute", "day"]


async def test_fifty_thousand_points_at_the_largest_limit(client, writer, token):
    candles = await seed_job(writer(JOB), counts={"minute": 50_000})
    transcript = await stream(client, JOB, token=token(), intervals="minute", limit=50_000, chunk_size=5000)
    chunks = [e.payload for e in transcript.named("data_chunk")]
    assert len(chunks) == 10
    assert chunks[-1]["points_sent"] == 50_000
    assert [p for c in chunks for p in c["data_points"]] == expected_points(candles["minute"])
