"""The process-wide stream cap, ``server.max_streams_per_process`` (issue 20, item 12), through the real endpoint."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from tests.faults import eventually
from tests.helpers import open_stream, seed_job

JOB = "cap-job"


def refused_at_capacity() -> float:
    labels = {"status": "503", "reason": "at_capacity"}
    return REGISTRY.get_sample_value("gateway_requests_refused_total", labels) or 0.0


async def test_a_process_holding_its_maximum_of_streams_answers_503_with_retry_after(make_gateway, writer, token):
    client = await make_gateway(server={"max_streams_per_process": 2, "max_streams_per_user": 0, "retry_ms": 2000})
    await seed_job(writer(JOB), counts={"day": 3})
    # The per-user limit is off: what refuses is the process being full.
    held = [await open_stream(client, JOB, intervals="day", follow="true", token=token()) for _ in range(2)]
    for response in held:
        assert response.status == 200
        await response.content.readuntil(b"interval_complete")
    before = refused_at_capacity()
    refused = await open_stream(client, JOB, intervals="day", follow="true", token=token("bob"))
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "2"
    body = await refused.json()
    assert body["error"] == "unavailable" and "at capacity (2 open streams)" in body["message"]
    assert refused_at_capacity() == before + 1
    # Health checks still answer while the streams are full.
    assert (await client.get("/healthz")).status == 200

    # A place freed is a place taken again.
    held.pop().close()

    async def admitted() -> bool:
        response = await open_stream(client, JOB, intervals="day", token=token("bob"))
        await response.read()
        return response.status == 200

    assert await eventually(admitted, timeout_s=10)
    for response in held:
        response.close()
    await asyncio.sleep(0)


async def test_the_cap_is_off_at_zero(make_gateway, writer, token):
    client = await make_gateway(server={"max_streams_per_process": 0, "max_streams_per_user": 0})
    await seed_job(writer(JOB), counts={"day": 3})
    held = [await open_stream(client, JOB, intervals="day", follow="true", token=token()) for _ in range(5)]
    assert [response.status for response in held] == [200] * 5
    for response in held:
        response.close()
