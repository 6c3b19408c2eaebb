"""Logs (issue 8 items 5-8, issue 9.2): no token, no forged line, one line per stream, errors seen."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from gateway.app import create_app
from gateway.devtools.bigquery_emulator import emulator_client
from gateway.logs import JsonFormatter, TextFormatter, clean, redact
from gateway.server import runner_options
from tests.conftest import PROJECT, GatewayTestServer
from tests.helpers import open_stream, seed_job, send_raw, stream, stream_path
from tests.replicas import Replica, replica_env
from tests.sse_client import SSEParser, Transcript

JOB = "log-job"


def malformed_requests(token: str) -> dict[str, bytes]:
    """Requests aiohttp's parser rejects, each quoting the token in its raw request line or headers."""
    path = f"{stream_path(JOB)}?intervals=day&token={token}".encode()
    return {
        "control character in the URL": b"GET " + path + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        "stray space in the URL": b"GET " + path + b" x HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad HTTP version": b"GET " + path + b" HTTP/9.Z\r\nHost: x\r\n\r\n",
        "bare CR in Authorization": (
            b"GET " + stream_path(JOB).encode() + b"?intervals=day HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\rX-Forged: 1\r\n\r\n"
        ),
        "token in the path": b"GET /api/sse/backtest/"
        + token.encode()
        + b"/data/multi\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        # issue 20, item 9: what the query means once decoded, not only how it is spelled
        "percent-encoded name and first character": b"GET "
        + f"{stream_path(JOB)}?intervals=day&%74oken=%65{token[1:]}".encode()
        + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        "every character percent-encoded": b"GET "
        + f"{stream_path(JOB)}?intervals=day&{percent_encoded('token=' + token)}".encode()
        + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        "percent-encoded twice": b"GET "
        + f"{stream_path(JOB)}?intervals=day&%2574oken=%2565{token[1:]}".encode()
        + b" x HTTP/1.1\r\nHost: x\r\n\r\n",
    }


def percent_encoded(text: str) -> str:
    return "".join(f"%{ord(character):02X}" for character in text)


def secrets_of(token: str) -> list[str]:
    header, payload, signature = token.split(".")
    plain = [token, signature, signature[:24], payload[:40]]
    return [*plain, *(percent_encoded(secret) for secret in plain)]


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    texts = []
    for record in records:
        texts.append(record.getMessage())
        texts.append(record.exc_text or "")
        texts.append(TextFormatter().format(record))
        texts.append(JsonFormatter().format(record))
    return texts


async def test_malformed_requests_never_put_a_token_in_any_log_record(client, token, caplog):
    caplog.set_level(logging.DEBUG)
    jwt = token()
    for name, request in malformed_requests(jwt).items():
        answer = await send_raw(client.server.port, request)
        assert answer.split(b" ", 2)[1].startswith(b"4"), (name, answer[:80])
    await asyncio.sleep(0.1)
    assert caplog.records, "the parser errors were logged"
    texts = [*record_texts(caplog.records), caplog.text]
    for secret in secrets_of(jwt):
        assert not any(secret in text for text in texts), f"{secret[:12]}... reached a log record"


async def test_malformed_requests_never_put_a_token_in_the_processs_stderr(redis_url, cert_endpoint, token, tmp_path):
    jwt = token()
    replicas = {
        log_format: Replica(
            f"log-{log_format}",
            tmp_path,
            replica_env(
                redis_url, cert_endpoint.url, PROJECT, GATEWAY_LOG_FORMAT=log_format, GATEWAY_LOG_LEVEL="debug"
            ),
        )
        for log_format in ("text", "json")
    }
    try:
        await asyncio.gather(*(replica.start() for replica in replicas.values()))
        for replica in replicas.values():
            for request in malformed_requests(jwt).values():
                # `serve`'s own runner: the answer is the SPEC's JSON 400, the token not in it either
                answer = await send_raw(replica.port, request, until_closed=True)
                assert b" 400 " in answer.split(b"\r\n")[0] and b"Content-Type: application/json" in answer, answer
                assert not any(secret.encode() in answer for secret in secrets_of(jwt))
            # and a good request whose query carries the token
            await send_raw(replica.port, b"GET /healthz?token=" + jwt.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)
    finally:
        for replica in replicas.values():
            replica.terminate()
        for replica in replicas.values():
            await replica.wait()
    for log_format, replica in replicas.items():
        output = replica.log()
        assert "Bad" in output or "Invalid" in output or "400" in output, output
        for secret in secrets_of(jwt):
            assert secret not in output, f"{secret[:12]}... reached stderr ({log_format}):\n{output}"


@pytest.fixture
async def served(aiohttp_client, settings, redis_client):
    """The app as ``serve`` runs it: our access logger, handler cancellation."""
    server = GatewayTestServer(create_app(settings, bigquery_client=emulator_client))
    options = runner_options(settings)
    options.pop("handler_cancellation")  # TestServer sets it itself
    await server.start_server(**options)
    return await aiohttp_client(server)


