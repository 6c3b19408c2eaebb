"""Validation of stored candles, and their one canonical JSON form.

The hot path: a chunk of stored candles (one ``bytes`` per candle, as Redis
returns them) becomes one JSON array for a ``data_chunk``. Stored candles are
usually already in the output's form (``time`` in UTC with ``Z``, no extra
fields), so the array is spliced from the stored bytes and only *validated*:
one ``msgspec`` decode of the whole array into typed structs (in C), a count
of ``Z`` suffixes, a few byte counts (see ``_plain_form``), and an
ascending-time check. Anything else (another offset, extra fields, a line
break, an escape, a repeated key) takes the slow path: each candle is decoded
alone, so a bad one is reported by its position, and the chunk is encoded
again. The fast path never sends what the slow path would refuse, nor
anything but what it would send re-encoded (the same fields, values and
instants; only the spelling of numbers and fractional seconds may differ).
Nothing is ever dropped: a candle that does not validate makes the whole
chunk a ``DataError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from gateway.errors import DataError
from gateway.sources.base import Chunk, JobState

# BigQuery's INT64, so that a volume a worker stores can also be warehoused
# (and a 30-digit number never reaches a browser as a rounded double).
Volume = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_FIELDS: Final = ("time", "open", "high", "low", "close", "volume")
_QUOTED_FIELDS: Final = tuple(f'"{name}"'.encode() for name in _FIELDS)
# Quote bytes of a plain candle: six keys and one string value (the time).
_QUOTES_PER_CANDLE: Final = 2 * (len(_FIELDS) + 1)
_OPEN_BRACE: Final = ord("{")


class Candle(msgspec.Struct, gc=False):
    """Any candle the worker contract allows: RFC 3339 time with any offset."""

    time: Annotated[datetime, Meta(tz=True)]
    open: float
    high: float
    low: float
    close: float
    volume: Volume


class CanonicalCandle(Candle, forbid_unknown_fields=True):
    """A stored candle that may go to clients byte for byte, once its time is seen to end in Z.

    The time is parsed (in C) to validate it and to check the order; no
    unknown field may ride along, since the bytes are sent as stored.
    """


_decode_canonical = msgspec.json.Decoder(list[CanonicalCandle]).decode
_decode_candle = msgspec.json.Decoder(Candle).decode
_encode = msgspec.json.Encoder().encode


class ValidatedChunks:
    """Chunks this process has already validated, so that many streams validate once.

    Keyed by content: the SHA-256 of the very bytes that would be sent. A
    job's lists never change while it runs (SPEC 6) and a cached backtest
    never changes, so followers of one job, reconnecting clients and
    concurrent viewers read the very same chunks; a worker that rewrites a
    list against the contract changes the bytes, hence the key, so rewritten
    bytes are always validated before they are sent. Hashing a 500-candle
    chunk costs about a seventh of validating it (docs/PERFORMANCE.md).
    Entries are bounded (least recently used go first) and expire.
    """

    def __init__(self, max_entries: int = 16_384, ttl_s: float = 300.0) -> None:
        self._entries: OrderedDict[bytes, tuple[datetime, datetime, float]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s

    def lookup(self, digest: bytes) -> tuple[datetime, datetime] | None:
        """The first and last time of the chunk with this digest, if it was validated before."""
        entry = self._entries.get(digest)
        if entry is None or entry[2] < time.monotonic():
            return None
        self._entries.move_to_end(digest)
        return entry[0], entry[1]

    def remember(self, digest: bytes, first: datetime, last: datetime) -> None:
        self._entries[digest] = (first, last, time.monotonic() + self._ttl_s)
        self._entries.move_to_end(digest)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


def chunk_digest(array: bytes) -> bytes:
    """The memo's key of a chunk: SHA-256 (hardware-accelerated on current x86 and ARM)."""
    return hashlib.sha256(array).digest()


