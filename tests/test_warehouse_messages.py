"""What clients read when the warehouse fails (issue 8, item 22): the interval and what went wrong, no address.

The whole detail (the client library's message, with the endpoint's URL) is
for the server log, with the backtest and the interval.
"""

from __future__ import annotations

import logging

from tests.conftest import DATASET, PROJECT
from tests.helpers import stream
from tests.test_backtests import new_backtest

_ADDRESS_MARKS = ("http://", "https://", "127.0.0.1", "localhost", "googleapis", "/bigquery/v2")


def _assert_no_address(transcript, *extra: str) -> None:
    text = transcript.raw.decode()
    for mark in (*_ADDRESS_MARKS, *extra):
        assert mark not in text, mark


async def test_failed_candle_query_is_a_data_error_naming_the_interval_not_the_endpoint(
    make_gateway, emulator, bq, token, caplog
):
    backtest_id, _ = new_backtest(bq, {"day": 3, "minute": 4})
    settings = {"project": PROJECT, "dataset": DATASET, "api_endpoint": emulator.endpoint, "query_timeout_s": 5}
    client = await make_gateway(bigquery={**settings, "candles_table": "no_such_candles"})
    with caplog.at_level(logging.WARNING, logger="gateway.sources.warehouse"):
        transcript = await stream(client, backtest_id, token=token(), intervals="day,minute")
    errors = transcript.named("error")
    assert [(e.payload["error"], e.payload["interval"]) for e in errors] == [
        ("data_error", "day"),
        ("data_error", "minute"),
    ]
    for error in errors:
        assert f"interval '{error.payload['interval']}'" in error.payload["message"]
        assert "query failed (NotFound)" in error.payload["message"]
    _assert_no_address(transcript, emulator.endpoint, "no_such_candles")
    # The operator still gets everything: which backtest, which interval, and the client's own words.
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.sources.warehouse"]
    assert any(
        backtest_id in line and "interval day" in line and "no_such_candles" in line and r.levelno == logging.WARNING
        for line, r in zip(logged, caplog.records, strict=False)
    ), logged


async def test_unreachable_warehouse_is_a_connection_error_without_its_address(
    make_gateway, unused_tcp_port, token, caplog
):
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    client = await make_gateway(
        bigquery={"project": PROJECT, "dataset": DATASET, "api_endpoint": dead, "query_timeout_s": 2}
    )
    with caplog.at_level(logging.WARNING, logger="gateway.sources.warehouse"):
        transcript = await stream(client, "bt_1737539999.5", token=token(), intervals="day")
    assert transcript.names == ["error"]
    assert transcript.events[0].payload["error"] == "connection_error"
    _assert_no_address(transcript, str(unused_tcp_port))
    assert str(unused_tcp_port) in caplog.text  # the log says where it tried


def test_client_messages_name_the_kind_of_failure_only():
    from google.api_core import exceptions as google_exceptions

    from gateway.sources.warehouse import _describe

    bad = google_exceptions.BadRequest("POST http://10.0.0.1/bigquery/v2/projects/p/queries: bad")
    assert _describe(bad) == "query failed (BadRequest)"
    late = google_exceptions.RetryError("Timeout of 2.0s exceeded", ConnectionError("http://10.0.0.1"))
    assert _describe(late) == "query got no answer in time (RetryError)"