async def test_newline_in_the_path_is_escaped_in_the_access_log(served, caplog):
    client = served
    caplog.set_level(logging.INFO, logger="gateway.access")
    response = await client.get("/api/sse/backtest/x%0A1.2.3.4%20%22GET%20%2Fforged%22%20200/data/multi")
    assert response.status == 400
    await response.read()
    for _ in range(50):  # aiohttp writes the access line after the answer went out
        if lines := [r.getMessage() for r in caplog.records if r.name == "gateway.access"]:
            break
        await asyncio.sleep(0.02)
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\\x0a" in lines[0]


def test_redact_and_escape():
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    assert redact(f"GET /x?intervals=day&token={jwt}&limit=1") == "GET /x?intervals=day&token=[redacted]&limit=1"
    assert redact(f"Authorization: Bearer {jwt}") == "Authorization: Bearer [redacted]"
    assert redact(f"bad line {jwt[:30]}.{jwt[31:40]}") == "bad line [redacted]"
    assert clean("a\nb\r\x1b[31m") == "a\\x0ab\\x0d\\x1b[31m"
    assert redact(f"GET /x?%74oken=%65{jwt[1:]}&limit=1") == "GET /x?token=[redacted]&limit=1"
    assert redact(f"GET /x?a=%2574oken%253D{percent_encoded(jwt)}") == "GET /x?a=token=[redacted]"
    # Decoding never makes a control character (a forged line) out of %0a, and leaves lines without a token alone.
    assert redact(f"GET /x%0a?token=%65{jwt[1:]}") == "GET /x%0a?token=[redacted]"
    assert redact("GET /x?intervals=day%2Cminute") == "GET /x?intervals=day%2Cminute"


async def stream_lines(caplog, count: int) -> list[logging.LogRecord]:
    """The stream-end lines logged so far, once there are `count` of them (5 s at most)."""
    for _ in range(250):
        ends = [r for r in caplog.records if r.name == "gateway.streams"]
        if len(ends) >= count:
            break
        await asyncio.sleep(0.02)
    assert len(ends) == count, [r.getMessage() for r in ends]
    return ends


async def test_every_stream_gets_one_line_when_it_ends_however_it_ends(served, writer, token, caplog):
    client = served
    caplog.set_level(logging.INFO)
    await seed_job(writer(JOB), counts={"day": 30, "minute": 3000})
    jwt = token()
    # 1: complete
    done = await stream(client, JOB, token=jwt, intervals="day,minute", limit=3000, chunk_size=100)
    # 2: the client goes away mid-stream (the handler is cancelled)
    response = await open_stream(client, JOB, token=jwt, intervals="minute", follow="true", chunk_size=10)
    parser, transcript = SSEParser(), Transcript()
    async for chunk in response.content.iter_any():
        parser.feed(chunk, transcript)
        if len(transcript.events) >= 3:
            break
    response.close()
    # The server learns of the close on its next write, which a loaded machine
    # can delay past stream 3's whole life: wait for its line, so the order of
    # the three lines is the order of the three streams.
    await stream_lines(caplog, 2)
    # 3: an interval that is not configured (an error event; the stream goes on)
    await stream(client, JOB, token=jwt, intervals="hour,day")
    ends = await stream_lines(caplog, 3)
    fields = [r.fields for r in ends]  # type: ignore[attr-defined]
    assert [f["outcome"] for f in fields] == ["all_complete", "client_gone", "all_complete"]
    first = fields[0]
    assert first["user"] == "alice" and first["id"] == JOB and first["intervals"] == ["day", "minute"]
    assert first["mode"] == "snapshot" and first["points"] == 3030 and first["bytes"] == len(done.raw)
    assert fields[1]["mode"] == "follow" and fields[1]["client"] == "127.0.0.1"
    # no access-log line for the streams: the stream end line is theirs
    assert not [r for r in caplog.records if r.name == "gateway.access" and "/data/multi" in r.getMessage()]
    for record in ends:
        line = TextFormatter().format(record)
        assert jwt not in line and "token" not in line and "?" not in line
        assert json.loads(JsonFormatter().format(record))["outcome"] == record.fields["outcome"]  # type: ignore[attr-defined]


async def test_stream_errors_are_logged_as_warnings_with_job_interval_and_cause(
    client, writer, token, caplog, redis_client
):
    caplog.set_level(logging.INFO)
    w = writer(JOB)
    await seed_job(w, counts={"day": 3})
    await redis_client.rpush(f"job:{{{JOB}}}:candles:day", b'{"time": "not a time"}')
    transcript = await stream(client, JOB, token=token(), intervals="day")
    assert transcript.named("error")[0].payload["error"] == "data_error"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gateway.observe"]
    assert len(warnings) == 1
    fields = warnings[0].fields  # type: ignore[attr-defined]
    assert (fields["error"], fields["id"], fields["interval"]) == ("data_error", JOB, "day")
    assert fields["cause"]


@pytest.mark.parametrize("status", ["failed"])
async def test_job_error_is_logged(client, writer, token, caplog, status):
    caplog.set_level(logging.INFO)
    await seed_job(writer(JOB), counts={"day": 3}, status=status)
    await stream(client, JOB, token=token(), intervals="day")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gateway.observe"]
    assert [w.fields["error"] for w in warnings] == ["job_error"]  # type: ignore[attr-defined]
