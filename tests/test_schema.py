"""The machine-readable contract: docs/openapi.yaml equals the code's, describes what the gateway sends,
and a property-based tester driven by it finds every request-level answer documented."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from gateway.schema import openapi, to_yaml
from tests.event_schemas import (
    OPENAPI_PATH,
    STREAM_PATH,
    event_schemas,
    fast_validator_for,
    openapi_document,
    validator_for,
)
from tests.helpers import open_stream, seed_job, stream

JOB = "schema-job"
CHUNK_EXAMPLE: dict[str, Any] = {
    "interval": "day",
    "data_points": [
        {"time": "2025-04-01T00:00:00Z", "open": 1234.5, "high": 1250.75, "low": 1230.25, "close": 1245.0,
         "volume": 1000000},
        {"time": "2025-04-02T00:00:00.250Z", "open": 1, "high": 2, "low": 0.5, "close": 1.5, "volume": 0},
    ],
    "points_sent": 2, "total_points": 2, "chunk_index": 0, "is_last_chunk": True,
    "is_partial": True, "current_bar": 50, "job_status": "running",
    "progress": {"total_intervals": 1, "completed_intervals": [], "current_interval": "day",
                 "overall_progress": {"day": {"total_points": 2, "total_chunks": 1, "chunks_sent": 1,
                                              "points_sent": 2}}},
}  # fmt: skip


def test_checked_in_openapi_document_is_what_the_code_generates():
    assert OPENAPI_PATH.read_text() == to_yaml(openapi()), (
        "docs/openapi.yaml is stale: run .venv/bin/python -m gateway schema -o docs/openapi.yaml"
    )


def test_schema_command_writes_the_document(tmp_path, capsys):
    from gateway.__main__ import main

    assert main(["schema", "-o", str(tmp_path / "openapi.yaml")]) == 0
    assert (tmp_path / "openapi.yaml").read_text() == OPENAPI_PATH.read_text()
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == OPENAPI_PATH.read_text()


def test_yaml_reads_back_as_the_generated_document():
    assert openapi_document() == json.loads(json.dumps(openapi()))


def test_every_event_name_has_a_schema():
    assert list(event_schemas()) == [
        "interval_start", "data_chunk", "interval_complete", "all_complete", "error", "job_status",
    ]  # fmt: skip


def _bad(mutate) -> dict[str, Any]:
    payload = copy.deepcopy(CHUNK_EXAMPLE)
    mutate(payload)
    return payload


@pytest.mark.parametrize(
    ("payload", "valid"),
    [
        (CHUNK_EXAMPLE, True),
        (_bad(lambda p: p["data_points"][0].update(time="2025-04-01T00:00:00+05:30")), False),
        (_bad(lambda p: p["data_points"][0].update(time="2025-04-01")), False),
        (_bad(lambda p: p["data_points"][0].update(volume=1.5)), False),
        (_bad(lambda p: p["data_points"][0].update(open="1234.5")), False),
        (_bad(lambda p: p["data_points"][0].pop("close")), False),
        (_bad(lambda p: p.update(data_points={"time": "2025-04-01T00:00:00Z"})), False),
        (_bad(lambda p: p.update(job_status="sleeping")), False),
        (_bad(lambda p: p.pop("progress")), False),
        (_bad(lambda p: p.update(current_bar=None)), True),
        (_bad(lambda p: p.update(a_field_added_later=1)), True),  # new fields may be added
    ],
)
def test_data_chunk_schema_describes_the_candle_array_and_both_validators_agree(payload, valid):
    pointer = event_schemas()["data_chunk"]
    assert validator_for(pointer).is_valid(payload) is valid
    assert fast_validator_for(pointer).is_valid(payload) is valid


# -- property-based: the request-level answers of a real gateway ---------------


def _operation() -> Any:
    return schemathesis.openapi.from_dict(openapi_document())[STREAM_PATH]["GET"]


# A schema-valid request may still be a 400: an opaque last_event_id that does not
# decode, more than 16 distinct interval names. JSON Schema cannot say either.
_NOT_EXPRESSIBLE = [schemathesis.checks.positive_data_acceptance]


def _explore(base_url: str, headers: dict[str, str], statuses: set[int]) -> set[int]:
    """Requests generated from the document (bounded); every answer must conform to it."""
    seen: set[int] = set()
    session = requests.Session()

    @settings(max_examples=50, deadline=3000, database=None, suppress_health_check=list(HealthCheck))
    @given(case=_operation().as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
        case.validate_response(response, excluded_checks=_NOT_EXPRESSIBLE)
        assert response.status_code in statuses, (response.status_code, response.text[:300])
        seen.add(response.status_code)

    check()
    session.close()
    return seen


def _call(base_url: str, job_id: str, *, headers: dict[str, str] | None = None, **query: str) -> Any:
    """One request built from the document's operation, validated against it."""
    case = _operation().Case(path_parameters={"id": job_id}, query=query, headers=headers or {})
    response = case.call(base_url=base_url, timeout=10)
    # A documented 503 is still a "server error" to schemathesis's generic check.
    excluded = [*_NOT_EXPRESSIBLE, schemathesis.checks.not_a_server_error]
    case.validate_response(response, excluded_checks=excluded)
    return response


