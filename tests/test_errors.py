"""Every 400, 401 and in-stream error of the SPEC, through the real endpoint."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, InvalidURLError, LineTooLong
from prometheus_client import REGISTRY

from gateway.app import INTERNAL_ERROR_MESSAGE
from gateway.runner import rejection_message
from tests.conftest import GatewayTestServer
from tests.helpers import open_stream, seed_job, send_raw, stream, stream_path

JOB = "job-1"


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({}, "intervals"),
        ({"intervals": ""}, "intervals"),
        ({"intervals": "Day"}, "intervals"),
        ({"intervals": "day,,minute"}, "intervals"),
        ({"intervals": "day,"}, "intervals"),
        ({"intervals": "a" * 17}, "intervals"),
        ({"intervals": ",".join(f"i{n}" for n in range(17))}, "intervals"),
        ({"intervals": "day", "limit": "0"}, "limit"),
        ({"intervals": "day", "limit": "50001"}, "limit"),
        ({"intervals": "day", "limit": "ten"}, "limit"),
        ({"intervals": "day", "limit": "-1"}, "limit"),
        ({"intervals": "day", "limit": "1.5"}, "limit"),
        ({"intervals": "day", "chunk_size": "0"}, "chunk_size"),
        ({"intervals": "day", "chunk_size": "5001"}, "chunk_size"),
        ({"intervals": "day", "follow": "yes"}, "follow"),
        ({"intervals": "day", "order": "random"}, "order"),
        ({"intervals": "day", "last_event_id": "not-an-id"}, "last_event_id"),
        ({"intervals": "day", "limit": ["1", "2"]}, "limit"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(client, token, params, parameter):
    response = await client.get(stream_path(JOB), params=[*_pairs(params), ("token", token())])
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_request"
    assert body["message"].startswith(f"{parameter}:")


def _pairs(params):
    for name, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            yield name, item


@pytest.mark.parametrize("job_id", ["-starts-with-dash", "a" * 129, "has space", "semi;colon", "brace{x}"])
async def test_bad_ids_are_400(client, token, job_id):
    response = await client.get(stream_path(job_id), params={"intervals": "day", "token": token()})
    assert response.status in (400, 404)  # a path aiohttp cannot route is 404 before us
    if response.status == 400:
        assert (await response.json())["message"].startswith("id:")


# Requests aiohttp's HTTP parser rejects before the app sees them; {target} carries a token in its query.
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("GET {target} HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n", "Invalid header token"),
        ("G@T {target} HTTP/1.1\r\nHost: a\r\n\r\n", "Invalid method encountered"),
        ("GET {target}\x01 HTTP/1.1\r\nHost: a\r\n\r\n", "Invalid char in url query"),
        (
            "GET {target} HTTP/1.1\r\nHost: a\r\nX-Long: {jwt}" + "a" * 9000 + "\r\n\r\n",
            "Got more than 8190 bytes when reading",
        ),
        (
            "GET {target} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {jwt}\rX-Forged: 1\r\n\r\n",
            "Missing expected LF after header value",
        ),
        # aiohttp's message for this one is the URL itself: only the exception's name is left
        ("GET http:///?token={jwt} HTTP/1.1\r\nHost: a\r\n\r\n", "InvalidURLError"),
    ],
    ids=["header line", "method", "control character", "header too long", "bare CR", "URL without host"],
)
async def test_requests_the_http_parser_rejects_get_the_json_400_without_their_bytes(client, token, raw, reason):
    jwt = token()
    target = f"{stream_path(JOB)}?intervals=day&token={jwt}"
    refused = {"status": "400", "reason": "malformed_http"}
    refused_before = REGISTRY.get_sample_value("gateway_requests_refused_total", refused) or 0.0
    # until_closed: aiohttp's handle_error still closes the connection (else this times out)
    answer = await send_raw(client.server.port, raw.format(target=target, jwt=jwt).encode("latin-1"), until_closed=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    assert status_line.split(" ")[1] == "400", answer[:200]
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": "invalid_request", "message": f"malformed HTTP request: {reason}"}
    for part in jwt.split("."):
        assert part.encode() not in answer
    assert REGISTRY.get_sample_value("gateway_requests_refused_total", refused) == refused_before + 1


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        # the pure-Python parser's wording (AIOHTTP_NO_EXTENSIONS): the same rule keeps the words only
        (InvalidHeader(b"Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln\rX: 1"), "Invalid HTTP header"),
        (BadStatusLine("GET /x?token=abc HTTP/9.Z"), "Bad status line"),
        (LineTooLong(b"GET /x?token=abc...", 8190), "Got more than 8190 bytes when reading"),
        (InvalidURLError("/x?token=abc\x01"), "InvalidURLError"),
        (InvalidURLError("Secret:1"), "InvalidURLError"),  # one word before a colon could be the request's own
        (BadHttpMessage("Duplicate 'Host' header found."), "BadHttpMessage"),
        (BadHttpMessage("Too many headers received"), "Too many headers received"),
        (None, "rejected by the HTTP parser"),
    ],
)
def test_the_rejection_message_keeps_aiohttps_words_and_none_of_the_request(exc, message):
    assert rejection_message(exc) == f"malformed HTTP request: {message}"


async def test_an_exception_that_escapes_the_middlewares_is_a_json_500(aiohttp_client):
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()  # no error_middleware: the exception reaches aiohttp's handle_error
    app.router.add_get("/", broken)
    server = GatewayTestServer(app)
    await server.start_server()
    response = await (await aiohttp_client(server)).get("/")
    assert response.status == 500
    assert response.content_type == "application/json"
    assert await response.json() == {"error": "internal", "message": INTERNAL_ERROR_MESSAGE}


async def test_sixteen_intervals_are_accepted_and_repeats_do_not_count(client, writer, token):
    names = [f"i{n}" for n in range(16)]
    await seed_job(writer(JOB), counts=dict.fromkeys(names, 1))
    transcript = await stream(client, JOB, token=token(), intervals=",".join(names + names))
    assert len(transcript.named("interval_start")) == 16


async def test_missing_token_is_401_with_www_authenticate(client):
    response = await open_stream(client, JOB, intervals="day")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = await response.json()
    assert body["error"] == "unauthenticated"
    assert "token" in body["message"]


async def test_invalid_token_is_401_and_the_message_does_not_echo_it(client, token):
    bad = token(claim_overrides={"aud": "someone-else"})
    response = await open_stream(client, JOB, intervals="day", token=bad)
    assert response.status == 401
    body = await response.json()
    assert "aud" in body["message"]
    for part in bad.split("."):
        assert part not in body["message"]


async def test_header_token_wins_over_query_token(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 1}, user_id="alice")
    response = await open_stream(
        client, JOB, intervals="day", token="garbage", headers={"Authorization": f"Bearer {token('alice')}"}
    )
    assert response.status == 200
    response = await open_stream(
        client, JOB, intervals="day", token=token("alice"), headers={"Authorization": "Bearer garbage"}
    )
    assert response.status == 401


async def test_non_bearer_authorization_is_401(client):
    response = await open_stream(client, JOB, intervals="day", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status == 401


async def test_unknown_job_is_job_not_found_in_the_stream(client, token):
    transcript = await stream(client, "no-such-job", token=token(), intervals="day")
    assert transcript.names == ["error"]
    assert transcript.events[0].payload == {
        "error": "job_not_found",
        "message": "Job 'no-such-job' not found",
        "interval": None,
        "job_id": "no-such-job",
        "backtest_id": None,
        "points_sent": None,
    }
    assert transcript.events[0].retry is not None and 3000 <= transcript.events[0].retry <= 6000


async def test_another_users_job_looks_exactly_like_a_missing_one(client, writer, token):
    await seed_job(writer("secret-job"), counts={"day": 1}, user_id="bob")
    theirs = await stream(client, "secret-job", token=token("alice"), intervals="day")
    missing = await stream(client, "nothing-here", token=token("alice"), intervals="day")
    assert theirs.names == missing.names == ["error"]
    theirs_payload, missing_payload = theirs.events[0].payload, missing.events[0].payload
    assert theirs_payload["error"] == missing_payload["error"] == "job_not_found"
    assert theirs_payload["message"].replace("secret-job", "X") == missing_payload["message"].replace(
        "nothing-here", "X"
    )


async def test_admin_claim_reads_any_job(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 2}, user_id="bob")
    transcript = await stream(client, JOB, token=token("root", admin=True), intervals="day")
    assert transcript.names[-1] == "all_complete"


async def test_admin_claim_can_be_disabled(make_gateway, writer, token):
    client = await make_gateway(auth={"admin_claim": ""})
    await seed_job(writer(JOB), counts={"day": 2}, user_id="bob")
    transcript = await stream(client, JOB, token=token("root", admin=True), intervals="day")
    assert transcript.names == ["error"]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
async def test_failed_or_cancelled_job_is_job_error_with_its_error_text(client, writer, token, status):
    w = writer(JOB)
    await seed_job(w, counts={"day": 2})
    await w.update(status=status, error="broker session expired")
    transcript = await stream(client, JOB, token=token(), intervals="day")
    assert transcript.names == ["error"]
    payload = transcript.events[0].payload
    assert payload["error"] == "job_error"
    assert "broker session expired" in payload["message"]
    assert status in payload["message"]


async def test_interval_not_in_job_configuration_is_reported_at_its_position(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 2, "minute": 3})
    transcript = await stream(client, JOB, token=token(), intervals="day,hour,minute")
    assert transcript.names == [
        "interval_start", "data_chunk", "interval_complete",
        "error",
        "interval_start", "data_chunk", "interval_complete",
        "all_complete",
    ]  # fmt: skip
    error = transcript.events[3].payload
    assert error == {
        "error": "interval_not_found",
        "message": "Interval 'hour' not found in job configuration",
        "interval": "hour",
        "job_id": JOB,
        "backtest_id": None,
        "points_sent": None,
    }
    final = transcript.events[-1].payload
    assert final["intervals"] == ["day", "hour", "minute"]
    assert final["completed_intervals"] == ["day", "minute"]
    assert final["total_points"] == {"day": 2, "minute": 3}
    progress = transcript.named("data_chunk")[0].payload["progress"]["overall_progress"]
    assert set(progress) == {"day", "minute"}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            b'{"time": "2025-04-01T00:05:00Z", "open": "x", "high": 1, "low": 1, "close": 1, "volume": 1}',
            "open",
        ),
        (b'{"time": "2025-04-01T00:05:00", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}', "time"),
        (
            b'{"time": "2025-04-01T00:05:00Z", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1.5}',
            "volume",
        ),
        (b'{"time": "2025-04-01T00:05:00Z", "open": 1, "high": 1, "low": 1, "close": 1}', "volume"),
        (b"not json at all", "malformed"),
        (
            b'{"time": "2025-03-01T00:00:00Z", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}',
            "not after",
        ),
        (
            b'{"time": "2025-04-01T00:05:00Z", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1},{}',
            "malformed",
        ),
    ],
)
async def test_corrupt_candle_is_data_error_for_its_interval_and_the_stream_goes_on(client, writer, token, bad, reason):
    w = writer(JOB)
    await seed_job(w, counts={"minute": 7, "day": 2})
    await w.append_raw("minute", [bad])  # position 7, in the second chunk of 5
    transcript = await stream(client, JOB, token=token(), intervals="minute,day", chunk_size=5)
    assert transcript.names == [
        "interval_start", "data_chunk", "error",
        "interval_start", "data_chunk", "interval_complete",
        "all_complete",
    ]  # fmt: skip
    error = transcript.events[2].payload
    assert error["error"] == "data_error"
    assert error["interval"] == "minute"
    assert error["points_sent"] == 5
    assert "candle 7" in error["message"]
    assert reason in error["message"]
    assert transcript.events[-1].payload["completed_intervals"] == ["day"]


async def test_candles_with_other_offsets_are_sent_in_utc(client, writer, token):
    w = writer(JOB)
    await w.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"], status="running")
    await w.append_raw(
        "day",
        [
            b'{"time": "2025-04-01T05:30:00+05:30", "open": 1, "high": 2, "low": 0.5, "close": 1.5, "volume": 10}',
            b'{"time": "2025-04-02T00:00:00.250Z", "open": 1, "high": 2, "low": 0.5, "close": 1.5, "volume": 11, "oi": 3}',
        ],
    )
    transcript = await stream(client, JOB, token=token(), intervals="day")
    points = transcript.named("data_chunk")[0].payload["data_points"]
    assert points == [
        {"time": "2025-04-01T00:00:00Z", "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 10},
        {
            "time": "2025-04-02T00:00:00.250000Z",
            "open": 1.0,
            "high": 2.0,
            "low": 0.5,
            "close": 1.5,
            "volume": 11,
        },
    ]


async def test_warehouse_not_configured_ends_bt_streams_with_connection_error(client, token):
    transcript = await stream(client, "bt_1737530000.123", token=token(), intervals="day")
    assert transcript.names == ["error"]
    payload = transcript.events[0].payload
    assert payload["error"] == "connection_error"
    assert "not configured" in payload["message"]
    assert payload["backtest_id"] == "bt_1737530000.123"
    assert payload["job_id"] is None


async def test_a_list_rewritten_against_the_contract_is_validated_again(client, writer, token, redis_client):
    await seed_job(writer(JOB), counts={"minute": 12})
    first = await stream(client, JOB, token=token(), intervals="minute", chunk_size=5)
    assert first.names[-1] == "all_complete"  # every chunk is now known valid to this process
    await redis_client.lset(f"job:{{{JOB}}}:candles:minute", 7, b'{"time": "2025-04-01T00:07:00Z", "open": "x"}')
    second = await stream(client, JOB, token=token(), intervals="minute", chunk_size=5)
    assert second.names == ["interval_start", "data_chunk", "error", "all_complete"]
    assert second.events[2].payload["error"] == "data_error"


async def test_a_job_failing_mid_stream_ends_it_with_job_error(client, writer, token):
    w = writer(JOB)
    await seed_job(w, counts={"minute": 5000})
    response = await open_stream(client, JOB, token=token(), intervals="minute", chunk_size=1, limit=5000)
    seen = []
    async for line in response.content:
        if line.startswith(b"event: "):
            seen.append(line[7:].strip().decode())
            if len(seen) == 3:
                await w.update(status="failed", error="broker down")
    assert seen[-1] == "error"
    assert "all_complete" not in seen
    assert len([name for name in seen if name == "data_chunk"]) < 5000