class CandleValidator:
    """Turns consecutive chunks of one interval into JSON arrays, checking order across them."""

    __slots__ = ("_interval", "_last_time", "_memo", "_position", "first_time")

    def __init__(
        self,
        interval: str,
        position: int = 0,
        *,
        memo: ValidatedChunks | None = None,
    ) -> None:
        self._interval = interval
        # Index (in the stored list) of the next candle to validate, for messages.
        self._position = position
        self._last_time: datetime | None = None
        self._memo = memo
        # Time of the first candle of the chunk last returned (with ``last_time``,
        # what a caller needs to check order across readers).
        self.first_time: datetime | None = None

    @property
    def last_time(self) -> datetime | None:
        return self._last_time

    def to_chunk(
        self,
        stored: Sequence[bytes],
        state: JobState | None = None,
        before: bytes | None = None,
        *,
        anchored: bool = True,
    ) -> Chunk:
        """``stored`` validated as one ``Chunk`` (with its first and last times); DataError names a bad point.

        ``anchored``: the list may change under its readers (a job's in Redis, which workers write),
        so the chunk keeps its last stored element for the next read's check.
        """
        points = self.to_json_array(stored)
        last = stored[-1] if stored and anchored else None
        return Chunk(points, len(stored), state, self.first_time, self._last_time, before, last)

    def to_json_array(self, stored: Sequence[bytes]) -> bytes:
        """Validate ``stored`` (one JSON candle each) and return them as a JSON array."""
        if not stored:
            return b"[]"
        array = b"[" + b",".join(stored) + b"]"
        digest = None
        if self._memo is not None:
            digest = chunk_digest(array)
            known = self._memo.lookup(digest)
            if known is not None and (self._last_time is None or self._last_time < known[0]):
                self.first_time, self._last_time = known
                self._position += len(stored)
                return array
        candles = None
        if _plain_form(array, len(stored)):
            with contextlib.suppress(msgspec.DecodeError, RecursionError):
                candles = _decode_canonical(array)
        # The count and first-byte checks matter: a stored element holding two
        # objects (or a fragment) could still splice into a valid array, which
        # the slow path, decoding element by element, would refuse.
        if (
            candles is not None
            and len(candles) == len(stored)
            and bytes(map(_first_byte, stored)) == b"{" * len(stored)
        ):
            times = list(map(_time_of, candles))
            if (self._last_time is None or self._last_time < times[0]) and all(map(operator.lt, times, times[1:])):
                if self._memo is not None:
                    assert digest is not None
                    self._memo.remember(digest, times[0], times[-1])
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
            except (msgspec.DecodeError, RecursionError) as exc:  # msgspec: RecursionError when nested too deep
                raise DataError(f"candle {position} of interval '{self._interval}' is malformed: {exc}") from exc
            try:
                repeated = _repeated_field(raw)
            except (ValueError, RecursionError) as exc:  # what msgspec took, Python's parser may not
                raise DataError(f"candle {position} of interval '{self._interval}' is malformed: {exc}") from exc
            if repeated is not None:
                # msgspec (and a browser's JSON.parse) would silently keep the last one.
                raise DataError(f"candle {position} of interval '{self._interval}' has the key '{repeated}' twice")
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
_first_byte = operator.itemgetter(0)


def _plain_form(array: bytes, count: int) -> bool:
    """Whether ``array`` may go out as it is, provided it decodes as ``count`` canonical candles.

    Given such a decode (six known keys per candle, each at least once; the
    time a string, the rest numbers), these byte checks make every candle
    exactly what its re-encoding would say:

    - no CR or LF: the array goes into one SSE ``data:`` line, where either
      would end it;
    - no backslash: no escape anywhere, so keys and times are spelt literally;
    - 14 quote bytes per candle: each candle has at least six keys and one
      time string (14 quotes), any repeated key adds quotes, so the total is
      reached only if no candle repeats a key;
    - one ``Z`` and one ``T`` per candle: only a time can hold either letter,
      and at most one of each, so every time is written ``...T...Z``.

    Single bytes: ``bytes.find`` and ``bytes.count`` of one byte are several
    times faster than of two.
    """
    return (
        array.find(b"\n") < 0
        and array.find(b"\r") < 0
        and array.find(b"\\") < 0
        and array.count(b"Z") == count
        and array.count(b"T") == count
        and array.count(b'"') == _QUOTES_PER_CANDLE * count
    )


def _repeated_field(raw: bytes) -> str | None:
    """The first of the six fields that ``raw`` names twice, if any.

    Cheap unless in doubt: the quoted names are counted, and only when they
    do not add up to six (a name repeated, or also used as another key or
    value) or an escape could hide one does the candle get parsed exactly.
    """
    if raw.find(b"\\") < 0 and sum(map(raw.count, _QUOTED_FIELDS)) == len(_FIELDS):
        return None
    pairs: list[tuple[str, Any]] = json.loads(raw, object_pairs_hook=_pairs)
    names = [name for name, _ in pairs if name in _FIELDS]
    for name in names:
        if names.count(name) > 1:
            return name
    return None


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


def encode_candle(candle: Candle) -> bytes:
    """One candle as a worker stores it: canonical JSON."""
    return _encode(candle)
