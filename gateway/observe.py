"""What one stream did, for the operators: its metrics and its one log line when it ends.

``handlers.py`` creates a ``StreamWatch`` when a stream's 200 goes out,
sends every event through ``watch.send`` and calls ``watch.end(outcome)``
exactly once however the stream ends (cancellation included). Nothing here
sees a token or the query string.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec

from gateway import metrics, protocol
from gateway.lifecycle import OpenStream
from gateway.logs import STREAMS, clean
from gateway.params import StreamRequest
from gateway.position import StreamPosition
from gateway.sources import warehouse_usage
from gateway.stream import Send

log = logging.getLogger(__name__)

Write = Callable[[bytes], Awaitable[None]]
# error codes that end a stream (SPEC 5); the others skip one interval.
_FATAL: Final = frozenset({"job_not_found", "job_error", "connection_error"})
# Worth an operator's attention; the rest is the client's own business.
_WARN: Final = frozenset({"data_error", "job_error", "connection_error"})


class _ErrorPayload(msgspec.Struct):
    error: str
    message: str = ""
    interval: str | None = None


_decode_error = msgspec.json.Decoder(_ErrorPayload).decode


class StreamWatch:
    """Counts one stream's events and bytes as they are written; reports it when it ends."""

    def __init__(
        self,
        params: StreamRequest,
        position: StreamPosition,
        *,
        user_id: str,
        client: str | None,
        follow: bool,
        request_started: float,
        entry: OpenStream,
    ) -> None:
        self.stream_id = uuid.uuid4().hex[:16]
        self._params = params
        self._position = position
        self._points_before = _points(position)
        self._user_id = user_id
        self._client = client
        self._source = "backtest" if params.is_backtest else "job"
        self._mode = "follow" if follow else "snapshot"
        self._started = request_started
        self._entry = entry
        self._events = 0
        self._bytes = 0
        self._first_chunk = True
        self._last_event = b""
        self._error: str | None = None
        self._bytes_counter = metrics.BYTES_SENT
        self._count = metrics.SWITCH.on
        metrics.STREAMS_STARTED.labels(self._source, self._mode).inc()
        self._open = metrics.STREAMS_OPEN.labels(self._source, self._mode)
        self._open.inc()

    async def send(self, event: bytes, frame: bytes) -> None:
        """Write one event (``event``: its name); count it; after it, stop if the replica is draining."""
        entry = self._entry
        entry.writing = True
        try:
            await self._write(frame)
        finally:
            entry.writing = False
        self._events += 1
        self._bytes += len(frame)
        self._last_event = event
        if self._count:
            metrics.event_counter(event).inc()
            self._bytes_counter.inc(len(frame))
        if self._first_chunk and event == protocol.DATA_CHUNK:
            self.first_chunk_written()
        elif event == protocol.ERROR:
            self._report_error(frame)
        entry.check()

    @property
    def saw_data_chunk(self) -> bool:
        """Whether a data_chunk went out (and the time to the first one was measured)."""
        return not self._first_chunk

    def first_chunk_written(self) -> None:
        """The stream's first data_chunk was written (by ``send``, or by its job's follow hub): time it, once."""
        if self._first_chunk:
            self._first_chunk = False
            metrics.FIRST_CHUNK_SECONDS.observe(time.perf_counter() - self._started)

    def sent_elsewhere(self, events: int, sent_bytes: int, last_event: bytes, error_frames: list[bytes]) -> None:
        """Count what its job's follow hub (hub.py) wrote to this stream; the hub counted the events' metrics."""
        self._events += events
        self._bytes += sent_bytes
        self._last_event = last_event
        for frame in error_frames:
            self._report_error(frame)

    def bind(self, write: Write) -> Send:
        """``send`` writing through ``write`` (the response's ``send_frame``)."""
        self._write = write
        return self.send

    _write: Write

    def _report_error(self, frame: bytes) -> None:
        data = frame.partition(b"\ndata: ")[2].partition(b"\n")[0]
        try:
            payload = _decode_error(data)
        except msgspec.DecodeError:
            return
        metrics.STREAM_ERRORS.labels(payload.error).inc()
        if payload.error in _FATAL:
            self._error = payload.error
        level = logging.WARNING if payload.error in _WARN else logging.INFO
        log.log(
            level,
            "stream error event %s for %s",
            payload.error,
            clean(self._params.id),
            extra={
                "fields": {
                    "stream": self.stream_id,
                    "user": clean(self._user_id),
                    "id": clean(self._params.id),
                    "interval": clean(payload.interval or "-"),
                    "error": payload.error,
                    "cause": clean(payload.message),
                }
            },
        )

    def outcome_of_return(self) -> str:
        """The outcome of a stream whose body returned: its last event says how it ended."""
        if self._last_event == protocol.ALL_COMPLETE:
            return "all_complete"
        return self._error or "incomplete"

    def end(self, outcome: str) -> None:
        """Count the stream as ended and write its one log line; call exactly once."""
        duration = time.perf_counter() - self._started
        points = _points(self._position) - self._points_before
        self._open.dec()
        metrics.STREAMS_ENDED.labels(self._source, self._mode, outcome).inc()
        metrics.POINTS_SENT.inc(points)
        metrics.STREAM_SECONDS.labels(self._mode).observe(duration)
        STREAMS.info(
            "stream end",
            extra={
                "fields": {
                    "stream": self.stream_id,
                    "user": clean(self._user_id),
                    "id": clean(self._params.id),
                    "source": self._source,
                    "intervals": [clean(name) for name in self._params.intervals],
                    "mode": self._mode,
                    "order": self._params.order.value,
                    "resumed": self._params.last_event_id is not None,
                    "events": self._events,
                    "points": points,
                    "bytes": self._bytes,
                    "duration_s": round(duration, 3),
                    "outcome": outcome,
                    "client": clean(self._client or "-"),
                    **_warehouse_fields(),
                }
            },
        )


def _warehouse_fields() -> dict[str, float | int]:
    """What the warehouse did because of this stream (a cold backtest's cost); nothing if it did nothing."""
    usage = warehouse_usage.current()
    if usage is None or not (usage.queries or usage.pages):
        return {}
    return {
        "warehouse_s": round(usage.seconds, 3),
        "warehouse_queries": usage.queries,
        "warehouse_pages": usage.pages,
        "warehouse_bytes_processed": usage.bytes_processed,
        "warehouse_bytes_billed": usage.bytes_billed,
    }


def _points(position: StreamPosition) -> int:
    return sum(interval.points_sent for interval in position.intervals)
