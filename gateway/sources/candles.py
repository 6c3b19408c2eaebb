"""Validation of stored candles, and their one canonical JSON form.

The hot path: a chunk of stored candles (one ``bytes`` per candle, as Redis
returns them) becomes one JSON array for a ``data_chunk``. Stored candles are
usually already in the output's form (``time`` in UTC with ``Z``, no extra
fields), so the array is spliced from the stored bytes and only *validated*:
one ``msgspec`` decode of the whole array into typed structs (in C), a count
of ``Z`` suffixes, and an ascending-time check. Anything else (another
offset, extra fields) takes the slow path: each candle is decoded alone, so a
bad one is reported by its position, and the chunk is encoded again. Nothing
is ever dropped: a candle that does not validate makes the whole chunk a
``DataError``.
"""

from __future__ import annotations

import operator
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from gateway.errors import DataError


class CanonicalCandle(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A stored candle that may go to clients byte for byte, once its time is seen to end in Z.

    The time is parsed (in C) to validate it and to check the order; no
    unknown field may ride along, since the bytes are sent as stored.
    """

    time: Annotated[datetime, Meta(tz=True)]
    open: float
    high: float
    low: float
    close: float
    volume: int


class Candle(msgspec.Struct, gc=False):
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


class ValidatedChunks:
    """Chunks of stored lists this process has already validated, so that many streams validate once.

    Keyed by (list key, start, count): a job's lists never change while it
    runs (SPEC 6) and a cached backtest never changes, so a chunk found valid
    stays valid. Followers of one job, reconnecting clients and concurrent
    viewers read the very same chunks. Entries are bounded (least recently
    used go first) and expire, so a list deleted and written anew is checked
    again; the chunk's byte length must match too, a cheap guard against a
    worker that rewrote a list against the contract.
    """

    def __init__(self, max_entries: int = 16_384, ttl_s: float = 300.0) -> None:
        self._entries: OrderedDict[tuple[str, int, int], tuple[int, datetime, datetime, float]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s

    def lookup(self, key: str, start: int, count: int, size: int) -> tuple[datetime, datetime] | None:
        """The first and last time of a chunk validated before, if it was."""
        entry = self._entries.get((key, start, count))
        if entry is None or entry[0] != size or entry[3] < time.monotonic():
            return None
        self._entries.move_to_end((key, start, count))
        return entry[1], entry[2]

    def remember(self, key: str, start: int, count: int, size: int, first: datetime, last: datetime) -> None:
        self._entries[(key, start, count)] = (size, first, last, time.monotonic() + self._ttl_s)
        self._entries.move_to_end((key, start, count))
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class CandleValidator:
    """Turns consecutive chunks of one interval into JSON arrays, checking order across them."""

    __slots__ = ("_interval", "_key", "_last_time", "_memo", "_position", "first_time")

    def __init__(
        self,
        interval: str,
        position: int = 0,
        *,
        memo: ValidatedChunks | None = None,
        key: str = "",
    ) -> None:
        self._interval = interval
        # Index (in the stored list) of the next candle to validate, for messages.
        self._position = position
        self._last_time: datetime | None = None
        self._memo = memo
        self._key = key
        # Time of the first candle of the chunk last returned (with ``last_time``,
        # what a caller needs to check order across readers).
        self.first_time: datetime | None = None

    @property
    def last_time(self) -> datetime | None:
        return self._last_time

    def to_json_array(self, stored: Sequence[bytes]) -> bytes:
        """Validate ``stored`` (one JSON candle each) and return them as a JSON array."""
        if not stored:
            return b"[]"
        array = b"[" + b",".join(stored) + b"]"
        if self._memo is not None:
            known = self._memo.lookup(self._key, self._position, len(stored), len(array))
            if known is not None and (self._last_time is None or self._last_time < known[0]):
                self.first_time, self._last_time = known
                self._position += len(stored)
                return array
        try:
            candles = _decode_canonical(array)
        except msgspec.DecodeError:
            candles = None
        # The count check matters: a stored element holding two objects (or a
        # fragment) could still splice into a valid array of another length.
        if candles is not None and len(candles) == len(stored) and _utc_z(array, len(stored)):
            times = list(map(_time_of, candles))
            if (self._last_time is None or self._last_time < times[0]) and all(map(operator.lt, times, times[1:])):
                if self._memo is not None:
                    self._memo.remember(self._key, self._position, len(stored), len(array), times[0], times[-1])
                self.first_time, self._last_time = times[0], times[-1]
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
                raise DataError(f"candle {position} of interval '{self._interval}' is malformed: {exc}") from exc
            time = candle.time.astimezone(UTC)
            if last is not None and time <= last:
                raise DataError(
                    f"candle {position} of interval '{self._interval}' is not after the"
                    f" one before it ({time.isoformat()} <= {last.isoformat()})"
                )
            candle.time = last = time
            normalised.append(candle)
        self.first_time = normalised[0].time
        self._last_time = last
        self._position += len(stored)
        return _encode(normalised)


_time_of = operator.attrgetter("time")


def _utc_z(array: bytes, count: int) -> bool:
    """Whether every time is written ``...T...Z``: the only ``T`` and ``Z`` a candle may hold.

    Field names are fixed lower-case words (unknown fields were refused),
    numbers hold neither letter and a time holds one of each only in that
    form, so counting the letters in the array counts such times. (Single
    bytes: ``bytes.count`` of one byte is several times faster than of two.)
    """
    return array.count(b"Z") == count and array.count(b"T") == count


def encode_candles(candles: Sequence[Candle]) -> bytes:
    """The canonical JSON array of already validated candles (times in UTC)."""
    return _encode(candles)


def encode_candle(candle: Candle) -> bytes:
    """One candle as a worker stores it: canonical JSON."""
    return _encode(candle)
