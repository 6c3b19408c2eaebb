"""Cross-origin reads (SPEC 2): pages of the origins in ``server.cors_origins`` may read the streams.

The client sends ``Authorization`` and ``Last-Event-ID``, which are not
CORS-safelisted, so a browser asks first with a preflight (``OPTIONS`` with
``Access-Control-Request-Method``). For an allowed origin the preflight is
answered 204 with what the stream needs (method GET; those headers and
``Cache-Control``; a max-age so that reconnects skip it), and every answer to
that origin, the stream and the JSON error answers alike, carries
``Access-Control-Allow-Origin`` (an error the page cannot read would hide why
it failed). Any other origin gets no CORS header at all, and its preflight a
JSON 403 naming the origin: the browser then refuses to send the request.

No credentials: tokens travel in the ``Authorization`` header (or ``token=``),
never in cookies, so ``Access-Control-Allow-Credentials`` is never sent, and
a page of an allowed origin reads exactly what its token allows.

The headers are set in ``on_response_prepare``, the one moment every answer
passes, whether a handler returned it or a stream prepared it.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from gateway import metrics

ALLOWED_METHODS = frozenset({"GET"})
# Request headers a page may send beyond the CORS-safelisted ones (Accept is safelisted).
ALLOWED_HEADERS = ("Authorization", "Last-Event-ID", "Cache-Control")
# Response headers a page may read beyond the safelisted ones: the client waits out Retry-After.
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate"
# How long a browser may reuse a preflight's answer (Chromium caps it at 2 h, Firefox at 24 h).
PREFLIGHT_MAX_AGE_S = 600
REFUSED_CODE = "cors_refused"


class CorsPolicy:
    """Which origins may read cross-origin, and the headers that tell the browser so."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(normalise_origin(origin) for origin in origins)
        self._allowed_headers = frozenset(name.lower() for name in ALLOWED_HEADERS)

    def allows(self, origin: str) -> bool:
        return normalise_origin(origin) in self.origins

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        """The answer to a preflight: 204 with the grant, or a JSON 403 that says what was refused."""
        method = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD, "")
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        headers = [name.strip().lower() for name in asked.split(",") if name.strip()]
        if not self.allows(origin):
            why = "not in server.cors_origins" if self.origins else "server.cors_origins is empty: same-origin only"
            return _refused(f"origin {origin!r} may not read this gateway's streams cross-origin ({why})")
        if method not in ALLOWED_METHODS:
            return _refused(f"method {method!r} is not allowed cross-origin (only GET)")
        unknown = [name for name in headers if name not in self._allowed_headers]
        if unknown:
            allowed = ", ".join(ALLOWED_HEADERS)
            return _refused(f"request header(s) {', '.join(unknown)} not allowed cross-origin (allowed: {allowed})")
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(sorted(ALLOWED_METHODS)),
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(ALLOWED_HEADERS),
                hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_S),
                hdrs.VARY: "Origin",
            },
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answers preflights (with no allowed origin too: a JSON 403 rather than the router's 405)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin and _is_preflight(request):
            return self.preflight(request, origin)
        return await handler(request)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """For ``app.on_response_prepare`` when any origin is allowed: every answer passes here."""
        self.decorate(request, response)

    def decorate(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """An answer about to be sent: the allow headers for an allowed origin, ``Vary: Origin`` for all."""
        # The answer depends on Origin whenever there is a list: a cache must not hand one origin's to another.
        _add_vary(response, "Origin")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allows(origin) or _is_preflight(request):
            return  # a preflight's grant is preflight()'s own; a refused one carries none
        response.headers.setdefault(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, origin)
        if response.status != 204:
            response.headers.setdefault(hdrs.ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS)


def normalise_origin(origin: str) -> str:
    """An origin as browsers serialise it: lower case, without the scheme's default port."""
    origin = origin.strip().lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


def _is_preflight(request: web.BaseRequest) -> bool:
    return request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers


def _refused(message: str) -> web.Response:
    metrics.request_refused(403, REFUSED_CODE, message)
    return web.json_response({"error": REFUSED_CODE, "message": message}, status=403)


def _add_vary(response: web.StreamResponse, name: str) -> None:
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = name
    elif name.lower() not in {part.strip().lower() for part in vary.split(",")}:
        response.headers[hdrs.VARY] = f"{vary}, {name}"
