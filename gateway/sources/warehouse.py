"""Completed backtests in BigQuery (SPEC 8): parameterised queries on a bounded executor.

BigQuery bills each query for the bytes it scans (10 MB at least), and
paging through a query's result costs nothing. So an interval is one query
(``read_interval``), ordered by time, whose result is then read page by page
(``resume``: ``jobs.getQueryResults`` on the query's job), never a query per
page. The result's ``total_rows`` is the interval's row count.

The official client is blocking, and its row iterators fetch pages lazily,
so every call *and* the iteration over its rows runs on this module's own
thread pool, never on the event loop. Each call has a timeout. Rows become
canonical candle JSON on the worker thread, so the event loop only joins
bytes. Table names come from configuration and are checked when the
warehouse is built; every value is a query parameter. Every query is
counted by purpose with the bytes BigQuery reported for it (metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Final, NamedTuple, TypeVar

import msgspec
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.enums import JobCreationMode
from google.cloud.bigquery.retry import DEFAULT_RETRY

from gateway import metrics
from gateway.config import BIGQUERY_IDENTIFIER, BigQuerySettings
from gateway.errors import ConfigError, SourceUnavailable
from gateway.sources import bigquery_private, warehouse_usage
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
    """Candles of one page of an interval's result, as stored JSON, with the time of the last one."""

    candles: list[bytes]
    last_time: datetime | None
    # Why the row after ``candles`` could not become a candle: the reader sends
    # the candles before it, then reports this as the interval's data_error.
    error: str | None = None


class ResultHandle(msgspec.Struct, frozen=True):
    """Where a query's result can be read again without running the query: its job.

    BigQuery keeps a query's result about 24 hours; paging through it
    (``jobs.getQueryResults``) is free. A query answered without a job
    (``JOB_CREATION_OPTIONAL``, a result that fits its first page) has none.
    """

    job_id: str
    project: str
    location: str | None = None
    # The index in the interval of the result's first row (a query from a cursor starts past 0).
    offset: int = 0


