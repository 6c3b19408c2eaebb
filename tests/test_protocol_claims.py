"""docs/PROTOCOL.md's field claims, checked against real events from a real gateway.

Section 3's table says, per event, which fields it always carries, which of
them may be ``null``, and which it never carries. Here a gateway (the real app
on a real port, Valkey, the BigQuery emulator) streams every kind of event:
running and completed jobs, a job that completed into a backtest, follow mode
with live chunks and job_status events, backtests from the warehouse with and
without a job id, and each error (interval_not_found, data_error,
job_not_found, job_error, connection_error). Then, for every event received:

- its fields are exactly the "always" set of its name (none missing, none
  extra, none of the "never" set);
- a field that is ``null`` is in "may be null"; and every "may be null" field
  was seen both ``null`` and not (so the column claims nothing untested).

The table must also agree with docs/openapi.yaml (each payload schema's
properties) and with the JSON example under each event's heading.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.event_schemas import event_schemas, openapi_document
from tests.helpers import make_candles, open_stream, seed_job, stream
from tests.sse_client import Event, event_reader, next_events
from tests.test_backtests import new_backtest

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
TABLE_HEADER = "| event | always | may be `null` | never |"
EVENTS = ("interval_start", "data_chunk", "interval_complete", "all_complete", "error", "job_status")


@dataclass(frozen=True)
class Claim:
    always: frozenset[str]
    nullable: frozenset[str]
    never: frozenset[str]


def _names(cell: str) -> frozenset[str]:
    return frozenset(re.findall(r"`([^`]+)`", cell))


def documented_claims() -> dict[str, Claim]:
    """Section 3's table, row by row."""
    text = PROTOCOL.read_text()
    assert TABLE_HEADER in text, f"docs/PROTOCOL.md has no table headed {TABLE_HEADER}"
    rows = text.split(TABLE_HEADER, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]  # after |---|
    claims = {}
    for row in rows:
        event, always, nullable, never = (cell.strip() for cell in row.strip().strip("|").split("|"))
        (name,) = _names(event)
        claims[name] = Claim(_names(always), _names(nullable), _names(never))
    return claims


def test_the_table_covers_every_event_and_is_consistent():
    claims = documented_claims()
    assert tuple(claims) == EVENTS
    for name, claim in claims.items():
        assert claim.nullable <= claim.always, f"{name}: a field that may be null is always there"
        assert not claim.never & claim.always, name


def test_the_table_is_what_openapi_describes():
    document = openapi_document()
    schemas = event_schemas()
    assert set(schemas) == set(EVENTS)
    for name, claim in documented_claims().items():
        schema = document
        for part in schemas[name].strip("/").split("/"):
            schema = schema[part]
        assert set(schema["properties"]) == claim.always, f"{name}: docs/openapi.yaml's properties"


def test_each_events_json_example_carries_exactly_its_fields():
    text = PROTOCOL.read_text()
    claims = documented_claims()
    for name in EVENTS:
        heading = re.search(rf"^### `{name}`.*$", text, re.MULTILINE)
        assert heading, f"no section for {name}"
        section = text[heading.end() :].split("\n### ", 1)[0]
        example = re.search(r"```json\n(.*?)```", section, re.DOTALL)
        assert example, f"{name}: no JSON example"
        assert set(json.loads(example.group(1))) == claims[name].always, f"{name}: the example's fields"
        # The section's field table names only fields the event has.
        for row in re.findall(r"^\| `([^`]+)`", section, re.MULTILINE):
            assert re.split(r"[.\[]", row)[0] in claims[name].always, f"{name}: its table names {row!r}"


# -- real events ------------------------------------------------------------------


async def _follow_a_running_job(
    client: Any, writer: Any, token: str, job_id: str, *, backtest_id: str | None
) -> list[Event]:
    """Follow mode: a job with no current bar, then a status, a bar (and a backtest id), live candles, completion."""
    job = writer(job_id)
    await job.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day", "minute"], status="running")
    if backtest_id is not None:
        await job.update(backtest_id=backtest_id)
    await job.append("day", make_candles(3))
    await job.append("minute", make_candles(5))
    response = await open_stream(client, job_id, token=token, intervals="day,minute", follow="true")
    assert response.status == 200
    next_event = event_reader(response)
    events = await next_events(next_event, 6)  # two intervals' start, chunk, complete
    await job.update(status="paused")  # current_bar still unset: a job_status with a null bar
    events += [await _next_named(next_event, "job_status")]
    await job.update(status="running", current_bar=7, backtest_id="bt_1737530999.1")
    events += [await _next_named(next_event, "job_status")]
    await job.append("minute", make_candles(2, first=5))
    events += [await _next_named(next_event, "data_chunk")]
    await job.update(status="completed")
    while events[-1].event != "all_complete":
        events.append(await asyncio.wait_for(next_event(), 10))
    response.close()
    return events


