"""Cross-origin reads over real HTTP: ``server.cors_origins`` allows, everything else is refused.

The browser's side (a page on another port, allowed and refused) is in
tests/js/cors.test.mjs, run by tests/test_browser.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError

STREAM = "/api/sse/backtest/cors-job/data/multi"
APP = "http://localhost:5173"
OTHER = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization,last-event-id"}


@pytest.fixture
async def job(writer: Any) -> None:
    from tests.helpers import make_candles

    job = writer("cors-job")
    await job.create(user_id="alice", symbol="LTF", exchange="NSE", intervals=["day"], status="completed")
    await job.append("day", make_candles(3))


def cors_headers(response: Any) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


async def test_an_allowed_origin_gets_a_preflight_and_the_stream_with_allow_origin(make_gateway, token, job):
    client = await make_gateway(server={"cors_origins": [APP, "https://app.example.com"]})
    response = await client.options(STREAM, headers={"Origin": APP, **PREFLIGHT})
    assert response.status == 204
    assert cors_headers(response) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control",
        "Access-Control-Max-Age": "600",
    }
    assert response.headers["Vary"] == "Origin"
    assert await response.read() == b""

    stream = await client.get(STREAM, params={"intervals": "day"},
                              headers={"Origin": APP, "Authorization": f"Bearer {token()}"})  # fmt: skip
    assert stream.status == 200
    assert stream.headers["Access-Control-Allow-Origin"] == APP
    assert stream.headers["Access-Control-Expose-Headers"] == "Retry-After, WWW-Authenticate"
    assert "Origin" in [part.strip() for part in stream.headers["Vary"].split(",")]
    assert "Access-Control-Allow-Credentials" not in stream.headers, "tokens are never cookies"
    assert b"event: all_complete" in await stream.read()


async def test_an_allowed_origin_reads_error_answers_too(make_gateway, job):
    client = await make_gateway(server={"cors_origins": [APP]})
    unauthenticated = await client.get(STREAM, params={"intervals": "day"}, headers={"Origin": APP})
    assert unauthenticated.status == 401
    assert unauthenticated.headers["Access-Control-Allow-Origin"] == APP
    assert (await unauthenticated.json())["error"] == "unauthenticated"
    bad = await client.get(STREAM, params={"intervals": "Day"}, headers={"Origin": APP})
    assert bad.status == 400
    assert bad.headers["Access-Control-Allow-Origin"] == APP
    missing = await client.get("/no/such/path", headers={"Origin": APP})
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == APP


async def test_another_origin_gets_no_cors_header_and_a_json_403_preflight(make_gateway, token, job):
    client = await make_gateway(server={"cors_origins": [APP]})
    refused = await client.options(STREAM, headers={"Origin": OTHER, **PREFLIGHT})
    assert refused.status == 403
    assert refused.content_type == "application/json"
    body = await refused.json()
    assert body["error"] == "cors_refused"
    assert OTHER in body["message"] and "server.cors_origins" in body["message"]
    assert cors_headers(refused) == {}

    # A simple GET (an EventSource with ?token=) is served, but the browser may not read it: no header says so.
    stream = await client.get(STREAM, params={"intervals": "day", "token": token()}, headers={"Origin": OTHER})
    assert stream.status == 200
    assert cors_headers(stream) == {}
    await stream.read()
    # The same origin with another port is another origin.
    other_port = await client.options(STREAM, headers={"Origin": "http://localhost:5174", **PREFLIGHT})
    assert other_port.status == 403


async def test_a_preflight_for_another_method_or_header_is_refused_naming_it(make_gateway):
    client = await make_gateway(server={"cors_origins": [APP]})
    post = await client.options(STREAM, headers={"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert post.status == 403
    assert "'POST'" in (await post.json())["message"]
    header = await client.options(
        STREAM,
        headers={"Origin": APP, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-custom"},
    )
    assert header.status == 403
    assert "x-custom" in (await header.json())["message"]
    assert cors_headers(header) == {}


async def test_the_default_is_same_origin_only(make_gateway, token, job):
    client = await make_gateway()
    refused = await client.options(STREAM, headers={"Origin": APP, **PREFLIGHT})
    assert refused.status == 403
    assert "same-origin only" in (await refused.json())["message"]
    stream = await client.get(STREAM, params={"intervals": "day"},
                              headers={"Origin": APP, "Authorization": f"Bearer {token()}"})  # fmt: skip
    assert stream.status == 200
    assert cors_headers(stream) == {}
    assert "Vary" not in stream.headers or "Origin" not in stream.headers["Vary"]
    await stream.read()
    # A plain OPTIONS (no preflight) is still the router's JSON 405.
    plain = await client.options(STREAM)
    assert plain.status == 405
    assert (await plain.json())["error"] == "method_not_allowed"


async def test_origins_match_as_browsers_serialise_them(make_gateway):
    client = await make_gateway(server={"cors_origins": ["https://App.Example.com:443"]})
    allowed = await client.options(STREAM, headers={"Origin": "https://app.example.com", **PREFLIGHT})
    assert allowed.status == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


@pytest.mark.parametrize("origin", ["http://localhost:5173/", "localhost:5173", "https://app.example.com/path", "*"])
def test_a_malformed_origin_stops_start_up_naming_the_setting(origin: str):
    with pytest.raises(ConfigError, match=r"server\.cors_origins.*must be an origin"):
        load_settings(environ={"GATEWAY_SERVER_CORS_ORIGINS": origin})


def test_origins_come_from_the_environment_comma_separated():
    settings = load_settings(environ={"GATEWAY_SERVER_CORS_ORIGINS": "http://localhost:5173, https://app.example.com"})
    assert settings.server.cors_origins == ("http://localhost:5173", "https://app.example.com")
