"""The runner every server of the app uses: aiohttp's, with the gateway's JSON for the errors aiohttp answers itself.

A request that aiohttp's HTTP parser rejects (a malformed request line or
header, an invalid method, a line over the size limit) never reaches the app
or its ``error_middleware``: the connection answers it with
``RequestHandler.handle_error``, and so does an exception that escapes the
middleware. aiohttp answers those in plain text; ``JsonErrorHandler``
answers them in the SPEC's JSON like every other error (400
``invalid_request`` naming what the parser rejected, 500 ``internal``).

aiohttp's ``Server`` always builds a plain ``RequestHandler`` per
connection and offers no public option to change that:
``gateway/internals/aiohttp.py`` (its one door into aiohttp's private
parts) has the runner's server build ``JsonErrorHandler`` instead. After an
upgrade, ``tests/test_errors.py`` says whether that still holds.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway import metrics
from gateway.app import INTERNAL_ERROR_MESSAGE, error_response
from gateway.internals.aiohttp import Runner
from gateway.logs import clean

# aiohttp's reasons are fixed words followed by the rejected bytes, which may
# hold a token: "Invalid header token:\n\n  b'...'", "Bad status line 'GET
# /x?token=...'", "Got more than 8190 bytes when reading: b'...'". Only the
# words are kept, and only two or more of them: a request target (which
# some reasons consist of, e.g. ``InvalidURLError``'s) never holds a space.
_REASON = re.compile(r"[A-Z][A-Za-z0-9]*(?: [A-Za-z0-9]+)+(?=:|\s+b?'|\Z)")
_REASON_MAX_CHARS = 80


class JsonErrorHandler(RequestHandler):
    """A connection whose own error answers are the SPEC's JSON, not aiohttp's plain text."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own duties first: its log line (redacted by logs.RedactingFilter),
        # the ConnectionError when part of an answer already went out, the closed connection.
        super().handle_error(request, status, exc, message)
        if status == HTTPStatus.BAD_REQUEST:
            message = rejection_message(exc)
            response = error_response(status, "invalid_request", message, {})
            # Its own reason: on-call tells a scanner or a broken proxy from a client's bad parameter.
            metrics.request_refused(status, "malformed_http", message)
        else:  # 500, or 504 for a timeout: a bug either way (error_middleware answers everything else)
            response = error_response(status, "internal", INTERNAL_ERROR_MESSAGE, {})
            metrics.request_refused(status, "internal", INTERNAL_ERROR_MESSAGE)
        response.force_close()
        return response


def rejection_message(exc: BaseException | None) -> str:
    """What the parser rejected, in aiohttp's words, without a byte of the request."""
    reason = _REASON.match(exc.message) if isinstance(exc, HttpProcessingError) else None
    if reason and len(reason.group()) <= _REASON_MAX_CHARS:
        what = reason.group()
    elif exc is not None:
        what = type(exc).__name__
    else:
        what = "rejected by the HTTP parser"
    # clean() changes nothing in words of aiohttp's, but no message may ever carry a token
    return f"malformed HTTP request: {clean(what)}"


class GatewayRunner(Runner):
    """``web.AppRunner`` whose connections answer aiohttp's own errors in JSON.

    ``serve``, the dev server and the tests' servers all run the app on it.
    """

    handler_class = JsonErrorHandler
