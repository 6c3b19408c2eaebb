"""The gateway's own exceptions.

Lower-level errors (redis, aiohttp client, google-auth, BigQuery) are caught
where they happen and re-raised as one of these with ``raise ... from exc``.
``app.py`` turns the request-level ones into HTTP answers and ``stream.py``
turns the stream-level ones into ``error`` events; nothing else does either.

    GatewayError
    ├── ConfigError              a setting with a bad value (stops start-up)
    ├── RequestError             answered before the stream starts
    │   ├── BadRequest           400 invalid_request (names the parameter)
    │   ├── Unauthenticated      401 unauthenticated (names the failed check)
    │   ├── TooManyStreams       429 too_many_streams
    │   └── Unavailable          503 unavailable
    └── StreamError              an ``error`` event inside the stream
        ├── JobNotFound          job_not_found (fatal)
        ├── JobFailed            job_error (fatal)
        ├── SourceUnavailable    connection_error (fatal, resumable)
        │   └── RedisUnreachable  Redis did not answer (503 before the stream starts)
        └── DataError            data_error (that interval only)
            └── StoredValueMalformed  a Redis key of the wrong type (job_error for the job hash)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    """A setting is missing or has a bad value; the message names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"setting {setting}: {message}")
        self.setting = setting


class RequestError(GatewayError):
    """An error answered with a JSON body before any event is sent."""

    status = 500
    code = "internal"
    #: Seconds for the ``Retry-After`` header (429 and 503).
    retry_after_s: int | None = None


class BadRequest(RequestError):
    """A request parameter breaks a rule; the message names the parameter."""

    status = 400
    code = "invalid_request"

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class Unauthenticated(RequestError):
    """No token, or a token that failed one named verification check."""

    status = 401
    code = "unauthenticated"


class TooManyStreams(RequestError):
    """The user already holds the configured number of open streams."""

    status = 429
    code = "too_many_streams"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(RequestError):
    """The replica is draining, or cannot reach Redis at all."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, reason: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        #: The metric's ``reason`` label (``draining``, ``redis_<cause>``); None lets the message decide.
        self.reason = reason


class StreamError(GatewayError):
    """An error reported inside the stream as an ``error`` event."""

    code = "internal"
    #: Fatal errors end the stream; the others skip one interval.
    fatal = True


class JobNotFound(StreamError):
    """No such job or backtest, or the user may not read it."""

    code = "job_not_found"


class JobFailed(StreamError):
    """The job's status is ``failed`` or ``cancelled``."""

    code = "job_error"


class SourceUnavailable(StreamError):
    """The store became unreachable (or is not configured) mid-stream."""

    code = "connection_error"


class RedisUnreachable(SourceUnavailable):
    """Redis did not answer: a 503 before the stream starts, connection_error after.

    ``cause`` names why (``redis_health.RedisCause``: ``auth_failed``,
    ``tls_failed``, ``connection_refused``, ...; ``busy`` for a pool that
    stayed full; ``command_refused`` for an error reply): the metric label
    and ``/readyz``'s ``redis`` field.
    """

    def __init__(self, message: str, cause: str = "unreachable") -> None:
        super().__init__(message)
        self.cause = cause


class DataError(StreamError):
    """Reading or decoding one interval failed; the stream goes on."""

    code = "data_error"
    fatal = False


class StoredValueMalformed(DataError):
    """A Redis key holds another type than the worker contract says (``WRONGTYPE``)."""