class IntervalRead:
    """One query result of an interval, read a page at a time on the warehouse's thread pool.

    ``first`` is the page the query itself returned; ``next_page`` fetches
    the next one (None after the last). Pages never overlap: ``position``
    is the index, in the interval, of the next row to come.
    """

    def __init__(
        self,
        warehouse: Warehouse,
        interval: str,
        *,
        total_rows: int,
        handle: ResultHandle | None,
        first: CandlePage,
        pages: Iterator[Any] | None,
        position: int,
    ) -> None:
        self._warehouse = warehouse
        self._interval = interval
        self.total_rows = total_rows
        self.handle = handle
        self.first = first
        self._pages = pages
        self.position = position

    async def next_page(self, ids: str) -> CandlePage | None:
        """The next page of the result; None when there is none (or no job to read it from)."""
        pages = self._pages
        if pages is None:
            return None
        interval, position = self._interval, self.position

        def fetch() -> CandlePage | None:
            rows = next(pages, None)  # the request happens here: on this thread
            return None if rows is None else _candle_page(interval, position, rows)

        page = await self._warehouse._call(fetch, ids)
        if page is None:
            self._pages = None
            return None
        metrics.WAREHOUSE_PAGES.inc()
        _usage_pages()
        self.position += len(page.candles)
        return page


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
        parameters = [bigquery.ScalarQueryParameter("value", "STRING", value)]
        timeout_s = self._settings.query_timeout_s

        def run() -> tuple[list[tuple[Any, ...]], _Cost]:
            answer = self._run_query(sql, parameters, first_rows=None)
            return _plain_rows(answer.rows), answer.cost

        rows, cost = await self._call(run, _query_ids(parameters), timeout_s)
        _count_query("metadata", cost)
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

    async def read_interval(
        self, backtest_id: str, interval: str, *, first_rows: int, after: datetime | None = None, position: int = 0
    ) -> IntervalRead:
        """One query for the interval's candles in time order (those after ``after`` only, if given).

        Its first page (``first_rows`` rows at most) comes with the answer,
        and with it the result's row count (``total_rows``). The rest is read
        from the same result with ``resume``: no other query.
        ``position``: the index in the interval of the result's first row.
        """
        sql = (
            "SELECT time, open, high, low, close, volume"
            f" FROM {self._candles} WHERE backtest_id = @backtest_id AND `interval` = @interval"
            + (" AND time > @after" if after is not None else "")
            + " ORDER BY time"
        )
        parameters = _interval_parameters(backtest_id, interval)
        if after is not None:
            parameters.append(bigquery.ScalarQueryParameter("after", "TIMESTAMP", after))

        def run() -> tuple[CandlePage, int, ResultHandle | None, _Cost]:
            # Only the first page, which the query's answer holds: the next ones come
            # through ``resume``, in pages of another size.
            answer = self._run_query(sql, parameters, first_rows=first_rows)
            page = _candle_page(interval, position, answer.rows)
            handle = None
            if answer.job_id is not None and answer.project is not None:
                handle = ResultHandle(answer.job_id, answer.project, answer.location, offset=position)
            return page, answer.total_rows, handle, answer.cost

        page, total_rows, handle, cost = await self._call(run, _query_ids(parameters))
        _count_query("candles", cost)
        return IntervalRead(
            self,
            interval,
            total_rows=total_rows,
            handle=handle,
            first=page,
            pages=None,
            position=position + len(page.candles),
        )

    async def resume(
        self, handle: ResultHandle, backtest_id: str, interval: str, position: int, page_rows: int
    ) -> IntervalRead | None:
        """The result of an earlier query from the interval's row ``position`` on, in pages of ``page_rows``.

        No query: ``jobs.get`` and ``jobs.getQueryResults``. ``total_rows`` of
        the read is the interval's (the result's plus its offset). None if
        BigQuery no longer has that result (expired, or its job deleted): the
        caller decides whether a new query is worth it.
        """

        def run() -> tuple[CandlePage, Iterator[Any], int] | None:
            try:
                job = self._client.get_job(
                    handle.job_id, project=handle.project, location=handle.location, **self._call_options()
                )
                assert isinstance(job, bigquery.QueryJob), f"job {handle.job_id} is not a query"
                # ``start_index``, not the page token: the staged length is the exact place to
                # resume from, and the public client takes a token only for table listings.
                rows = job.result(
                    page_size=page_rows,
                    start_index=position - handle.offset,
                    retry=self._call_options()["retry"],
                    timeout=self._settings.query_timeout_s,
                )
                pages = iter(rows.pages)
                first = next(pages, None)
            except google_exceptions.NotFound:
                return None
            return (
                _candle_page(interval, position, first if first is not None else ()),
                pages,
                handle.offset + int(rows.total_rows or 0),
            )

        resumed = await self._call(run, f"backtest {backtest_id}, interval {interval}, job {handle.job_id}")
        if resumed is None:
            log.info("the result of job %s is gone; %s %s needs a new query", handle.job_id, backtest_id, interval)
            return None
        page, pages, total_rows = resumed
        metrics.WAREHOUSE_PAGES.inc()
        _usage_pages()
        return IntervalRead(
            self,
            interval,
            total_rows=total_rows,
            handle=handle,
            first=page,
            pages=pages,
            position=position + len(page.candles),
        )

    def _call_options(self) -> dict[str, Any]:
        timeout_s = self._settings.query_timeout_s
        # The client's default retries go on for 10 minutes; ours end with the query's timeout, so nothing hangs.
        return {"retry": DEFAULT_RETRY.with_timeout(timeout_s), "timeout": timeout_s}

    def _run_query(
        self, sql: str, parameters: Sequence[bigquery.ScalarQueryParameter], *, first_rows: int | None
    ) -> _Answer:
        """``jobs.query`` (on the calling thread, an executor's): its first page, row count, job and cost."""
        timeout_s = self._settings.query_timeout_s
        retry = DEFAULT_RETRY.with_timeout(timeout_s)
        body: dict[str, Any] = bigquery.QueryJobConfig(query_parameters=list(parameters)).to_api_repr()["query"]
        body |= {
            "query": sql,
            "useLegacySql": False,
            # Timestamps as integer microseconds, as the client asks for them (lossless).
            "formatOptions": {"useInt64Timestamp": True},
            # BigQuery answers within this, or says the job is still running.
            "timeoutMs": max(0, int(timeout_s * 1000) - 250),
            "jobCreationMode": JobCreationMode.JOB_CREATION_OPTIONAL,
            # The same request id on a retry: BigQuery runs the query once.
            "requestId": uuid.uuid4().hex,
        }
        if first_rows is not None:
            body["maxResults"] = first_rows
        if self._settings.location:
            body["location"] = self._settings.location
        answer = bigquery_private.post_query(self._client, body, retry=retry, timeout=timeout_s)
        reference = answer.get("jobReference") or {}
        if not answer.get("jobComplete"):
            return self._wait_for(reference, first_rows)
        rows = bigquery.table.RowIterator(
            client=None,
            api_request=None,
            path=None,
            schema=[bigquery.SchemaField.from_api_repr(f) for f in (answer.get("schema") or {}).get("fields", [])],
            first_page_response=answer,
            total_rows=int(answer.get("totalRows") or 0),
        )
        first = next(iter(rows.pages), None)  # the answer's own rows: no request
        return _Answer(
            rows=list(first) if first is not None else [],
            total_rows=int(answer.get("totalRows") or 0),
            job_id=reference.get("jobId"),
            project=reference.get("projectId"),
            location=reference.get("location") or answer.get("location"),
            cost=_Cost(_int(answer.get("totalBytesProcessed")), _int(answer.get("totalBytesBilled"))),
        )

    def _wait_for(self, reference: dict[str, Any], first_rows: int | None) -> _Answer:
        """A query still running when ``jobs.query`` answered: wait for its job, the client's public way."""
        options = self._call_options()
        job = self._client.get_job(
            reference["jobId"], project=reference.get("projectId"), location=reference.get("location"), **options
        )
        assert isinstance(job, bigquery.QueryJob), f"job {reference['jobId']} is not a query"
        rows = job.result(page_size=first_rows, **options)  # only its first page is read here
        # The first page with rows: the client may take the (empty) answer of its wait for one.
        first = next((page for page in rows.pages if page.num_items), None)
        return _Answer(
            rows=list(first) if first is not None else [],
            total_rows=int(rows.total_rows or 0),
            job_id=job.job_id,
            project=job.project,
            location=job.location,
            cost=_Cost(job.total_bytes_processed, job.total_bytes_billed),
        )

    @metrics.observe_warehouse
    async def _call(self, work: Callable[[], T], ids: str, timeout_s: float | None = None) -> T:
        """``work`` (blocking client calls, and the rows' conversion) on the thread pool, bounded in time."""
        timeout_s = timeout_s or self._settings.query_timeout_s
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s + _LOOP_TIMEOUT_SLACK_S):
                return await loop.run_in_executor(self._executor, work)
        except TimeoutError as exc:
            log.warning("warehouse query timed out after %.0f s (%s)", timeout_s, ids)
            raise WarehouseError(f"query timed out after {timeout_s:.0f} s") from exc
        except (google_exceptions.GoogleAPIError, OSError, ValueError) as exc:
            log.warning("warehouse query failed (%s): %s", ids, _detail(exc))
            raise WarehouseError(_describe(exc)) from exc
        except Exception as exc:  # requests/urllib3 errors and the like, from the client's transport
            log.warning("warehouse query failed (%s): %s", ids, _detail(exc))
            raise WarehouseError(_describe(exc)) from exc
        finally:
            usage = warehouse_usage.current()
            if usage is not None:
                usage.seconds += time.perf_counter() - started


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


