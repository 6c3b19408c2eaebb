"""The SSE event payloads (SPEC 3) and their framing on the wire.

Every payload is a ``msgspec.Struct`` encoded by one shared encoder. Candle
arrays arrive already encoded (validated JSON bytes from a source) and ride
inside ``data_chunk`` as ``msgspec.Raw``, so they are copied, never decoded
and encoded again. Field order follows the SPEC examples.
"""

from __future__ import annotations

from typing import Final

import msgspec

# Event names are part of the contract.
INTERVAL_START: Final = b"interval_start"
DATA_CHUNK: Final = b"data_chunk"
INTERVAL_COMPLETE: Final = b"interval_complete"
ALL_COMPLETE: Final = b"all_complete"
ERROR: Final = b"error"
JOB_STATUS: Final = b"job_status"


class IntervalStart(msgspec.Struct):
    interval: str
    interval_index: int
    total_intervals: int
    total_points: int
    total_chunks: int
    chunk_size: int
    backtest_id: str | None
    job_id: str | None
    symbol: str
    exchange: str
    is_partial: bool
    current_bar: int | None
    job_status: str


class IntervalProgress(msgspec.Struct):
    total_points: int
    total_chunks: int
    chunks_sent: int
    points_sent: int


class Progress(msgspec.Struct):
    total_intervals: int
    completed_intervals: list[str]
    current_interval: str
    overall_progress: dict[str, IntervalProgress]


class DataChunk(msgspec.Struct):
    interval: str
    data_points: msgspec.Raw
    points_sent: int
    total_points: int
    chunk_index: int
    is_last_chunk: bool
    is_partial: bool
    current_bar: int | None
    job_status: str
    progress: Progress


class IntervalComplete(msgspec.Struct):
    interval: str
    total_points: int
    points_sent: int
    backtest_id: str | None
    job_id: str | None
    is_partial: bool
    job_status: str


class AllComplete(msgspec.Struct):
    intervals: list[str]
    completed_intervals: list[str]
    total_points: dict[str, int]
    backtest_id: str | None
    job_id: str | None
    job_status: str


class ErrorEvent(msgspec.Struct):
    error: str
    message: str
    interval: str | None
    job_id: str | None
    backtest_id: str | None
    # Points of `interval` sent before a data_error; null for other errors.
    points_sent: int | None = None


class JobStatusEvent(msgspec.Struct):
    job_id: str | None
    backtest_id: str | None
    job_status: str
    current_bar: int | None
    is_partial: bool


Payload = IntervalStart | DataChunk | IntervalComplete | AllComplete | ErrorEvent | JobStatusEvent

_encode = msgspec.json.Encoder().encode

PING: Final = b": ping\n\n"


def frame(event: bytes, payload: Payload, event_id: bytes, retry_ms: int | None = None) -> bytes:
    """One SSE event as bytes: ``id``, ``event``, a single ``data`` line, optional ``retry``.

    The JSON encoder never emits a raw newline (they are escaped inside
    strings), so the payload always fits one ``data:`` line and needs none of
    the line splitting that aiohttp-sse's ``send`` does for arbitrary text.
    """
    parts = [b"id: ", event_id, b"\nevent: ", event, b"\ndata: ", _encode(payload), b"\n"]
    if retry_ms is not None:
        parts.append(b"retry: %d\n" % retry_ms)
    parts.append(b"\n")
    return b"".join(parts)
