"""Prometheus metrics: what one replica (one worker process) has done and is doing.

Every metric lives in prometheus-client's default registry (which also
carries the ``process_*`` and ``python_*`` collectors) and is served by
``metrics_app`` on its own port (``metrics.port``), never on the public one.
With ``--workers N`` each worker serves its own registry on ``metrics.port +
worker index`` (docs/OPERATIONS.md): counters stay plain in-memory integers,
and the gauges read at scrape time (followers, subscribed job channels) see
the worker's own objects, which prometheus-client's multiprocess mode cannot.

Hot-path cost: an event sent costs two increments of pre-bound children
(events by kind, bytes); points are added once per stream when it ends.
``metrics.port = 0`` turns off the endpoint and these per-event and
per-call counts (``make bench`` compares both: docs/OPERATIONS.md).
Other modules call the small functions and decorators below, so each hook
stays one line where they live.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.errors import RedisUnreachable, StoredValueMalformed

P = ParamSpec("P")
T = TypeVar("T")

NAMESPACE = "gateway"


class _Switch:
    """Whether the per-event and per-call metrics are counted (``metrics.port = 0`` turns them off)."""

    on = True


SWITCH = _Switch()


def set_enabled(on: bool) -> None:
    """Count (``True``) or skip the hot-path metrics; ``serve`` sets it from ``metrics.port``."""
    SWITCH.on = on


# -- streams ------------------------------------------------------------------

STREAMS_OPEN = Gauge(
    "streams_open", "Streams open now", ["source", "mode"], namespace=NAMESPACE
)  # source: job | backtest; mode: snapshot | follow
STREAMS_STARTED = Counter("streams_started", "Streams answered 200", ["source", "mode"], namespace=NAMESPACE)
STREAMS_ENDED = Counter(
    "streams_ended",
    "Streams ended, by outcome: all_complete, a fatal error code, client_gone, cut_slow_client, drained",
    ["source", "mode", "outcome"],
    namespace=NAMESPACE,
)
EVENTS_SENT = Counter("events_sent", "SSE events sent, by event name", ["event"], namespace=NAMESPACE)
POINTS_SENT = Counter(
    "points_sent", "Candles sent in data_chunk events (counted when a stream ends)", namespace=NAMESPACE
)
BYTES_SENT = Counter("sent_bytes", "Bytes of SSE events sent (pings excluded)", namespace=NAMESPACE)
STREAM_ENCODINGS = Counter(
    "stream_encodings", "Streams answered 200, by content coding (identity, zstd, gzip)", ["codec"], namespace=NAMESPACE
)
COMPRESSION_INPUT_BYTES = Counter(
    "compression_input_bytes",
    "Body bytes of compressed streams before compression (events and pings), by codec",
    ["codec"],
    namespace=NAMESPACE,
)
COMPRESSION_OUTPUT_BYTES = Counter(
    "compression_output_bytes",
    "Body bytes of compressed streams after compression (what went on the wire), by codec",
    ["codec"],
    namespace=NAMESPACE,
)
FIRST_CHUNK_SECONDS = Histogram(
    "first_data_chunk_seconds",
    "From the request's arrival to its first data_chunk written",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    namespace=NAMESPACE,
)
STREAM_SECONDS = Histogram(
    "stream_duration_seconds",
    "From the request's arrival to the stream's end",
    ["mode"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0),
    namespace=NAMESPACE,
)
STREAM_ERRORS = Counter(
    "stream_error_events",
    "error events sent inside streams, by code (data_error, job_error, ...)",
    ["error"],
    namespace=NAMESPACE,
)
FOLLOWERS = Gauge("followers", "Streams following a running job live", namespace=NAMESPACE)
FOLLOW_RIDERS = Gauge(
    "follow_cohort_riders",
    "Follow streams in their job's hub, which writes their live events (the rest are in their snapshot or"
    " waiting for their socket to drain); the name is kept from the cohorts the hub replaced",
    namespace=NAMESPACE,
)
NOTE_TO_WRITTEN_SECONDS = Histogram(
    "follow_note_to_written_seconds",
    "From a worker's note reaching the process to the events of the look it caused handed to the sockets"
    " (per pass of a job's hub, not per follower)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    namespace=NAMESPACE,
)

# -- requests refused before a stream ------------------------------------------

REFUSED = Counter(
    "requests_refused",
    "Requests answered before a stream started, by status and reason (401 check, 429, 503 cause)",
    ["status", "reason"],
    namespace=NAMESPACE,
)

# -- stores and certificates ------------------------------------------------------

GC_PAUSE_SECONDS = Histogram(
    "gc_pause_seconds",
    "How long each cyclic garbage collection stopped the event loop, by generation (gc_policy.py)",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    namespace=NAMESPACE,
)
REDIS_SECONDS = Histogram(
    "redis_call_duration_seconds",
    "Redis calls (and pipelines) made through call_redis",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
    namespace=NAMESPACE,
)
REDIS_ERRORS = Counter(
    "redis_call_errors",
    "Redis calls that failed, by gateway error and cause (auth_failed, tls_failed, connection_refused,"
    " name_not_resolved, timeout, cluster_misconfigured, connection_lost, protocol_error, unreachable, busy,"
    " command_refused, wrong_type)",
    ["error", "cause"],
    namespace=NAMESPACE,
)
WAREHOUSE_SECONDS = Histogram(
    "warehouse_query_duration_seconds",
    "BigQuery calls: a query (with its first page), or one more page of a result",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    namespace=NAMESPACE,
)
WAREHOUSE_ERRORS = Counter("warehouse_query_errors", "BigQuery queries that failed or timed out", namespace=NAMESPACE)
# What the warehouse costs (docs/OPERATIONS.md): each query is billed, its result pages are not.
WAREHOUSE_QUERIES = Counter(
    "warehouse_queries", "BigQuery queries run (each one billed), by purpose", ["purpose"], namespace=NAMESPACE
)  # purpose: metadata | candles
WAREHOUSE_PROCESSED_BYTES = Counter(
    "warehouse_processed_bytes",
    "Bytes processed, as BigQuery reported each query",
    ["purpose"],
    namespace=NAMESPACE,
)
WAREHOUSE_BILLED_BYTES = Counter(
    "warehouse_billed_bytes", "Bytes billed, as BigQuery reported each query", ["purpose"], namespace=NAMESPACE
)
WAREHOUSE_PAGES = Counter(
    "warehouse_result_pages", "Result pages read from a query's result (no query, not billed)", namespace=NAMESPACE
)
WAREHOUSE_RESUMES = Counter(
    "warehouse_read_resumes", "Interval reads resumed after a failure, by how", ["how"], namespace=NAMESPACE
)  # how: same_result (no query) | new_query (the result was gone)
for _purpose in ("metadata", "candles"):  # at 0 from the start, so a dashboard's rate() sees the first query
    for _counter in (WAREHOUSE_QUERIES, WAREHOUSE_PROCESSED_BYTES, WAREHOUSE_BILLED_BYTES):
        _counter.labels(_purpose)
CACHE_LOOKUPS = Counter(
    "backtest_cache_lookups", "Backtest intervals looked up in the Redis cache", ["result"], namespace=NAMESPACE
)  # result: hit | miss
CACHE_FILLS = Counter(
    "backtest_cache_fills", "Background copies of an interval into the cache", ["outcome"], namespace=NAMESPACE
)
CERT_REFRESHES = Counter(
    "certificate_refreshes", "Fetches of the token signing certificates", ["outcome"], namespace=NAMESPACE
)

# -- what is running ----------------------------------------------------------------

BUILD_INFO = Info(
    "build",
    "The gateway's version and what it runs on (value 1; join on it to split other series by version)",
    namespace=NAMESPACE,
)


def build_labels() -> dict[str, str]:
    """``gateway_build_info``'s labels: the package's version, Python's, and the libraries' that shape behaviour."""

    def version_of(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version_of("candle-gateway"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "aiohttp": version_of("aiohttp"),
        "redis_py": version_of("redis"),
        "hiredis": version_of("hiredis"),
        "uvloop": version_of("uvloop"),
    }


BUILD_INFO.info(build_labels())

_EVENT_CHILDREN: dict[bytes, Counter] = {}


def event_counter(event: bytes) -> Counter:
    """The pre-bound ``events_sent_total`` child of one event name (cached: the hot path)."""
    child = _EVENT_CHILDREN.get(event)
    if child is None:
        child = _EVENT_CHILDREN[event] = EVENTS_SENT.labels(event.decode("ascii", "replace"))
    return child


_CODEC_CHILDREN: dict[str, tuple[Counter, Counter]] = {}


def compressed(codec: str, before: int, after: int) -> None:
    """Body bytes coded by ``codec``: ``before`` compression, ``after`` it (children cached: the hot path)."""
    children = _CODEC_CHILDREN.get(codec)
    if children is None:
        children = _CODEC_CHILDREN[codec] = (
            COMPRESSION_INPUT_BYTES.labels(codec),
            COMPRESSION_OUTPUT_BYTES.labels(codec),
        )
    children[0].inc(before)
    children[1].inc(after)


# -- one-line hooks for other modules ----------------------------------------------


def observe_redis(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorates ``call_redis``: its latency, and its errors by gateway error type."""

    @functools.wraps(call)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
        if not SWITCH.on:
            return await call(*args, **kwargs)
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        except Exception as exc:
            REDIS_ERRORS.labels(type(exc).__name__, _cause_of(exc)).inc()
            raise
        finally:
            REDIS_SECONDS.observe(time.perf_counter() - started)

    return timed


