"""Validation of stored candles, and their one canonical JSON form.

The hot path: a chunk of stored candles (one ``bytes`` per candle, as Redis
returns them) becomes one JSON array for a ``data_chunk``. Stored candles are
usually already canonical (``time`` in UTC with ``Z``, no fractional
seconds, no extra fields), so the array is spliced from the stored bytes and
only *validated*: one ``msgspec`` decode of the whole array into typed
structs (in C), plus an ascending-time check. Anything else (another
offset, fractions, extra fields) takes the slow path: each candle is decoded
alone, so a bad one is reported by its position, and the chunk is encoded
again in canonical form. Nothing is ever dropped: a candle that does not
validate makes the whole chunk a ``DataError``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from gateway.errors import DataError

# Canonical times are fixed-width, so comparing the strings compares the times.
_CANONICAL_TIME: Final = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z$"
)


class CanonicalCandle(msgspec.Struct, forbid_unknown_fields=True):
    """A stored candle that can go to clients byte for byte."""

    time: Annotated[str, Meta(pattern=_CANONICAL_TIME)]
    open: float
    high: float
    low: float
    close: float
    volume: int


class Candle(msgspec.Struct):
    """Any candle the worker contract allows: RFC 3339 time with any offset."""

    time: Annotated[datetime, Meta(tz=True)]
    open: float
    high: float
    low: float
    close: float
    volume: int


_decode_canonical = msgspec.json.Decoder(list[CanonicalCandle]).decode
_decode_candle = msgspec.json.Decoder(Candle).decode
_encode = msgspec.json.Encoder().encode


class CandleValidator:
    """Turns consecutive chunks of one interval into JSON arrays, checking order across them."""

    __slots__ = ("_interval", "_last_time", "_position")

    def __init__(self, interval: str, position: int = 0, last_time: datetime | None = None):
        self._interval = interval
        # Index (in the stored list) of the next candle to validate, for messages.
        self._position = position
        self._last_time = last_time

    def to_json_array(self, stored: Sequence[bytes]) -> bytes:
        """Validate ``stored`` (one JSON candle each) and return them as a JSON array."""
        if not stored:
            return b"[]"
        array = b"[" + b",".join(stored) + b"]"
        try:
            candles = _decode_canonical(array)
        except msgspec.DecodeError:
            candles = None
        # The count check matters: a stored element holding two objects (or a
        # fragment) could still splice into a valid array of another length.
        if candles is not None and len(candles) == len(stored):
            times = [candle.time for candle in candles]
            if all(map(operator.lt, times, times[1:])):
                first = _parse_utc(times[0])
                if self._last_time is None or self._last_time < first:
                    self._last_time = _parse_utc(times[-1])
                    self._position += len(stored)
                    return array
        return self._normalise(stored)

    def _normalise(self, stored: Sequence[bytes]) -> bytes:
        """The slow path: decode one by one, name the first bad candle, re-encode."""
        normalised: list[Candle] = []
        last = self._last_time
        for offset, raw in enumerate(stored):
            position = self._position + offset
            try:
                candle = _decode_candle(raw)
            except msgspec.DecodeError as exc:
                raise DataError(
                    f"candle {position} of interval '{self._interval}' is malformed: {exc}"
                ) from exc
            time = candle.time.astimezone(UTC)
            if last is not None and time <= last:
                raise DataError(
                    f"candle {position} of interval '{self._interval}' is not after the"
                    f" one before it ({time.isoformat()} <= {last.isoformat()})"
                )
            candle.time = last = time
            normalised.append(candle)
        self._last_time = last
        self._position += len(stored)
        return _encode(normalised)


def _parse_utc(canonical: str) -> datetime:
    return datetime.fromisoformat(canonical)


def encode_candles(candles: Sequence[Candle]) -> bytes:
    """The canonical JSON array of already validated candles (times in UTC)."""
    return _encode(candles)


def encode_candle(candle: Candle) -> bytes:
    """One candle as a worker stores it: canonical JSON."""
    return _encode(candle)
