"""The connections a serving process accepts: bounded in number, and in the time their headers may take.

aiohttp reads a request's headers for as long as the client likes, and a
process holds as many connections as it has file descriptors: 20,000
connections that never finish their headers (slowloris) took every
descriptor, and ``/healthz`` and real streams were reset. ``ConnectionGuard``
wraps the protocol factory that ``loop.create_server`` is handed (aiohttp's
``web.Server``, a public protocol factory) and adds, per process:

- a header-read deadline (``server.header_timeout_s``): a connection whose
  request headers are not complete that long after it opened, or after the
  first byte of its next request, is answered 408 and closed (after up to
  ``LINGER_S`` of reading and dropping what it still sends). A total
  deadline, not an idle one: a client trickling a byte a second is cut too.
  One sweep per process every ``SWEEP_EVERY_S`` finds the overdue ones, not a
  timer per connection (1.3 us per connection for the whole guard, against
  21 us with a timer and a gauge updated per connection);
- a connection cap (``server.max_connections``; 0 sizes it from the
  process's open-file limit): past it a connection is answered 503 with
  ``Retry-After`` and closed at once, except that ``HEALTH_HEADROOM`` more
  are let in for ``/healthz`` and ``/readyz`` only, so that probes still
  answer when slow clients fill the process;
- one log line per kind and ``LOG_EVERY_S`` with how many connections were
  cut, and ``gateway_connections_refused_total{reason}`` and
  ``gateway_connections_open``.

The short keep-alive timeout for idle connections between requests is
aiohttp's own ``keepalive_timeout`` (``server.keepalive_timeout_s``); the
guard counts and logs the connections it closes (``keepalive_timeout``): a
connection the server closed, idle that long since its last answer
(``responded_middleware`` marks the end of each answer).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Gauge

from gateway.metrics import NAMESPACE

log = logging.getLogger(__name__)

HEALTH_HEADROOM: Final = 32
HEALTH_PATHS: Final = (b"/healthz", b"/readyz")
# File descriptors a process keeps for what is not a client connection: the
# Redis pool, BigQuery, the metrics port, logs, the event loop's own.
RESERVED_FILES: Final = 512
LOG_EVERY_S: Final = 10.0
# How often overdue header deadlines are looked for: one sweep per process, not
# a timer per connection (the deadline is kept to within this).
SWEEP_EVERY_S: Final = 0.5
# After a 408 the gateway sends its FIN and drops what the client still sends
# for this long before it closes (nginx's lingering close): closing with the
# client's bytes arriving is a reset, and a reset can reach the client before
# the 408 it was sent and discard it.
LINGER_S: Final = 2.0
_HEADERS_END: Final = b"\r\n\r\n"
_REQUEST_LINE_MAX: Final = 8192

CONNECTIONS_OPEN = Gauge("connections_open", "Client connections open now", namespace=NAMESPACE)
CONNECTIONS_REFUSED = Counter(
    "connections_refused",
    "Client connections cut before a request: header_timeout (408), at_capacity (503),"
    " keepalive_timeout (idle after an answer)",
    ["reason"],
    namespace=NAMESPACE,
)


def _answer(status: str, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode() + body


_TIMEOUT_ANSWER: Final = _answer(
    "408 Request Timeout", b'{"error":"invalid_request","message":"the request headers took too long"}'
)


def _capacity_answer(retry_after_s: int) -> bytes:
    body = b'{"error":"unavailable","message":"this replica holds its maximum of connections; retry"}'
    return _answer("503 Service Unavailable", body, f"Retry-After: {retry_after_s}")


def connection_cap(configured: int) -> int:
    """``server.max_connections``, or (0) the process's open-file limit less ``RESERVED_FILES`` and the headroom."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - RESERVED_FILES - HEALTH_HEADROOM)


class _CutLog:
    """One line per reason and ``LOG_EVERY_S``: a flood of cut connections is a few log lines, not one each."""

    def __init__(self, message: str, level: int = logging.WARNING) -> None:
        self._message = message
        self._level = level
        self._count = 0
        self._next_at = 0.0

    def cut(self, reason: str) -> None:
        CONNECTIONS_REFUSED.labels(reason).inc()
        self._count += 1
        now = time.monotonic()
        if now >= self._next_at:
            log.log(self._level, self._message, self._count, LOG_EVERY_S)
            self._count = 0
            self._next_at = now + LOG_EVERY_S


