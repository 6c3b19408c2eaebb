"""A stream's position: everything needed to continue it, carried in every event id.

The stream is a pure function of its request, the stored data and this
position: the next event is always derived from the position (see
``stream.py``), for a fresh stream as for a resumed one. So an event's id is
just the position after that event, packed small (msgpack, base64url), and
resuming means decoding it and carrying on. The id is opaque to clients; it
carries a digest of the request so an id from another request is refused.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from enum import IntEnum
from typing import Final

import msgspec

from gateway.errors import BadRequest
from gateway.params import StreamRequest

VERSION: Final = 1


class Phase(IntEnum):
    PENDING = 0  # no event for this interval yet
    STARTED = 1  # interval_start sent, its interval_complete not yet
    COMPLETE = 2  # interval_complete sent (live points may follow it)
    FAILED = 3  # interval_not_found or data_error sent


class IntervalPosition(msgspec.Struct, array_like=True):
    phase: Phase = Phase.PENDING
    # Fixed by interval_start; in follow mode it grows with the live points.
    total_points: int = 0
    points_sent: int = 0
    chunks_sent: int = 0
    # CRC-32 of the last stored element sent (lists a worker appends to; None for
    # others, and in ids older than it): a resumed stream's first read checks the
    # element before its position against it (``stream._check_continuity``).
    # Last, and optional, so ids without it still decode, and replicas without it
    # still decode ids with it (msgspec drops trailing elements it does not know).
    sent_digest: int | None = None


class StreamPosition(msgspec.Struct, array_like=True):
    version: int
    fingerprint: int
    # is_partial is decided once per stream and must survive a reconnect.
    is_partial: bool
    finished: bool
    intervals: list[IntervalPosition]
    # The last job_status sent in follow mode, so a resume does not repeat it.
    job_status: str | None = None
    current_bar: int | None = None

    @classmethod
    def start(cls, request: StreamRequest, is_partial: bool) -> StreamPosition:
        return cls(
            version=VERSION,
            fingerprint=request.fingerprint(),
            is_partial=is_partial,
            finished=False,
            intervals=[IntervalPosition() for _ in request.intervals],
        )

    def encode(self) -> bytes:
        return base64.urlsafe_b64encode(_encode(self)).rstrip(b"=")


def element_digest(element: bytes) -> int:
    """What an id keeps of a stored element: its CRC-32 (a worker's rewrite or shift changes it)."""
    return zlib.crc32(element)


def copy_position(source: StreamPosition, target: StreamPosition) -> None:
    """Make ``target`` (an object others hold on to) equal to ``source``, sharing nothing with it."""
    target.version = source.version
    target.fingerprint = source.fingerprint
    target.is_partial = source.is_partial
    target.finished = source.finished
    target.intervals = [msgspec.structs.replace(interval) for interval in source.intervals]
    target.job_status = source.job_status
    target.current_bar = source.current_bar


def clone_position(source: StreamPosition) -> StreamPosition:
    """A copy of ``source`` that shares nothing with it."""
    clone = msgspec.structs.replace(source)
    clone.intervals = [msgspec.structs.replace(interval) for interval in source.intervals]
    return clone


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(StreamPosition).decode


def decode_position(event_id: str, request: StreamRequest) -> StreamPosition:
    """The position an event id stands for; ``BadRequest`` if it is not one of this request."""
    try:
        packed = base64.urlsafe_b64decode(event_id + "=" * (-len(event_id) % 4))
        position = _decode(packed)
    except (binascii.Error, ValueError, RecursionError, msgspec.DecodeError):
        raise BadRequest("last_event_id", "is not an event id of this gateway") from None
    if position.version != VERSION or position.fingerprint != request.fingerprint():
        raise BadRequest(
            "last_event_id",
            "belongs to another stream (id, intervals, limit, chunk_size, order or follow differ)",
        )
    if len(position.intervals) != len(request.intervals) or not all(
        _consistent(interval, request) for interval in position.intervals
    ):
        raise BadRequest("last_event_id", "is not an event id of this gateway")
    return position


def _consistent(interval: IntervalPosition, request: StreamRequest) -> bool:
    counts = (interval.total_points, interval.points_sent, interval.chunks_sent)
    if not all(0 <= count <= request.limit for count in counts):
        return False
    if interval.phase is Phase.STARTED:
        # Snapshot chunks are full but the last, so chunks follow from points.
        return interval.points_sent <= interval.total_points and interval.chunks_sent == math.ceil(
            interval.points_sent / request.chunk_size
        )
    return True