def _cause_of(exc: Exception) -> str:
    if isinstance(exc, RedisUnreachable):
        return exc.cause
    return "wrong_type" if isinstance(exc, StoredValueMalformed) else "other"


def observe_warehouse(query: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorates the warehouse's calls (a query, or a page of its result): their latency and failures."""

    @functools.wraps(query)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        try:
            return await query(*args, **kwargs)
        except Exception:
            WAREHOUSE_ERRORS.inc()
            raise
        finally:
            WAREHOUSE_SECONDS.observe(time.perf_counter() - started)

    return timed


def warehouse_query(purpose: str, processed_bytes: int | None, billed_bytes: int | None) -> None:
    """One BigQuery query ran: ``metadata`` or ``candles``, with the bytes BigQuery reported for it."""
    WAREHOUSE_QUERIES.labels(purpose).inc()
    if processed_bytes:
        WAREHOUSE_PROCESSED_BYTES.labels(purpose).inc(processed_bytes)
    if billed_bytes:
        WAREHOUSE_BILLED_BYTES.labels(purpose).inc(billed_bytes)


def warehouse_resume(how: str) -> None:
    """A failed interval read resumed: from the ``same_result``, or with a ``new_query`` (the result was gone)."""
    WAREHOUSE_RESUMES.labels(how).inc()


def cache_lookup(hits: int, misses: int) -> None:
    """A backtest stream's look at the cache: intervals found complete, and the rest."""
    CACHE_LOOKUPS.labels("hit").inc(hits)
    CACHE_LOOKUPS.labels("miss").inc(misses)


def cache_fill(outcome: str) -> None:
    """One interval's shared warehouse read ended: ``ok``, ``failed`` (readers told why) or ``abandoned``."""
    CACHE_FILLS.labels(outcome).inc()


def certificate_refresh(outcome: str) -> None:
    """One certificate fetch ended: ``ok`` or ``failed``."""
    CERT_REFRESHES.labels(outcome).inc()


# 401 messages name the failed check; the label keeps a bounded word of it.
_UNAUTHENTICATED_REASONS = (
    ("no token", "missing"),
    ("not a JWT", "malformed"),
    ("base64url", "malformed"),
    ("JSON object", "malformed"),
    ("alg", "alg"),
    ("no kid", "kid"),
    ("kid is not", "kid"),
    ("unavailable", "certificates_unavailable"),
    ("signature", "signature"),
    ("aud", "aud"),
    ("iss", "iss"),
    ("sub", "sub"),
    ("expired", "expired"),
    ("(iat)", "iat"),
    ("auth_time", "auth_time"),
)


def request_refused(status: int, code: str, message: str, reason: str | None = None) -> None:
    """A request answered with an error before its stream started; ``reason`` when the caller knows it."""
    if reason is not None:
        pass
    elif status == 401:
        reason = next((label for text, label in _UNAUTHENTICATED_REASONS if text in message), "other")
    elif status == 503:
        reason = (
            "draining"
            if "shutting down" in message or "draining" in message
            else "at_capacity"
            if "at capacity" in message
            else "redis_unreachable"
        )
    else:
        reason = code
    REFUSED.labels(str(status), reason).inc()


# -- gauges read at scrape time --------------------------------------------------


class _Subscriptions(Protocol):
    @property
    def subscribed_jobs(self) -> int: ...


class _JobChannels(Collector):
    """``gateway_subscribed_job_channels``: read from the live ``JobNotes`` objects when scraped."""

    def __init__(self) -> None:
        self._notes: weakref.WeakSet[_Subscriptions] = weakref.WeakSet()

    def watch(self, notes: _Subscriptions) -> None:
        self._notes.add(notes)

    def unwatch(self, notes: _Subscriptions) -> None:
        self._notes.discard(notes)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            f"{NAMESPACE}_subscribed_job_channels",
            "Job channels this process listens to for follow streams",
            value=sum(notes.subscribed_jobs for notes in list(self._notes)),
        )


_JOB_CHANNELS = _JobChannels()
REGISTRY.register(_JOB_CHANNELS)


def watch_job_notes(notes: _Subscriptions) -> None:
    """Count ``notes``' subscriptions in the scrape until ``unwatch_job_notes`` (or until it is collected)."""
    _JOB_CHANNELS.watch(notes)


def unwatch_job_notes(notes: _Subscriptions) -> None:
    """Stop counting ``notes`` (its application is closing)."""
    _JOB_CHANNELS.unwatch(notes)


# -- the endpoint ---------------------------------------------------------------


async def _scrape(request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """The ``/metrics`` application, served on its own port (``metrics.port``)."""
    app = web.Application()
    app.router.add_get("/metrics", _scrape)
    return app
