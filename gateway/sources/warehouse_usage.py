"""What the warehouse did on one stream's behalf, for that stream's log line.

The handler starts a ``WarehouseUsage`` at the top of each request
(``track``); it rides in the request's context, which the tasks started for
the request (the shared metadata lookup, an interval's fill) copy, so every
warehouse call made because of this stream adds to it. Streams that join a
fill another stream started add nothing: the cost is logged once, on the
stream that caused it.
"""

from __future__ import annotations

from contextvars import ContextVar


class WarehouseUsage:
    """Seconds in warehouse calls, queries run, result pages read, and bytes as BigQuery reported them."""

    __slots__ = ("bytes_billed", "bytes_processed", "pages", "queries", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.queries = 0
        self.pages = 0
        self.bytes_processed = 0
        self.bytes_billed = 0


_CURRENT: ContextVar[WarehouseUsage | None] = ContextVar("warehouse_usage", default=None)


def track() -> WarehouseUsage:
    """A new account for the current request (and the tasks it starts from now on)."""
    usage = WarehouseUsage()
    _CURRENT.set(usage)
    return usage


def current() -> WarehouseUsage | None:
    return _CURRENT.get()
