"""What the gateway relies on in aiohttp beyond its documented API (aiohttp is pinned in setup.cfg).

- ``HeadersWithFirstWrite``: a ``StreamResponse`` writes its headers at
  ``prepare()`` unless its class says to hold them for the first body
  write (``_send_headers_immediately``, which ``web.Response`` sets): a
  stream's headers then leave with its first events, one system call
  fewer per new stream.
- ``write_at_once``: aiohttp's public ``StreamWriter.write(data,
  drain=False)`` is a coroutine that never suspends when the response has
  no compression of aiohttp's and no ``on_chunk_sent`` hook (the server's
  writers have none): it frames the bytes (chunked for HTTP/1.1, plain for
  1.0), sends the held headers with the first ones, counts
  ``output_size`` and hands them to the transport. Run to completion
  here, it lets the follow hub write one frame to thousands of sockets in
  one pass, with aiohttp's own framing and accounting and no task switch
  per socket.

- ``write_body``: once the headers are out, the same bytes and counts as
  ``write_at_once`` without running a coroutine: the body framed as
  aiohttp frames it (``StreamWriter.chunked``: HTTP/1.1 chunked encoding;
  HTTP/1.0 plain), ``output_size`` and ``buffer_size`` counted, one
  ``transport.write``. It pays for itself in the follow hub, which writes
  one frame to thousands of sockets: measured in the commit that added it.
- ``handlers_as``: aiohttp answers a request its HTTP parser rejects in
  plain text from ``RequestHandler.handle_error``, before any app,
  middleware or signal sees it; its ``Server`` always builds a plain
  ``RequestHandler`` per connection, and no public option changes either
  (``access_log_class`` and ``logger`` only observe). So the runner's
  server is given a subclass that builds the gateway's handler
  (``runner.JsonErrorHandler``), leaning on the runner's ``_make_server``
  hook and the ``_loop`` and ``_kwargs`` that ``Server.__call__`` passes on.
  Not for speed (it has none): for the SPEC's JSON on every error.

- ``write_shared``: ``write_body`` with the framing done once for many
  writers (``SharedBody``): the follow hub's one look, written to every
  follower at its spot.

``tests/test_internals.py`` pins all but the last; ``tests/test_errors.py`` the last.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import StreamWriter
from aiohttp.web_protocol import RequestHandler


class HeadersWithFirstWrite:
    """Mixed in before ``web.StreamResponse``: the headers go out with the first body write, not at ``prepare()``."""

    _send_headers_immediately = False


def write_at_once(writer: AbstractStreamWriter, data: bytes) -> None:
    """``await writer.write(data, drain=False)``, completed on the spot; raises what the write raises.

    ``ConnectionResetError`` (aiohttp's ``ClientConnectionResetError``) when the transport is closing.
    """
    if not isinstance(writer, StreamWriter):  # the server's writer; the abstract one has no ``drain=``
        raise TypeError(f"not aiohttp's StreamWriter: {type(writer).__name__}")
    step = writer.write(data, drain=False)
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("aiohttp's StreamWriter.write(drain=False) waited: tests/test_internals.py says why")


def write_body(writer: AbstractStreamWriter, transport: asyncio.Transport, data: bytes) -> None:
    """``write_at_once(writer, data)`` after the first body write, for a body without Content-Length or compression."""
    if not isinstance(writer, StreamWriter) or writer.length is not None:
        write_at_once(writer, data)
        return
    if transport.is_closing():
        raise ConnectionResetError("Cannot write to closing transport")
    if writer.chunked:
        data = b"%x\r\n%b\r\n" % (len(data), data)
    writer.output_size += len(data)
    writer.buffer_size += len(data)
    transport.write(data)


class SharedBody:
    """One body write meant for many responses, framed once as aiohttp would frame it for each kind of body."""

    __slots__ = ("chunked", "plain")

    def __init__(self, data: bytes) -> None:
        self.plain = data  # an HTTP/1.0 body (and what a first write, or an odd writer, is given)
        self.chunked = b"%x\r\n%b\r\n" % (len(data), data)  # an HTTP/1.1 chunk


def write_shared(writer: AbstractStreamWriter, transport: asyncio.Transport, body: SharedBody) -> None:
    """``write_body(writer, transport, body.plain)``, for a caller that just found ``transport`` open.

    The follow hub writes one look's frames to every follower at its spot:
    the chunk is framed once for all of them, not once per follower.
    """
    if not isinstance(writer, StreamWriter) or writer.length is not None:
        write_at_once(writer, body.plain)
        return
    data = body.chunked if writer.chunked else body.plain
    writer.output_size += len(data)
    writer.buffer_size += len(data)
    transport.write(data)


class _BuildsHandlers(web.Server):
    handler_class: type[RequestHandler] = RequestHandler

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


def handlers_as(server: web.Server, handler_class: type[RequestHandler]) -> None:
    """Have ``server`` (built by an ``AppRunner``) build each connection's handler as ``handler_class``."""
    # Same object, same state: only the class that builds each connection's handler changes.
    server.__class__ = type("GatewayServer", (_BuildsHandlers,), {"handler_class": handler_class})


class Runner(web.AppRunner):
    """``web.AppRunner`` whose server builds ``handler_class`` for each connection."""

    handler_class: type[RequestHandler] = RequestHandler

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's startup, builds aiohttp's Server
        handlers_as(server, self.handler_class)
        return server
