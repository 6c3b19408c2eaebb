"""Completed backtests in BigQuery (SPEC 8): parameterised queries on a bounded executor.

The official client is blocking, and its row iterators fetch pages lazily,
so every call *and* the iteration over its rows runs on this module's own
thread pool, never on the event loop. Each query has a timeout. Rows become
canonical candle JSON on the worker thread, so the event loop only joins
bytes. Table names come from configuration and are checked when the
warehouse is built; every value is a query parameter.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any, Final, TypeVar

import msgspec
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.enums import JobCreationMode
from google.cloud.bigquery.retry import DEFAULT_RETRY

from gateway import metrics
from gateway.config import BIGQUERY_IDENTIFIER, BigQuerySettings
from gateway.errors import ConfigError, SourceUnavailable
from gateway.sources.candles import Candle, encode_candle

log = logging.getLogger(__name__)

T = TypeVar("T")
# Checked again here (config.py refuses them at start-up), since names are spliced into SQL.
_IDENTIFIER: Final = re.compile(BIGQUERY_IDENTIFIER)
# Extra seconds the event loop waits beyond the client's own timeout before giving up.
_LOOP_TIMEOUT_SLACK_S: Final = 5.0


class WarehouseError(Exception):
    """A BigQuery call failed or timed out (converted to a stream error by the caller).

    Its message goes to clients, so it says what went wrong in a few words and
    never holds the exception's text (which names the endpoint, the project
    and the job); that detail is logged here, once, with the query's ids.
    """


class BacktestRecord(msgspec.Struct, frozen=True):
    """A row of the ``backtests`` table, as far as streams need it."""

    backtest_id: str
    user_id: str
    symbol: str
    exchange: str
    intervals: tuple[str, ...]
    job_id: str | None = None


class CandlePage(msgspec.Struct, frozen=True):
    """Candles of one interval as stored JSON, with the time of the last one (the next cursor)."""

    candles: list[bytes]
    last_time: datetime | None
    # Rows of the interval in the table (known from the first page only).
    interval_rows: int | None = None
    # Why the row after ``candles`` could not become a candle: the reader sends
    # the candles before it, then reports this as the interval's data_error.
    error: str | None = None


class Warehouse:
    """The BigQuery client, its thread pool and the SQL; one per application."""

    def __init__(self, settings: BigQuerySettings, client: bigquery.Client) -> None:
        for name in ("project", "dataset", "backtests_table", "candles_table"):
            if not _IDENTIFIER.search(getattr(settings, name)):
                raise ConfigError(f"bigquery.{name}", "must be a BigQuery identifier ([A-Za-z0-9_-])")
        self._settings = settings
        self._client = client
        self._executor = ThreadPoolExecutor(settings.max_workers, thread_name_prefix="bigquery")
        prefix = f"{settings.project}.{settings.dataset}"
        self._backtests = f"`{prefix}.{settings.backtests_table}`"
        self._candles = f"`{prefix}.{settings.candles_table}`"

    @property
    def settings(self) -> BigQuerySettings:
        return self._settings

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    async def backtest(self, backtest_id: str) -> BacktestRecord | None:
        """The ``backtests`` row of this id, or None."""
        return await self._find_backtest("backtest_id", backtest_id)

    async def backtest_of_job(self, job_id: str) -> BacktestRecord | None:
        """The newest backtest a job produced, or None."""
        return await self._find_backtest("job_id", job_id)

    async def _find_backtest(self, column: str, value: str) -> BacktestRecord | None:
        sql = (
            "SELECT backtest_id, user_id, symbol, exchange, intervals, job_id"
            f" FROM {self._backtests} WHERE {column} = @value"
            " ORDER BY created_at DESC LIMIT 1"
        )
        rows = await self._query(sql, [bigquery.ScalarQueryParameter("value", "STRING", value)], _plain_rows)
        if not rows:
            return None
        backtest_id, user_id, symbol, exchange, intervals, job_id = rows[0]
        return BacktestRecord(
            backtest_id=backtest_id,
            user_id=user_id or "",
            symbol=symbol or "",
            exchange=exchange or "",
            intervals=tuple(intervals or ()),
            job_id=job_id,
        )

    async def first_page(self, backtest_id: str, interval: str, offset: int, rows: int) -> CandlePage:
        """Candles from position ``offset`` on, with the interval's row count."""
        sql = (
            "SELECT time, open, high, low, close, volume, COUNT(*) OVER () AS interval_rows"
            f" FROM {self._candles} WHERE backtest_id = @backtest_id AND `interval` = @interval"
            " ORDER BY time LIMIT @rows OFFSET @offset"
        )
        parameters = [
            *_interval_parameters(backtest_id, interval),
            bigquery.ScalarQueryParameter("rows", "INT64", rows),
            bigquery.ScalarQueryParameter("offset", "INT64", offset),
        ]
        return await self._query(sql, parameters, partial(_candle_page, interval, offset, with_count=True))

    async def page_after(
        self, backtest_id: str, interval: str, after: datetime, position: int, rows: int
    ) -> CandlePage:
        """Up to ``rows`` candles after time ``after`` (a cursor, not an offset).

        ``>=`` rather than ``>``: a second candle at the cursor's time comes
        back and fails the ascending check as a data_error, so a duplicate
        time is reported, never skipped. The caller drops the one candle it
        already has.
        """
        sql = (
            "SELECT time, open, high, low, close, volume"
            f" FROM {self._candles} WHERE backtest_id = @backtest_id AND `interval` = @interval"
            " AND time >= @after ORDER BY time LIMIT @rows"
        )
        parameters = [
            *_interval_parameters(backtest_id, interval),
            bigquery.ScalarQueryParameter("after", "TIMESTAMP", after),
            bigquery.ScalarQueryParameter("rows", "INT64", rows + 1),
        ]
        return await self._query(sql, parameters, partial(_candle_page, interval, position - 1, with_count=False))

    @metrics.observe_warehouse
    async def _query(
        self,
        sql: str,
        parameters: Sequence[bigquery.ScalarQueryParameter],
        convert: Callable[[Any], T],
    ) -> T:
        timeout_s = self._settings.query_timeout_s

        def run() -> T:
            rows = self._client.query_and_wait(
                sql,
                job_config=bigquery.QueryJobConfig(query_parameters=list(parameters)),
                location=self._settings.location or None,
                api_timeout=timeout_s,
                wait_timeout=timeout_s,
                # The client's default retries go on for 10 minutes (40 with job
                # retries); ours end with the query's timeout, so nothing hangs.
                retry=DEFAULT_RETRY.with_timeout(timeout_s),
                job_retry=None,  # type: ignore[arg-type]  # None disables, as documented
            )
            # Iterating fetches further pages: it belongs on this thread too.
            return convert(rows)

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s + _LOOP_TIMEOUT_SLACK_S):
                return await loop.run_in_executor(self._executor, run)
        except TimeoutError as exc:
            log.warning("warehouse query timed out after %.0f s (%s)", timeout_s, _query_ids(parameters))
            raise WarehouseError(f"query timed out after {timeout_s:.0f} s") from exc
        except (google_exceptions.GoogleAPIError, OSError, ValueError) as exc:
            log.warning("warehouse query failed (%s): %s", _query_ids(parameters), _detail(exc))
            raise WarehouseError(_describe(exc)) from exc
        except Exception as exc:  # requests/urllib3 errors and the like, from the client's transport
            log.warning("warehouse query failed (%s): %s", _query_ids(parameters), _detail(exc))
            raise WarehouseError(_describe(exc)) from exc


