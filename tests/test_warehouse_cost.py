"""What a cold backtest costs on BigQuery (issue 23), counted by a bq_proxy in front of the emulator.

Each query is billed (at least 10 MB, for the bytes it scans); the pages of
its result are not. So the counts that matter are queries: one metadata
lookup per backtest, one candle query per interval, however many streams
read it and however the read is cut.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from google.api_core import exceptions as google_exceptions
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_RETRY
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.config import BigQuerySettings, with_overrides
from gateway.devtools.bigquery_emulator import emulator_client
from gateway.sources import bigquery_private
from tests.conftest import DATASET, PROJECT
from tests.helpers import expected_points, stream
from tests.test_backtest_fill import points_of, queries
from tests.test_backtests import new_backtest, wait_until_cached

BIG = {"day": 50_000, "minute": 50_000, "3minute": 50_000}
INTERVALS = "day,minute,3minute"


@pytest.fixture
def gateway(aiohttp_client, settings, redis_client, bq_proxy):
    """A gateway whose BigQuery client goes through the counting proxy."""

    async def make(**sections: dict[str, Any]):
        bigquery_settings = {
            "project": PROJECT,
            "dataset": DATASET,
            "api_endpoint": bq_proxy.url,
            "query_timeout_s": 10,
        }
        merged = {"bigquery": {**bigquery_settings, **sections.pop("bigquery", {})}, **sections}
        return await aiohttp_client(create_app(with_overrides(settings, **merged), bigquery_client=emulator_client))

    return make


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"gateway_{name}", labels) or 0.0


async def test_cold_3_x_50000_backtest_costs_one_query_per_interval_and_one_lookup(gateway, bq_proxy, bq, token):
    backtest_id, stored = new_backtest(bq, BIG)
    client = await gateway()
    transcript = await stream(client, backtest_id, token=token(), intervals=INTERVALS, limit=50_000)
    assert transcript.names[-1] == "all_complete"
    for name in BIG:
        assert points_of(transcript, name) == expected_points(stored[name])
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 3}
    assert bq_proxy.counts()["tabledata"] == 0


async def test_ten_cold_streams_at_once_cost_the_same(gateway, bq_proxy, bq, token, redis_client):
    backtest_id, stored = new_backtest(bq, BIG)
    client = await gateway(server={"max_streams_per_user": 0})
    transcripts = await asyncio.gather(
        *(stream(client, backtest_id, token=token(), intervals=INTERVALS, limit=2_000) for _ in range(10))
    )
    for transcript in transcripts:
        assert transcript.names[-1] == "all_complete"
        assert points_of(transcript, "minute") == expected_points(stored["minute"][:2_000])
    # The fills go on after the streams (the cache keeps whole intervals): count once they are done.
    await wait_until_cached(redis_client, backtest_id, list(BIG))
    assert queries(bq_proxy) == {"query:metadata": 1, "query:candles": 3}


async def test_bytes_processed_and_billed_are_counted_as_bigquery_reports_them(gateway, bq_proxy, bq, token, caplog):
    # The emulator reports 0 bytes: the bq_proxy reports what BigQuery would, per query.
    bq_proxy.costs.processed = {"metadata": 1_048_576, "candles": 3_000_000}
    bq_proxy.costs.billed = {"metadata": 10_485_760, "candles": 11_534_336}
    backtest_id, _ = new_backtest(bq, {"day": 40, "minute": 2_500})
    before = {
        (name, purpose): _sample(name, purpose=purpose)
        for name in ("warehouse_queries_total", "warehouse_processed_bytes_total", "warehouse_billed_bytes_total")
        for purpose in ("metadata", "candles")
    }
    pages_before = _sample("warehouse_result_pages_total")
    client = await gateway(bigquery={"page_rows": 1000})
    caplog.set_level(logging.INFO, logger="gateway.streams")
    transcript = await stream(client, backtest_id, token=token(), intervals="day,minute", limit=50_000)
    assert transcript.names[-1] == "all_complete"

    def delta(name: str, purpose: str) -> float:
        return _sample(name, purpose=purpose) - before[(name, purpose)]

    assert delta("warehouse_queries_total", "metadata") == 1
    assert delta("warehouse_queries_total", "candles") == 2
    assert delta("warehouse_processed_bytes_total", "metadata") == 1_048_576
    assert delta("warehouse_processed_bytes_total", "candles") == 2 * 3_000_000
    assert delta("warehouse_billed_bytes_total", "metadata") == 10_485_760
    assert delta("warehouse_billed_bytes_total", "candles") == 2 * 11_534_336
    assert _sample("warehouse_result_pages_total") - pages_before == 2  # minute: rows 1,000 to 2,499
    # The stream's one log line says what its cold read cost.
    (line,) = [r for r in caplog.records if r.name == "gateway.streams"]
    fields: dict[str, Any] = line.fields  # type: ignore[attr-defined]
    assert fields["warehouse_queries"] == 3
    assert fields["warehouse_pages"] == 2
    assert fields["warehouse_bytes_processed"] == 1_048_576 + 2 * 3_000_000
    assert fields["warehouse_bytes_billed"] == 10_485_760 + 2 * 11_534_336
    assert fields["warehouse_s"] > 0
    # A warm stream of the same backtest costs nothing, and says nothing about the warehouse.
    caplog.clear()
    await stream(client, backtest_id, token=token(), intervals="day,minute", limit=50_000)
    (line,) = [r for r in caplog.records if r.name == "gateway.streams"]
    assert "warehouse_queries" not in line.fields  # type: ignore[attr-defined]


async def test_contract_post_query_answers_as_bigquery_sent_it(bq_proxy, bq):
    """``Client._call_api`` posts jobs.query and returns its answer (bigquery_private.py); fails loudly on upgrade.

    Through the gateway's own client: the first page of the size asked for, the row count, the job, the
    bytes as BigQuery reported them; and a failed query raises the client's exception.
    """
    backtest_id, _ = new_backtest(bq, {"minute": 30})
    bq_proxy.costs.billed = {"candles": 10_485_760}
    bq_proxy.costs.processed = {"candles": 4_096}
    client = emulator_client(BigQuerySettings(project=PROJECT, dataset=DATASET, api_endpoint=bq_proxy.url))
    parameters = [bigquery.ScalarQueryParameter("backtest_id", "STRING", backtest_id)]
    body = bigquery.QueryJobConfig(query_parameters=parameters).to_api_repr()["query"] | {
        "query": f"SELECT time, open, high, low, close, volume FROM `{PROJECT}.{DATASET}.candles`"
        " WHERE backtest_id = @backtest_id ORDER BY time",
        "useLegacySql": False,
        "maxResults": 10,
        "formatOptions": {"useInt64Timestamp": True},
    }
    retry = DEFAULT_RETRY.with_timeout(5)
    try:
        # On a thread: the proxy answers on this test's event loop.
        answer = await asyncio.to_thread(bigquery_private.post_query, client, body, retry=retry, timeout=5)
        assert answer["jobComplete"] is True
        assert (len(answer["rows"]), answer["totalRows"], "pageToken" in answer) == (10, "30", True)
        assert answer["jobReference"]["jobId"] == bq_proxy.queries("candles")[0].job_id
        assert (answer["totalBytesProcessed"], answer["totalBytesBilled"]) == ("4096", "10485760")
        with pytest.raises(google_exceptions.NotFound):
            missing = body | {"query": f"SELECT 1 FROM `{PROJECT}.{DATASET}.no_such_table`"}
            await asyncio.to_thread(bigquery_private.post_query, client, missing, retry=retry, timeout=5)
    finally:
        client.close()


def test_emulator_tables_have_the_layout_operations_asks_for(bq):
    """The DDL in devtools is the production layout (docs/OPERATIONS.md): each query reads one backtest's blocks."""
    assert bq.get_table(f"{PROJECT}.{DATASET}.candles").clustering_fields == ["backtest_id", "interval"]
    assert bq.get_table(f"{PROJECT}.{DATASET}.backtests").clustering_fields == ["backtest_id"]