class ConnectionGuard:
    """A protocol factory around aiohttp's: every connection it makes is guarded (see the module's docstring)."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        *,
        header_timeout_s: float,
        max_connections: int,
        retry_after_s: int = 1,
        keepalive_timeout_s: float | None = None,
    ) -> None:
        self._factory = factory
        self.header_timeout_s = header_timeout_s
        # A server-side close this long after the last answer is aiohttp's keep-alive
        # timeout (less a margin: the answer's end is marked as the handler returns).
        self._keepalive_close_after_s = None if keepalive_timeout_s is None else keepalive_timeout_s * 0.9
        self.max_connections = max_connections
        self._capacity_answer = _capacity_answer(retry_after_s)
        self.open = 0
        # Connections waiting for the end of their headers, by deadline: a constant
        # timeout keeps insertion order deadline order, so a sweep stops at the first not due.
        self._waiting: dict[GuardedProtocol, float] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        CONNECTIONS_OPEN.set_function(lambda: self.open)
        self._timeouts = _CutLog("closed %d connection(s) whose request headers took too long (per %.0f s)")
        self._refusals = _CutLog("refused %d connection(s): at server.max_connections (per %.0f s)")
        # Routine (a browser keeps idle connections): INFO, not a warning.
        self._keepalive_closes = _CutLog(
            "closed %d idle keep-alive connection(s) at server.keepalive_timeout_s (per %.0f s)", logging.INFO
        )

    def __call__(self) -> asyncio.Protocol:
        return GuardedProtocol(self)

    def _opened(self) -> str:
        """Count a new connection: ``"serve"``, ``"health_only"`` (headroom) or ``"refuse"``."""
        self.open += 1
        if self.open <= self.max_connections:
            return "serve"
        if self.open <= self.max_connections + HEALTH_HEADROOM:
            return "health_only"
        return "refuse"

    def _closed(self) -> None:
        self.open -= 1

    def _wait(self, connection: GuardedProtocol) -> None:
        """Start (or restart) ``connection``'s header deadline."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiting.pop(connection, None)
        self._waiting[connection] = loop.time() + self.header_timeout_s
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(SWEEP_EVERY_S, self._sweep)

    def _done_waiting(self, connection: GuardedProtocol) -> None:
        self._waiting.pop(connection, None)

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        while self._waiting:
            connection, deadline = next(iter(self._waiting.items()))
            if deadline > now:
                break
            del self._waiting[connection]
            connection._headers_too_slow()
        self._sweep_handle = self._loop.call_later(SWEEP_EVERY_S, self._sweep) if self._waiting else None


class GuardedProtocol(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, the header deadline and the cap around it."""

    __slots__ = (
        "_client_eof",
        "_guard",
        "_held",
        "_idle_since",
        "_inner",
        "_mode",
        "_tail",
        "_transport",
        "_waiting",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._waiting = False  # for the end of the request's headers, deadline running
        self._tail = b""  # the last bytes seen while waiting for the end of the headers
        self._held = b""  # a headroom connection's bytes, until its request line says where it goes
        self._mode = "serve"
        self._idle_since: float | None = None  # when the last answer ended (None: none, or one is under way)
        self._client_eof = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._mode = self._guard._opened()
        if self._mode == "refuse":
            self._guard._refusals.cut("at_capacity")
            transport.write(self._guard._capacity_answer)
            transport.close()
            return
        self._arm()
        if self._mode == "serve":
            self._start_inner()

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing() or self._mode == "linger":
            return
        if not self._waiting:  # the first bytes of the next request on this connection
            self._tail = b""
            self._idle_since = None  # not idle: a close from now on is not the keep-alive timeout's
            self._arm()
        seen = self._tail + data
        if _HEADERS_END in seen:
            self._disarm()
        else:
            self._tail = seen[-3:]
        if self._mode == "health_only":
            self._held += data
            self._route_headroom()
            return
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._client_eof = True
        if self._mode == "linger":
            return None  # the client is done too: the transport closes
        if self._inner is not None:
            return self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if exc is None and not self._client_eof and self._idle_since is not None and not self._waiting:
            after_s = self._guard._keepalive_close_after_s
            if after_s is not None and time.monotonic() - self._idle_since >= after_s:
                self._guard._keepalive_closes.cut("keepalive_timeout")
        if self._transport is not None:
            self._guard._closed()
            self._transport = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def responded(self) -> None:
        """An answer ended: the connection is idle until the next request's first byte."""
        self._idle_since = time.monotonic()

    # -- the guard -------------------------------------------------------------

    def _start_inner(self) -> None:
        assert self._transport is not None
        self._inner = self._guard._factory()
        self._inner.connection_made(self._transport)

    def _arm(self) -> None:
        self._waiting = True
        self._guard._wait(self)

    def _disarm(self) -> None:
        if self._waiting:
            self._waiting = False
            self._guard._done_waiting(self)

    def _headers_too_slow(self) -> None:
        self._waiting = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._guard._timeouts.cut("header_timeout")
        transport.write(_TIMEOUT_ANSWER)
        if not transport.can_write_eof():
            transport.close()
            return
        self._mode = "linger"
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _route_headroom(self) -> None:
        """A connection past the cap: served if its request line names a health check, else refused."""
        assert self._transport is not None
        line_end = self._held.find(b"\r\n")
        if line_end < 0 and len(self._held) < _REQUEST_LINE_MAX:
            return  # the request line is not complete yet (the header deadline bounds the wait)
        parts = self._held[: max(line_end, 0)].split(b" ")
        path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
        if path not in HEALTH_PATHS:
            self._disarm()
            self._guard._refusals.cut("at_capacity")
            self._transport.write(self._guard._capacity_answer)
            self._transport.close()
            return
        held, self._held = self._held, b""
        self._mode = "serve"
        self._start_inner()
        assert self._inner is not None
        self._inner.data_received(held)


@web.middleware
async def responded_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Marks the end of each answer on its connection, for the keep-alive close count.

    The outermost middleware: a stream's answer ends as its handler returns; a
    plain answer is written just after, which the count's margin covers.
    """
    try:
        return await handler(request)
    finally:
        transport = request.transport
        protocol = None if transport is None else transport.get_protocol()
        if isinstance(protocol, GuardedProtocol):
            protocol.responded()
