"""Request parameters (SPEC 2): validated once, before anything touches a store.

Ids and interval names end up in Redis keys and query parameters, so they are
checked against the SPEC patterns here and nowhere is an unchecked one used.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from enum import Enum
from typing import Final

import msgspec
from multidict import MultiMapping

from gateway.errors import BadRequest, Unauthenticated

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
INTERVAL_PATTERN: Final = re.compile(r"[a-z0-9]{1,16}")
BACKTEST_PREFIX: Final = "bt_"
MAX_INTERVALS: Final = 16
LIMIT_RANGE: Final = (1, 50_000)
DEFAULT_LIMIT: Final = 1000
CHUNK_SIZE_RANGE: Final = (1, 5000)
DEFAULT_CHUNK_SIZE: Final = 500
_DIGITS: Final = re.compile(r"[0-9]{1,9}")
_BOOLEANS: Final = {"true": True, "1": True, "false": False, "0": False}
# Longest value worth parsing: 16 names of 16 characters and their commas.
_MAX_INTERVALS_TEXT: Final = MAX_INTERVALS * 17 * 4


class Order(Enum):
    SEQUENTIAL = "sequential"
    INTERLEAVED = "interleaved"


class StreamRequest(msgspec.Struct, frozen=True):
    """Everything a stream needs from its request, already validated."""

    id: str
    intervals: tuple[str, ...]
    limit: int
    chunk_size: int
    follow: bool
    order: Order
    token: str | None
    last_event_id: str | None

    @property
    def is_backtest(self) -> bool:
        return self.id.startswith(BACKTEST_PREFIX)

    def fingerprint(self) -> int:
        """A 32-bit digest of what shapes the event sequence, for resume ids."""
        shape = "\n".join(
            (self.id, ",".join(self.intervals), str(self.limit), str(self.chunk_size),
             str(self.follow), self.order.value)
        )  # fmt: skip
        return zlib.crc32(shape.encode())


def parse_stream_request(raw_id: str, query: MultiMapping[str], headers: Mapping[str, str]) -> StreamRequest:
    """Validate the path id, query and headers; raise ``BadRequest`` naming the parameter."""
    if not ID_PATTERN.fullmatch(raw_id):
        raise BadRequest("id", "must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    return StreamRequest(
        id=raw_id,
        intervals=_intervals(_single(query, "intervals")),
        limit=_integer(query, "limit", DEFAULT_LIMIT, LIMIT_RANGE),
        chunk_size=_integer(query, "chunk_size", DEFAULT_CHUNK_SIZE, CHUNK_SIZE_RANGE),
        follow=_boolean(query, "follow"),
        order=_order(query),
        token=_token(query, headers),
        last_event_id=headers.get("Last-Event-ID") or _single(query, "last_event_id") or None,
    )


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(name, "given more than once")
    return values[0] if values else None


def _intervals(text: str | None) -> tuple[str, ...]:
    if text is None or text == "":
        raise BadRequest("intervals", "required: comma-separated interval names, e.g. day,minute")
    if len(text) > _MAX_INTERVALS_TEXT:
        raise BadRequest("intervals", f"at most {MAX_INTERVALS} names")
    names: dict[str, None] = {}  # insertion-ordered: the first position of a repeat wins
    for name in text.split(","):
        if not INTERVAL_PATTERN.fullmatch(name):
            shown = name if len(name) <= 32 else name[:32] + "..."
            raise BadRequest("intervals", f"{shown!r} is not an interval name (^[a-z0-9]{{1,16}}$)")
        names[name] = None
    if len(names) > MAX_INTERVALS:
        raise BadRequest("intervals", f"at most {MAX_INTERVALS} names, got {len(names)}")
    return tuple(names)


def _integer(query: MultiMapping[str], name: str, default: int, bounds: tuple[int, int]) -> int:
    text = _single(query, name)
    if text is None:
        return default
    low, high = bounds
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise BadRequest(name, f"must be an integer from {low} to {high}")
    return int(text)


def _boolean(query: MultiMapping[str], name: str) -> bool:
    text = _single(query, name)
    if text is None:
        return False
    value = _BOOLEANS.get(text.lower())
    if value is None:
        raise BadRequest(name, "must be true, false, 1 or 0")
    return value


def _order(query: MultiMapping[str]) -> Order:
    text = _single(query, "order")
    if text is None:
        return Order.SEQUENTIAL
    try:
        return Order(text)
    except ValueError:
        raise BadRequest("order", "must be sequential or interleaved") from None


def _token(query: MultiMapping[str], headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            # A credential we cannot use is "no token": 401, like a missing one.
            raise Unauthenticated("Authorization header must be 'Bearer <token>'")
        return credentials.strip()
    return _single(query, "token") or None