def _validate_body(response: Any) -> None:
    """The JSON body against the document's answer for this status (reference ``jsonschema``)."""
    pointer = f"/paths/{STREAM_PATH.replace('/', '~1')}/get/responses/{response.status_code}"
    validator_for(f"{pointer}/content/application~1json/schema").validate(response.json())


async def test_generated_requests_get_only_documented_answers(make_gateway, token):
    client = await make_gateway(server={"max_streams_per_user": 0})
    base_url = str(client.make_url("")).rstrip("/")
    loop = asyncio.get_running_loop()
    # Without a token: parameter errors come first (400), then 401.
    seen = await loop.run_in_executor(None, _explore, base_url, {}, {400, 401})
    assert seen == {400, 401}
    # With a token: 400, or a stream (no such job: job_not_found, then the end).
    seen = await loop.run_in_executor(None, _explore, base_url, {"Authorization": f"Bearer {token()}"}, {200, 400})
    assert 400 in seen


async def test_each_request_level_answer_matches_the_document(make_gateway, writer, token, unused_tcp_port):
    client = await make_gateway(server={"max_streams_per_user": 1})
    base_url = str(client.make_url("")).rstrip("/")
    await seed_job(writer(JOB), counts={"day": 3})
    call = asyncio.get_running_loop().run_in_executor

    bad = await call(None, lambda: _call(base_url, JOB, intervals="Day", token=token()))
    assert bad.status_code == 400
    _validate_body(bad)
    assert "intervals" in bad.json()["message"]

    unauthenticated = await call(None, lambda: _call(base_url, JOB, intervals="day", token="not-a-token"))
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"][0].startswith("Bearer")
    _validate_body(unauthenticated)

    finished = await stream(client, JOB, token=token(), intervals="day")
    done = await call(
        None, lambda: _call(base_url, JOB, intervals="day", token=token(), last_event_id=str(finished.events[-1].id))
    )
    assert done.status_code == 204
    assert done.content == b""

    held = await open_stream(client, JOB, token=token(), intervals="day", follow="true")
    assert held.status == 200
    too_many = await call(None, lambda: _call(base_url, JOB, intervals="day", token=token()))
    assert too_many.status_code == 429
    assert int(too_many.headers["retry-after"][0]) >= 1
    _validate_body(too_many)
    held.close()

    no_redis = await make_gateway(
        redis={
            "url": f"redis://127.0.0.1:{unused_tcp_port}",
            "retries": 0,
            "connect_timeout_s": 0.5,
            "outage_wait_s": 0.2,
        }
    )
    no_redis_url = str(no_redis.make_url("")).rstrip("/")
    unavailable = await call(None, lambda: _call(no_redis_url, JOB, intervals="day", token=token()))
    assert unavailable.status_code == 503
    assert int(unavailable.headers["retry-after"][0]) >= 1
    _validate_body(unavailable)