class _Cost(NamedTuple):
    processed_bytes: int | None
    billed_bytes: int | None


class _Answer(NamedTuple):
    """A query's answer: its first page of rows, the result's size, its job (None: jobless) and cost."""

    rows: list[Any]
    total_rows: int
    job_id: str | None
    project: str | None
    location: str | None
    cost: _Cost


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _count_query(purpose: str, cost: _Cost) -> None:
    metrics.warehouse_query(purpose, cost.processed_bytes, cost.billed_bytes)
    usage = warehouse_usage.current()
    if usage is not None:
        usage.queries += 1
        usage.bytes_processed += cost.processed_bytes or 0
        usage.bytes_billed += cost.billed_bytes or 0


def _usage_pages() -> None:
    usage = warehouse_usage.current()
    if usage is not None:
        usage.pages += 1


def _interval_parameters(backtest_id: str, interval: str) -> list[bigquery.ScalarQueryParameter]:
    return [
        bigquery.ScalarQueryParameter("backtest_id", "STRING", backtest_id),
        bigquery.ScalarQueryParameter("interval", "STRING", interval),
    ]


def _plain_rows(rows: Any) -> list[tuple[Any, ...]]:
    # tuple(row), not row.values(): that one deep-copies every row (10 µs each).
    return [tuple(row) for row in rows]


def _candle_page(interval: str, first_position: int, rows: Iterable[Any]) -> CandlePage:
    """Rows as canonical candle JSON, up to the first row with a NULL (named in ``error``)."""
    candles: list[bytes] = []
    last_time = None
    error = None
    for offset, row in enumerate(rows):
        time_, open_, high, low, close, volume = tuple(row)  # tuple(): row.values() deep-copies
        if None in (time_, open_, high, low, close, volume):
            error = f"candle {first_position + offset} of interval '{interval}' has a NULL column"
            break
        candles.append(encode_candle(Candle(time_, open_, high, low, close, volume)))
        last_time = time_
    return CandlePage(candles=candles, last_time=last_time, error=error)


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