def make_client(settings: BigQuerySettings) -> bigquery.Client:
    """The BigQuery client: Google's endpoint with default credentials, or ``api_endpoint`` anonymously."""
    options: dict[str, Any] = {"default_job_creation_mode": JobCreationMode.JOB_CREATION_OPTIONAL}
    if not settings.api_endpoint:
        return bigquery.Client(project=settings.project, **options)
    return bigquery.Client(
        project=settings.project,
        client_options={"api_endpoint": settings.api_endpoint},
        credentials=AnonymousCredentials(),
        **options,
    )


def warehouse_unavailable(exc: WarehouseError) -> SourceUnavailable:
    """The stream error for a warehouse that did not answer (an exception to raise, not raised here)."""
    return SourceUnavailable(f"the warehouse failed: {exc}")


def _interval_parameters(backtest_id: str, interval: str) -> list[bigquery.ScalarQueryParameter]:
    return [
        bigquery.ScalarQueryParameter("backtest_id", "STRING", backtest_id),
        bigquery.ScalarQueryParameter("interval", "STRING", interval),
    ]


def _plain_rows(rows: Any) -> list[tuple[Any, ...]]:
    # tuple(row), not row.values(): that one deep-copies every row (10 µs each).
    return [tuple(row) for row in rows]


def _candle_page(interval: str, first_position: int, rows: Any, *, with_count: bool) -> CandlePage:
    """Rows as canonical candle JSON, up to the first row with a NULL (named in ``error``)."""
    candles: list[bytes] = []
    last_time = None
    interval_rows = None
    error = None
    for offset, row in enumerate(rows):
        if with_count:
            interval_rows = row[6]
        time, open_, high, low, close, volume = row[:6]  # slicing: row.values() deep-copies
        if None in (time, open_, high, low, close, volume):
            error = f"candle {first_position + offset} of interval '{interval}' has a NULL column"
            break
        candles.append(encode_candle(Candle(time, open_, high, low, close, volume)))
        last_time = time
    return CandlePage(candles=candles, last_time=last_time, interval_rows=interval_rows, error=error)


def _describe(exc: BaseException) -> str:
    """What a client may read: the kind of failure, no address, project or job id."""
    if isinstance(exc, google_exceptions.RetryError):
        return "query got no answer in time (RetryError)"
    return f"query failed ({type(exc).__name__})"


def _detail(exc: BaseException) -> str:
    """What the log gets: the whole message (addresses included), bounded."""
    message = getattr(exc, "message", None) or str(exc)
    cause = getattr(exc, "cause", None) or exc.__cause__  # a RetryError's last failure says where
    if cause is not None:
        message = f"{message} (last: {type(cause).__name__}: {cause})"
    return f"{type(exc).__name__}: {message}"[:2000]


def _query_ids(parameters: Sequence[bigquery.ScalarQueryParameter]) -> str:
    """The ids a query was about (backtest, interval, job), for the log."""
    names = {"backtest_id": "backtest", "interval": "interval", "value": "id"}
    return ", ".join(f"{names[p.name]} {p.value}" for p in parameters if p.name in names) or "no ids"
