"""The access log: one line per request, with nothing in it that a request could abuse."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.logs import clean


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines without the query string (it may carry a token), every request field escaped.

    A candle stream that started (a 200 ``text/event-stream``) is not logged
    here: it gets its own ``stream end`` line (``observe.py``), written however
    the stream ends, where aiohttp's access log misses every cancelled handler.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.content_type == "text/event-stream" and response.status == 200:
            return
        self.logger.info(
            '%s "%s %s" %s %s %.3fs',
            clean(request.remote or "-"),
            clean(request.method),
            # escaped: a %0A in the path must not become a line of its own
            clean(request.path),
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
