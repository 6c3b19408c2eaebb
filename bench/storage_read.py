"""``python -m bench.storage_read``: one interval read whole, the REST way the gateway reads it and through
the BigQuery Storage Read API, on the emulator, alternating (docs/PERFORMANCE.md, docs/DECISIONS.md).

- REST: the gateway's own ``Warehouse``: one query (first page 1,000 rows),
  then the rest of its result in pages of 10,000 (``jobs.getQueryResults``),
  every row made canonical candle JSON.
- Storage Read: a read session on the candles table with a row restriction
  (the emulator serves read sessions on tables only, not on a query's
  result), Avro decoded by fastavro (no pyarrow), one stream; the rows come
  unordered, so they are sorted by time, then made candle JSON the same way.

Development only: the Storage Read client (google-cloud-bigquery-storage,
grpcio, fastavro) comes with the emulator's dependencies, not with the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]  # no stubs; development only
from google.cloud import bigquery_storage_v1
from google.cloud.bigquery_storage_v1 import types
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

from gateway.config import BigQuerySettings
from gateway.devtools.bigquery_emulator import BigQueryEmulator, create_warehouse, emulator_client, insert_candles
from gateway.devtools.bigquery_emulator import loading_client as emulator_loading_client
from gateway.sources.candles import Candle, encode_candle
from gateway.sources.warehouse import Warehouse

PROJECT = "bench-storage"
DATASET = "backtests"
BACKTEST = "bt_1700000000.000"


def _grpc_port(emulator: BigQueryEmulator) -> int:
    for line in emulator.log_path.read_text().splitlines():
        if '"grpc.listen"' in line:
            return int(json.loads(line)["port"])
    raise RuntimeError("the emulator logged no gRPC port")


def storage_read(client: Any, interval: str) -> list[bytes]:
    """The interval through a Storage Read session (Avro, one stream), sorted, as candle JSON."""
    session = types.ReadSession(
        table=f"projects/{PROJECT}/datasets/{DATASET}/tables/candles",
        data_format=types.DataFormat.AVRO,
        read_options=types.ReadSession.TableReadOptions(
            selected_fields=["time", "open", "high", "low", "close", "volume"],
            row_restriction=f"backtest_id = '{BACKTEST}' AND `interval` = '{interval}'",
        ),
    )
    created = client.create_read_session(parent=f"projects/{PROJECT}", read_session=session, max_stream_count=1)
    rows = [row for stream in created.streams for row in client.read_rows(stream.name).rows(created)]
    rows.sort(key=lambda row: row["time"])
    return [encode_candle(Candle(r["time"], r["open"], r["high"], r["low"], r["close"], r["volume"])) for r in rows]


async def rest_read(warehouse: Warehouse, interval: str, page_rows: int) -> list[bytes]:
    """The interval the gateway's way: one query, then pages of its result."""
    read = await warehouse.read_interval(BACKTEST, interval, first_rows=1000)
    candles = list(read.first.candles)
    if read.handle is None or len(candles) >= read.total_rows:
        return candles
    rest = await warehouse.resume(read.handle, BACKTEST, interval, len(candles), page_rows)
    assert rest is not None
    candles += rest.first.candles
    while (page := await rest.next_page(interval)) is not None:
        candles += page.candles
    return candles


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_read", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50_000, help="candles in the interval")
    parser.add_argument("--runs", type=int, default=5, help="reads of each kind, alternating")
    parser.add_argument("--page-rows", type=int, default=10_000, help="REST: rows per result page after the first")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="storage-read-") as tmp,
        BigQueryEmulator(Path(tmp) / "bq", project=PROJECT) as emulator,
    ):
        loader = emulator_loading_client(PROJECT, emulator.endpoint)
        create_warehouse(loader, DATASET)
        start = datetime(2020, 1, 1, tzinfo=UTC)
        rows = [
            {"backtest_id": BACKTEST, "interval": "minute", "time": start + timedelta(minutes=i), "open": 1000.0,
             "high": 1001.5, "low": 998.75, "close": 1000.5, "volume": 1000 + i}
            for i in range(args.points)
        ]  # fmt: skip
        insert_candles(loader, DATASET, "candles", rows, batch_rows=20_000)
        channel = grpc.insecure_channel(f"127.0.0.1:{_grpc_port(emulator)}")
        storage = bigquery_storage_v1.BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
        settings = BigQuerySettings(project=PROJECT, dataset=DATASET, api_endpoint=emulator.endpoint)
        warehouse = Warehouse(settings, emulator_client(settings))
        times: dict[str, list[float]] = {"rest": [], "storage": []}
        for _ in range(args.runs):
            started = time.perf_counter()
            by_rest = asyncio.run(rest_read(warehouse, "minute", args.page_rows))
            times["rest"].append(time.perf_counter() - started)
            started = time.perf_counter()
            by_storage = storage_read(storage, "minute")
            times["storage"].append(time.perf_counter() - started)
            assert by_rest == by_storage and len(by_rest) == args.points, "the two reads differ"
        warehouse.close()
        loader.close()
    print(f"command: python -m bench.storage_read --points {args.points} --runs {args.runs}")
    print("| read of one interval, whole | median | range |")
    print("|---|---|---|")
    for name, label in (("rest", "REST: query + result pages"), ("storage", "Storage Read API, Avro, sorted")):
        figures = [t * 1000 for t in times[name]]
        print(f"| {label} | {statistics.median(figures):.0f} ms | {min(figures):.0f}-{max(figures):.0f} ms |")
    ratio = statistics.median(times["rest"]) / statistics.median(times["storage"])
    print(f"ratio REST / Storage Read (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