async def _next_named(next_event: Any, name: str) -> Event:
    while (event := await asyncio.wait_for(next_event(), 10)).event != name:
        pass
    return event


async def test_real_events_carry_exactly_the_documented_fields(make_gateway, bt_settings, bq, writer, token):
    client = await make_gateway(**bt_settings)
    unconfigured = await make_gateway()  # no warehouse: bt_ streams end with connection_error
    alice = token()
    events: list[Event] = []

    async def collect(gateway: Any, job_id: str, **params: Any) -> None:
        events.extend((await stream(gateway, job_id, token=alice, **params)).events)

    # A completed job that became a backtest: both ids, a current bar; an interval it does not have.
    await seed_job(writer("claims-done"), counts={"day": 4, "minute": 3}, status="completed", current_bar=9)
    await writer("claims-done").update(backtest_id="bt_1737530998.1")
    await collect(client, "claims-done", intervals="day,minute,week", chunk_size=2)
    # A running job without a current bar, interleaved.
    await seed_job(writer("claims-run"), counts={"day": 2, "minute": 2}, current_bar=None)
    await collect(client, "claims-run", intervals="day,minute", order="interleaved")
    # A candle that does not validate: data_error, with the points sent before it.
    bad = writer("claims-bad")
    await seed_job(bad, counts={"day": 2})
    await bad.append_raw("day", [b'{"time": "not a time"}'])
    await collect(client, "claims-bad", intervals="day")
    # A failed job, a missing one.
    await seed_job(writer("claims-failed"), counts={"day": 1}, status="failed")
    await collect(client, "claims-failed", intervals="day")
    await collect(client, "claims-missing", intervals="day")
    # Backtests from the warehouse, with and without a job id; and without a warehouse.
    with_job, _ = new_backtest(bq, {"day": 3}, job_id="claims-job-77")
    without_job, _ = new_backtest(bq, {"day": 2})
    await collect(client, with_job, intervals="day")
    await collect(client, without_job, intervals="day")
    await collect(unconfigured, without_job, intervals="day")
    followed = await _follow_a_running_job(client, writer, alice, "claims-follow", backtest_id=None)
    # As section 3 says: a backtest id given while the stream follows (here with the second
    # job_status) is in that job_status and every later event that names one.
    statuses = [event for event in followed if event.event == "job_status"]
    assert [event.payload["backtest_id"] for event in statuses] == [None, "bt_1737530999.1"]
    assert followed[-1].event == "all_complete" and followed[-1].payload["backtest_id"] == "bt_1737530999.1"
    events += followed
    events += await _follow_a_running_job(client, writer, alice, "claims-follow-bt", backtest_id="bt_1737530997.1")

    claims = documented_claims()
    seen_null: dict[str, set[str]] = defaultdict(set)
    seen_value: dict[str, set[str]] = defaultdict(set)
    errors_seen = set()
    for event in events:
        payload = event.payload
        claim = claims[event.event]
        fields = set(payload)
        assert fields == claim.always, (
            f"{event.event} carried {sorted(fields)}; PROTOCOL.md says always {sorted(claim.always)}"
        )
        assert not fields & claim.never, event.event
        for field, value in payload.items():
            (seen_null if value is None else seen_value)[event.event].add(field)
        if event.event == "error":
            errors_seen.add(payload["error"])
    assert set(seen_value) == set(EVENTS), f"events seen: {sorted(seen_value)}"
    assert errors_seen == {"interval_not_found", "data_error", "job_not_found", "job_error", "connection_error"}
    for name, claim in claims.items():
        assert seen_null[name] <= claim.nullable, f"{name}: null in {sorted(seen_null[name] - claim.nullable)}"
        assert claim.nullable <= seen_null[name], (
            f"{name}: never saw null in {sorted(claim.nullable - seen_null[name])}"
        )
        assert claim.nullable <= seen_value[name], (
            f"{name}: only ever null: {sorted(claim.nullable - seen_value[name])}"
        )


@pytest.fixture
def bt_settings(emulator):  # the same warehouse settings as tests/test_backtests.py
    from tests.conftest import DATASET, PROJECT

    return {"bigquery": {"project": PROJECT, "dataset": DATASET, "api_endpoint": emulator.endpoint}}
