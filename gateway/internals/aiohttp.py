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

``tests/test_internals.py`` pins both.
"""

from __future__ import annotations

from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import StreamWriter


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
